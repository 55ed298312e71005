"""TRL's GRPOTrainer with a velotune model: rollouts on velotune's decode engine, the policy's
log-probs through velotune's per-token head. TRL's class and its loss are used unchanged.

    from trl import GRPOConfig, GRPOTrainer
    trainer = GRPOTrainer(model=model, reward_funcs=..., args=GRPOConfig(...), ...)
    install(trainer)        # this instance only; uninstall(trainer) undoes it
    trainer.train()

`velotune_trainer_class(GRPOTrainer)` (train/trl_glue.py, what velotune's runner builds) installs
it in `__init__`. A velotune model in a plain `GRPOTrainer` without `install` trains correctly too:
velotune's fused decoder stack (padding-free over the left-padded prompts and right-padded
completions) computes the hidden states, stock `generate` samples and TRL's head scores them.

What `install` binds, on this trainer's model only:
1. Rollouts (`_generate_single_turn`'s `unwrapped_model.generate(...)`): `model.generate` on the
   decode engine (infer/rollout.py: static KV cache, CUDA graphs; batched, left-padded prompts,
   TRL's sampling settings through transformers' logits processors, stop at any of TRL's eos ids).
   The model's training mode is left as it is; calls the engine cannot take (dropout active, an
   unsupported family or generate mode) go to stock generate.
2. Policy log-probs: the forward TRL's `add_fused_lm_head` bound on the policy's *ForCausalLM is
   wrapped by velotune's head (models/logprob_head.py: the same log-probs and entropies at TRL's
   temperature, the gradient's vocabulary GEMM in forward). A trainable lm_head keeps TRL's head.
Not installed, TRL's own paths kept: vLLM (`use_vllm`) or transformers' continuous batching for
generation (rollouts), `cast_lm_head_to_fp32` (the head). The reference model TRL builds for a
non-PEFT policy with beta > 0 is a stock transformers model and keeps TRL's head.

Exactness (tests/train/test_grpo.py, fp32): given the same completions, rewards, advantages, loss
and LoRA gradients equal stock TRL + PEFT's; greedy rollouts are token for token stock generate's,
sampled ones draw the same tokens from the same seed (the engine's logits equal stock's to rounding).
"""

from __future__ import annotations

import logging

log = logging.getLogger("velotune")
_STATE = "_velotune_grpo"


def is_grpo_trainer(trainer) -> bool:
    try:
        from trl import GRPOTrainer
    except ImportError:
        return False
    return isinstance(trainer, GRPOTrainer)


def policy_causal_lm(model):
    """The *ForCausalLM TRL put its fused head on (inside a PeftModel, or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def install(trainer) -> dict:
    """Bind velotune's rollouts and log-prob head on a GRPOTrainer instance (see the module docstring).
    Returns {"rollouts": bool, "logprob_head": bool}: which of the two are velotune's. Idempotent."""
    from velotune.errors import ConfigError

    if not is_grpo_trainer(trainer):
        raise ConfigError(f"velotune.train.grpo.install: expected a trl.GRPOTrainer, got {type(trainer).__name__}")
    state = trainer.__dict__.get(_STATE)
    if state is not None:
        return dict(state["installed"])
    from velotune.infer.rollout import enable_fast_generate
    from velotune.models.logprob_head import bind_logprob_head

    args = trainer.args
    model = trainer.model
    installed = {"rollouts": False, "logprob_head": False}
    if not getattr(trainer, "use_vllm", False) and not getattr(trainer, "use_transformers_continuous_batching", False):
        installed["rollouts"] = enable_fast_generate(model)
    installed["logprob_head"] = bind_logprob_head(
        policy_causal_lm(model),
        temperature=trainer.temperature,
        outputs=("log_probs", "entropy"),
        cast_lm_head_to_fp32=getattr(args, "cast_lm_head_to_fp32", False),
    )
    trainer.__dict__[_STATE] = {"installed": dict(installed)}
    log.info(
        "velotune: GRPO with %s rollouts and %s log-prob head",
        "velotune's decode engine for" if installed["rollouts"] else "stock generate for",
        "velotune's" if installed["logprob_head"] else "TRL's",
    )
    return installed


def uninstall(trainer) -> bool:
    """Undo `install` on this trainer's model (rollout engine released, TRL's head bound again)."""
    state = trainer.__dict__.pop(_STATE, None)
    if state is None:
        return False
    from velotune.infer.rollout import disable_fast_generate
    from velotune.models.logprob_head import release_logprob_head

    disable_fast_generate(trainer.model)
    release_logprob_head(policy_causal_lm(trainer.model))
    return True
