"""Reading projections: a plain `nn.Linear`, a 4-bit base layer, or a PEFT LoRA `Linear`.

`resolve(module)` turns one projection module into a `Proj` the fused functions understand, or
returns None when the module cannot take the fused path *right now* (LoRA dropout in training,
DoRA or another LoRA variant, several active adapters, `lora_bias`, hooks...). The check runs on
every call, so `disable_adapter()`, `merge_adapter()` and `set_adapter()` keep working: the fused
path always computes exactly what the module's own forward would.
"""
from __future__ import annotations

import functools

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Proj:
    """One projection `Y = X @ W^T + b + s * (X @ A^T) @ B^T`.

    base: the module holding W (nn.Linear or a bitsandbytes 4-bit layer). The fused functions read W
    through `velotune.quant.get_base_weight(base)` in forward and again in backward (never saved);
    `base.weight` itself is handed to autograd only so full fine-tuning receives dW.
    bias: [out] or None.  A: [r, in] or None.  B: [out, r] or None.  scaling: s.
    """

    base: nn.Module
    bias: torch.Tensor | None
    A: torch.Tensor | None
    B: torch.Tensor | None
    scaling: float


def _is_plain_linear(m: nn.Module) -> bool:
    if m._forward_hooks or m._forward_pre_hooks:
        return False
    if type(m) is nn.Linear:
        return True
    # bitsandbytes NF4 (read via get_base_weight). Not PEFT's LoRA wrapper of it, also named Linear4bit.
    return type(m).__name__ == "Linear4bit" and type(m).__module__.startswith("bitsandbytes")


@functools.cache
def _lora_linear_class() -> type | tuple:
    """peft.tuners.lora.Linear, imported once; () when peft is not installed (nothing is a LoRA layer)."""
    try:
        from peft.tuners.lora import Linear as LoraLinear
    except ImportError:
        return ()
    return LoraLinear


def _is_lora_layer(m: nn.Module) -> bool:
    return isinstance(m, _lora_linear_class()) or ("lora_A" in m._modules and "base_layer" in m._modules
                                                  and hasattr(m, "scaling"))


def _dropout_is_identity(d: nn.Module) -> bool:
    return isinstance(d, nn.Identity) or (isinstance(d, nn.Dropout) and (d.p == 0.0 or not d.training))


def resolve(module: nn.Module) -> Proj | None:
    """`Proj` for the fused path, or None: then call `module(x)` (the stock path, always correct).

    Runs on every projection call, so it reads PEFT's per-instance state directly from `__dict__` /
    `_modules` (the attributes behind PEFT's `disable_adapters`, `merged`, `active_adapter`
    properties) instead of going through nn.Module.__getattr__ and properties: ~5x less CPU time.
    """
    if module._forward_hooks or module._forward_pre_hooks:
        return None
    if _is_plain_linear(module):
        return Proj(module, module.bias, None, None, 0.0)
    if not _is_lora_layer(module):
        return None
    d, mods = module.__dict__, module._modules
    base = mods["base_layer"]
    if not _is_plain_linear(base) or d.get("fan_in_fan_out", False):
        return None
    base_proj = Proj(base, base.bias, None, None, 0.0)
    merged = bool(d.get("merged_adapters"))
    if d.get("_disable_adapters", False):
        return None if merged else base_proj  # merged + disabled: PEFT unmerges on this call; let it
    if merged:
        return base_proj
    active = d.get("_active_adapter", "default")
    lora_A_mods = mods["lora_A"]._modules
    if isinstance(active, str):
        if active not in lora_A_mods:
            return base_proj
        name = active
    else:
        present = [a for a in active if a in lora_A_mods]
        if not present:
            return base_proj
        if len(present) > 1:
            return None
        name = present[0]
    if name in d.get("lora_variant", ()) or d.get("use_dora", {}).get(name, False):
        return None  # DoRA and other variants: stock PEFT path
    if d.get("lora_bias", {}).get(name, False):
        return None
    if not _dropout_is_identity(mods["lora_dropout"]._modules[name]):
        return None
    lora_A, lora_B = lora_A_mods[name], mods["lora_B"]._modules[name]
    if type(lora_A) is not nn.Linear or type(lora_B) is not nn.Linear or lora_A.bias is not None:
        return None
    return Proj(base, base.bias, lora_A.weight, lora_B.weight, float(d["scaling"][name]))


def is_fusable(module: nn.Module) -> bool:
    return resolve(module) is not None
