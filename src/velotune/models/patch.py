"""Bind velotune's fused forwards onto module INSTANCES, table-driven and revertible.

    patch(model, spec)  -> number of modules bound    (each keeps its stock forward for fallbacks)
    unpatch(model)      -> stock behaviour everywhere (class forwards, or whatever was there before)
    report(model)       -> which modules run fused right now, and which LoRA layers would fall back

Nothing global changes: other instances of the same transformers classes stay stock.
Modules carrying an accelerate hook (device_map) get `_old_forward` replaced, so the hook still runs.
"""
from __future__ import annotations

import collections
import types

from torch import nn

from velotune.models.attention import attention_forward
from velotune.models.loss import causal_lm_forward, resolve_lm_head
from velotune.models.mlp import mlp_forward
from velotune.models.norm import norm_forward
from velotune.models.spec import FamilySpec

FUSED_FORWARDS = {
    "causal_lm": causal_lm_forward,
    "attention": attention_forward,
    "mlp": mlp_forward,
    "norm": norm_forward,
}


def _forward_attr(module: nn.Module) -> str:
    return "_old_forward" if hasattr(module, "_hf_hook") and hasattr(module, "_old_forward") else "forward"


def _bind(module: nn.Module, role: str, spec: FamilySpec) -> None:
    attr = _forward_attr(module)
    had_instance = attr in module.__dict__
    module._velotune_saved = (attr, module.__dict__.get(attr) if had_instance else None, had_instance)
    module._velotune_stock_forward = getattr(module, attr)
    module._velotune_spec = spec
    module._velotune_role = role
    setattr(module, attr, types.MethodType(FUSED_FORWARDS[role], module))


def _release(module: nn.Module) -> None:
    attr, saved, had_instance = module._velotune_saved
    current = module.__dict__.get(attr)
    if getattr(current, "__func__", None) is FUSED_FORWARDS[module._velotune_role]:
        if had_instance:
            setattr(module, attr, saved)
        else:
            module.__dict__.pop(attr, None)
    # else: someone wrapped our forward after us (e.g. TRL's add_fused_lm_head); leave their wrapper in place.
    for name in ("_velotune_saved", "_velotune_stock_forward", "_velotune_spec", "_velotune_role"):
        module.__dict__.pop(name, None)


def is_patched(module: nn.Module) -> bool:
    return "_velotune_role" in module.__dict__


def patch(model: nn.Module, spec: FamilySpec) -> int:
    """Bind fused forwards onto every module of `model` whose class the spec names. Idempotent."""
    n = 0
    for module in model.modules():
        role = spec.role_of(type(module).__name__)
        if role is not None and not is_patched(module):
            _bind(module, role, spec)
            n += 1
    return n


def unpatch(model: nn.Module) -> int:
    """Restore the stock forward of every module `patch` touched; returns how many."""
    n = 0
    for module in model.modules():
        if is_patched(module):
            _release(module)
            n += 1
    rotary = model.__dict__.get("_velotune_stock_rotary")
    if rotary is not None:
        from velotune.models.rope_scaling import restore_context

        restore_context(model)
    return n


def _lora_status(model: nn.Module) -> tuple[int, list[str]]:
    from velotune.lora.layers import _is_lora_layer, resolve

    fused, stock = 0, []
    for name, module in model.named_modules():
        if _is_lora_layer(module):
            if resolve(module) is None:
                stock.append(name)
            else:
                fused += 1
    return fused, stock


def report(model: nn.Module) -> str:
    """A short human-readable summary of what runs fused."""
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
        lines.append(f"  lora      {fused:>4} layer(s) fused, {len(stock)} on the stock PEFT path"
                     + (f" (e.g. {stock[0]}: dropout in training, DoRA or several adapters)" if stock else ""))
    for module in model.modules():
        if is_patched(module) and module._velotune_role == "causal_lm" and resolve_lm_head(module.lm_head) is None:
            lines.append("  lm_head   not a plain Linear: loss computed from full logits (stock)")
    return "\n".join(lines)
