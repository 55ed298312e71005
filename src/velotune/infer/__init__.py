"""Generation: `for_inference` switches a model to velotune's decode path, `for_training` reverts it.

    FastLanguageModel.for_inference(model)     # eval mode + fast model.generate
    out = model.generate(**inputs, max_new_tokens=64)
    FastLanguageModel.for_training(model)      # every change undone

`for_inference` binds one attribute on the instance (`generate`) and records what it changed
(training flags of every module, `config.use_cache`); `for_training` restores exactly that.
Nothing global is touched, and the training forward (stock or velotune's fused one) is never
used by the decode path, which reads the weights itself (engine.py).
"""

from __future__ import annotations

import functools
import logging

from velotune.infer.stops import stop_token_ids  # noqa: F401  (public helper)
from velotune.memory import enable_checkpointing

log = logging.getLogger("velotune")
_STATE = "_velotune_inference_state"


def _config_of(model):
    from velotune.infer.spec import causal_lm_of

    return getattr(causal_lm_of(model), "config", None)


def for_inference(model, *, cuda_graphs: bool = True, fused: bool | None = None):
    """Eval mode, KV cache on, and `model.generate` on the static-cache decode engine.

    Families in the registry (velotune.models.families) with plain, LoRA (unmerged) or
    bitsandbytes 4-bit weights take the fast path; anything else keeps stock generate in eval mode.
    `cuda_graphs=False` decodes eagerly on the GPU; `fused=False` uses plain torch ops instead of
    velotune's Triton kernels for norm, RoPE and activation (default: fused on CUDA). Both for A/B checks.
    """
    if _STATE in model.__dict__:
        return model
    from velotune.infer.engine import DecodeEngine
    from velotune.infer.generate import fast_generate
    from velotune.infer.spec import build_spec

    config = _config_of(model)
    state = {
        "training": {name: m.training for name, m in model.named_modules()},
        "use_cache": getattr(config, "use_cache", None),
        "generate": model.__dict__.get("generate"),
    }
    model.eval()
    if config is not None:
        config.use_cache = True
    spec = build_spec(model)
    engine = DecodeEngine(spec, cuda_graphs=cuda_graphs, fused=fused) if spec is not None else None
    if engine is None:
        log.info("velotune: %s is not on the fast decode path; generate stays stock", type(model).__name__)
    stock_generate = state["generate"] or type(model).generate.__get__(model)
    model.generate = functools.partial(fast_generate, model, engine, stock_generate)
    state["engine"] = engine
    model.__dict__[_STATE] = state
    return model


def for_training(model, use_gradient_checkpointing=True):
    """Undo `for_inference` exactly: training flags, `use_cache`, the bound `generate`, the KV cache.

    A model that never went through `for_inference` is put in training mode with `use_cache` off.
    `use_gradient_checkpointing`: True keeps checkpointing as configured by `get_peft_model`,
    False turns it off, "unsloth"/"offload" turns offloaded checkpointing on.
    """
    state = model.__dict__.pop(_STATE, None)
    config = _config_of(model)
    if state is None:
        model.train()
        if config is not None:
            config.use_cache = False
    else:
        if state["engine"] is not None:
            state["engine"].release()
        del model.__dict__["generate"]
        if state["generate"] is not None:
            model.generate = state["generate"]
        if state["training"].get("", False):
            for name, module in model.named_modules():
                module.training = state["training"].get(name, True)
            if config is not None:
                config.use_cache = state["use_cache"]
        else:  # it was loaded in eval mode: training mode is what the caller asks for
            model.train()
            if config is not None:
                config.use_cache = False
    _set_checkpointing(model, use_gradient_checkpointing)
    return model


def _set_checkpointing(model, mode) -> None:
    """True: keep checkpointing as it was configured; False: off; "unsloth"/"offload": on (offloaded)."""
    enabled = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5.2x names; the old ones warn
    if enabled is None:
        enabled = getattr(model, "is_gradient_checkpointing", False)
    if mode in (False, None, "none", "false"):
        disable = getattr(model, "activation_checkpointing_disable", None) or getattr(
            model, "gradient_checkpointing_disable", None
        )
        if enabled and disable is not None:
            disable()
        return
    if mode in ("unsloth", "offload") and not enabled:
        enable_checkpointing(model, mode)
