"""Bind velotune's fused forwards onto module INSTANCES, table-driven and revertible.

    patch(model, spec)  -> number of modules bound    (each keeps its stock forward for fallbacks)
    unpatch(model)      -> stock behaviour everywhere (class forwards, or whatever was there before)
    report(model)       -> which modules run fused right now, and which LoRA layers would fall back

Nothing global changes: other instances of the same transformers classes stay stock.
Modules carrying an accelerate hook (device_map) get `_old_forward` replaced, so the hook still runs.
"""

from __future__ import annotations

import collections
import functools
import types
import warnings

import torch
from torch import nn

from velotune.models.attention import attention_forward
from velotune.models.loss import causal_lm_forward, resolve_lm_head
from velotune.models import positions
from velotune.models.lora_linear import lora_linear_forward
from velotune.models.mlp import mlp_forward
from velotune.models.norm import norm_forward
from velotune.models.padding_free import stack_forward
from velotune.models.spec import FamilySpec

FUSED_FORWARDS = {
    "causal_lm": causal_lm_forward,
    "body": stack_forward,
    "attention": attention_forward,
    "mlp": mlp_forward,
    "norm": norm_forward,
    "lora": lora_linear_forward,  # a PEFT LoRA Linear on its own (the generic path, models/generic.py)
}


def _activation_dtype(module: nn.Module, role: str, args, kwargs) -> torch.dtype | None:
    """The dtype the module computes in: its input activation's (the embeddings' for the whole model)."""
    if role in ("causal_lm", "body"):
        emb = module.get_input_embeddings()
        return None if emb is None else emb.weight.dtype
    x = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
    return x.dtype if isinstance(x, torch.Tensor) else None


def _autocast_to_other_dtype(dtype: torch.dtype | None) -> bool:
    """Autocast is on (CUDA or CPU) and casts to a dtype other than the activations': the fused
    functions run in the activations' dtype and would mix the two (a float32 model under TRL's
    default bf16=True, say). Autocast to the model's own dtype changes nothing and stays fused."""
    for device_type in ("cuda", "cpu"):
        if torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) != dtype:
            return True
    return False


_WARNED_AUTOCAST = [False]


def _stock_under_foreign_autocast(fused, role: str):
    """`fused`, or the module's stock forward while autocast casts to another dtype (see above):
    then the results are stock's own, and a one-time warning says how to get the fused path."""

    @functools.wraps(fused)
    def forward(self, *args, **kwargs):
        dtype = _activation_dtype(self, role, args, kwargs)
        if dtype is not None and _autocast_to_other_dtype(dtype):
            if not _WARNED_AUTOCAST[0]:
                _WARNED_AUTOCAST[0] = True
                warnings.warn(
                    f"velotune: autocast to another dtype than the model's ({dtype}): running the stock "
                    "transformers path (correct, not fused). Load the model in the dtype you train in "
                    "(e.g. dtype=torch.bfloat16 with bf16=True) for velotune's kernels.",
                    stacklevel=2,
                )
            return self._velotune_stock_forward(*args, **kwargs)
        return fused(self, *args, **kwargs)

    return forward


BOUND_FORWARDS = {role: _stock_under_foreign_autocast(fn, role) for role, fn in FUSED_FORWARDS.items()}


def _forward_attr(module: nn.Module) -> str:
    return "_old_forward" if hasattr(module, "_hf_hook") and hasattr(module, "_old_forward") else "forward"


def bind_forward(module: nn.Module, role: str, spec: FamilySpec) -> None:
    attr = _forward_attr(module)
    had_instance = attr in module.__dict__
    module._velotune_saved = (attr, module.__dict__.get(attr) if had_instance else None, had_instance)
    module._velotune_stock_forward = getattr(module, attr)
    module._velotune_spec = spec
    module._velotune_role = role
    setattr(module, attr, types.MethodType(BOUND_FORWARDS[role], module))


def release_forward(module: nn.Module) -> None:
    attr, saved, had_instance = module._velotune_saved
    current = module.__dict__.get(attr)
    if getattr(current, "__func__", None) is BOUND_FORWARDS[module._velotune_role]:
        if had_instance:
            setattr(module, attr, saved)
        else:
            module.__dict__.pop(attr, None)
    # else: someone wrapped our forward after us (e.g. TRL's add_fused_lm_head); leave their wrapper in place.
    for name in (
        "_velotune_saved",
        "_velotune_stock_forward",
        "_velotune_spec",
        "_velotune_role",
        "_velotune_padding_free",
    ):
        module.__dict__.pop(name, None)


def is_patched(module: nn.Module) -> bool:
    return "_velotune_role" in module.__dict__


def patch(model: nn.Module, spec: FamilySpec) -> int:
    """Bind fused forwards onto every module of `model` whose class the spec names. Idempotent."""
    n = 0
    for module in model.modules():
        module.__dict__.pop("_velotune_modes", None)  # models/modes.py: handed out again on next use
        role = spec.role_of(type(module).__name__)
        if role is not None and not is_patched(module):
            bind_forward(module, role, spec)
            n += 1
    return n


def unpatch(model: nn.Module) -> int:
    """Restore the stock forward of every module `patch` touched; returns how many."""
    n = 0
    for module in model.modules():
        module.__dict__.pop("_velotune_modes", None)
        if is_patched(module):
            release_forward(module)
            n += 1
    positions.release(model)
    for module in model.modules():
        module.__dict__.pop("_velotune_generic", None)
    rotary = model.__dict__.get("_velotune_stock_rotary")
    if rotary is not None:
        from velotune.models.rope_scaling import restore_context

        restore_context(model)
    return n


def _lora_status(model: nn.Module) -> tuple[int, list[str]]:
    from velotune.lora.layers import is_lora_layer, resolve

    fused, stock = 0, []
    for name, module in model.named_modules():
        if is_lora_layer(module):
            if resolve(module) is None:
                stock.append(name)
            else:
                fused += 1
    return fused, stock


def report(model: nn.Module) -> str:
    """A short human-readable summary of what runs fused."""
    from velotune.models.generic import generic_plan, report_lines

    if generic_plan(model) is not None:
        return "\n".join(report_lines(model))
    counts: dict[str, int] = collections.Counter()
    spec = None
    for module in model.modules():
        if is_patched(module):
            counts[module._velotune_role] += 1
            spec = module._velotune_spec
    if not counts:
        return f"velotune: {type(model).__name__} runs entirely on the stock transformers path"
    lines = [f"velotune fused path ({spec.describe()})"]
    for role in FUSED_FORWARDS:
        if counts.get(role):
            lines.append(f"  {role:<9} {counts[role]:>4} module(s) fused")
    fused, stock = _lora_status(model)
    if fused or stock:
        lines.append(
            f"  lora      {fused:>4} layer(s) fused, {len(stock)} on the stock PEFT path"
            + (f" (e.g. {stock[0]}: dropout in training, DoRA or several adapters)" if stock else "")
        )
    for module in model.modules():
        if (
            is_patched(module)
            and module._velotune_role == "causal_lm"
            and resolve_lm_head(module.get_output_embeddings()) is None
        ):
            lines.append("  lm_head   not a plain Linear: loss computed from full logits (stock)")
    return "\n".join(lines)
