"""TRL's fused-LM-head calls served by velotune's per-token log-prob head, per model instance.

TRL's GRPO trainer (also RLOO, DPO, KTO) calls `add_fused_lm_head(model, temperature, ...)`, which
binds a forward on the *ForCausalLM instance: `model(..., labels=labels, fused_lm_head=True)` runs
the decoder stack, then scores the next-token labels through the LM head in tiles and returns a
`FusedCausalLMOutput` (per-token `log_probs`, optionally `entropy`; zeros where the label is -100).

    bind_logprob_head(causal_lm, temperature=0.7, outputs=("log_probs", "entropy"))  # after TRL's
    release_logprob_head(causal_lm)                                                  # undo

`bind_logprob_head` wraps the forward it finds on the instance (TRL's). A call with
`fused_lm_head=True` is then served by velotune when it can be, with the same outputs:
* the decoder stack is the model's own (velotune's fused, padding-free stack where it is patched);
* the head is `kernels.fused_linear_logprobs` on the rows whose label is not -100: log-probs
  and entropies of softmax((softcap(y * logit_scale)) / temperature), y = lm_head(hidden), with
  the softcap / logit scale read from the config as TRL 1.16 reads them, and the gradient's
  vocabulary GEMM done in forward (two GEMMs per token instead of three);
* `loss` = -sum(log_probs) / (count of labels, or num_items_in_batch), `label_mask` = labels != -100.
Every other call goes to the wrapped forward unchanged: `fused_lm_head=False` (generation,
ordinary training), a trainable or non-Linear head (lm_head in modules_to_save, full fine-tuning:
TRL's head computes its weight gradient), a sharded (DTensor) head, MoE router logits.
"""

from __future__ import annotations

import functools
import types

import torch

from velotune.models.loss import resolve_lm_head

_STATE = "_velotune_logprob_head"
SERVED_OUTPUTS = ("log_probs", "entropy")


def head_constants(config) -> tuple[float | None, float | None]:
    """(softcap, logit_scale) of the LM head's logits, read as TRL 1.16's add_fused_lm_head reads them
    (None: absent). logit_scale: `logit_scale`, `output_multiplier`, `lm_head_multiplier`, else
    1 / `logits_scaling` (HyperCLOVA X: x `logits_scaling`)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(text, "final_logit_softcapping", None)
    scale = getattr(text, "logit_scale", None)
    if scale is None:
        scale = getattr(text, "output_multiplier", None)
    if scale is None:
        scale = getattr(text, "lm_head_multiplier", None)
    if scale is None and getattr(text, "logits_scaling", None) is not None:
        scale = text.logits_scaling if text.model_type == "hyperclovax" else 1 / text.logits_scaling
    return softcap, (None if scale is None or scale == 1.0 else float(scale))


def _servable_head(model):
    """The plain Linear lm_head velotune's head can compute with for this call, or None."""
    head = resolve_lm_head(model.get_output_embeddings())
    if head is None or type(head.weight).__name__ == "DTensor":  # FSDP2 shards: TRL gathers them
        return None
    grads = torch.is_grad_enabled()
    if grads and (head.weight.requires_grad or (head.bias is not None and head.bias.requires_grad)):
        return None
    return head


def _head_forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
    state = self.__dict__[_STATE]
    wrapped = state["wrapped"]
    head = None
    if fused_lm_head and not kwargs.get("output_router_logits"):
        text = self.config.get_text_config() if hasattr(self.config, "get_text_config") else self.config
        if not getattr(text, "output_router_logits", False):
            head = _servable_head(self)
    if head is None:
        return wrapped(
            *args,
            fused_lm_head=fused_lm_head,
            labels=labels,
            shift_labels=shift_labels,
            num_items_in_batch=num_items_in_batch,
            **kwargs,
        )
    from trl.trainer.utils import FusedCausalLMOutput

    from velotune.kernels.fused_linear_logprob import fused_linear_logprobs

    kwargs["use_cache"] = False
    outputs = self.base_model(*args, **kwargs)
    if shift_labels is None:
        hidden, labels = outputs.last_hidden_state[:, :-1], labels[:, 1:]
    else:
        hidden, labels = outputs.last_hidden_state, shift_labels
    hidden = hidden.to(head.weight.device)
    labels = labels.to(head.weight.device)
    mask = labels != -100
    softcap, scale = head_constants(self.config)
    want_entropy = "entropy" in state["outputs"]
    logp, ent = fused_linear_logprobs(
        hidden[mask],
        head.weight,
        labels[mask],
        bias=head.bias,
        temperature=state["temperature"],
        softcap=softcap,
        logit_scale=scale,
        entropy=want_entropy,
    )
    # masked_scatter keeps an all-masked micro-batch connected to the graph (a zero loss, not an error)
    log_probs = logp.new_zeros(mask.shape).masked_scatter(mask, logp)
    entropy = ent.new_zeros(mask.shape).masked_scatter(mask, ent) if want_entropy else None
    denom = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    return FusedCausalLMOutput(
        loss=-log_probs.sum() / denom, log_probs=log_probs, entropy=entropy, label_mask=mask, aux_loss=None
    )


def bind_logprob_head(causal_lm, *, temperature: float = 1.0, outputs=("log_probs",), cast_lm_head_to_fp32=False):
    """Serve `fused_lm_head=True` calls of this *ForCausalLM instance with velotune's head (see the module
    docstring), wrapping the forward bound now (TRL's `add_fused_lm_head` one). Returns False and changes
    nothing where velotune's head cannot serve the trainer's requests: other per-token outputs than
    log_probs / entropy, `cast_lm_head_to_fp32`, or no `base_model` stack. Idempotent (a second call
    updates temperature and outputs)."""
    if cast_lm_head_to_fp32 or any(o not in SERVED_OUTPUTS for o in outputs) or not temperature > 0:
        return False
    if getattr(causal_lm, "base_model", None) is None or causal_lm.base_model is causal_lm:
        return False
    state = causal_lm.__dict__.get(_STATE)
    if state is None:
        had = "forward" in causal_lm.__dict__
        state = {"wrapped": causal_lm.forward, "saved": causal_lm.__dict__.get("forward"), "had": had}

        @functools.wraps(type(causal_lm).forward)  # its signature: generate validates model kwargs against it
        def forward(self, *args, **kwargs):
            return _head_forward(self, *args, **kwargs)

        state["function"] = forward
        causal_lm.__dict__[_STATE] = state
        causal_lm.forward = types.MethodType(forward, causal_lm)
    state["temperature"] = float(temperature)
    state["outputs"] = tuple(outputs)
    return True


def release_logprob_head(causal_lm) -> bool:
    """Undo `bind_logprob_head`: the wrapped forward is bound again (if nothing replaced ours since)."""
    state = causal_lm.__dict__.pop(_STATE, None)
    if state is None:
        return False
    if getattr(causal_lm.__dict__.get("forward"), "__func__", None) is state["function"]:
        if state["had"]:
            causal_lm.forward = state["saved"]
        else:
            del causal_lm.__dict__["forward"]
    return True


def serves_logprob_head(causal_lm) -> bool:
    return _STATE in causal_lm.__dict__
