"""Reading projections: a plain `nn.Linear`, a 4-bit base layer, or a PEFT LoRA `Linear`.

`read_lora(module)` reads a PEFT LoRA layer's state (the one reader, for training and decoding
alike). `resolve(module)` turns one projection module into a `Proj` the fused functions understand, or
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

from velotune.quant import is_4bit


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
    # nn.Linear, or a bitsandbytes 4-bit layer (read via get_base_weight; not PEFT's LoRA wrapper of it)
    return type(m) is nn.Linear or (is_4bit(m) and type(m).__module__.startswith("bitsandbytes"))


@functools.cache
def _lora_linear_class() -> type | tuple:
    """peft.tuners.lora.Linear, imported once; () when peft is not installed (nothing is a LoRA layer)."""
    try:
        from peft.tuners.lora import Linear as LoraLinear
    except ImportError:
        return ()
    return LoraLinear


def is_lora_layer(m: nn.Module) -> bool:
    return isinstance(m, _lora_linear_class()) or (
        "lora_A" in m._modules and "base_layer" in m._modules and hasattr(m, "scaling")
    )


def _dropout_is_identity(d: nn.Module) -> bool:
    return isinstance(d, nn.Identity) or (isinstance(d, nn.Dropout) and (d.p == 0.0 or not d.training))


@dataclass
class Adapter:
    """One active LoRA adapter of a layer: y += scaling * B(A(dropout(x)))."""

    name: str
    A: nn.Linear
    B: nn.Linear
    scaling: float
    dropout: nn.Module


def read_lora(module: nn.Module) -> tuple[str, list[Adapter] | None]:
    """What computes a PEFT LoRA layer (is_lora_layer) right now, from PEFT's per-instance state:

    ("base", None)     adapters disabled (unmerged), or merged into the base weight: base_layer(x);
    ("lora", adapters) base_layer(x) plus each active adapter present in this layer (possibly none);
    ("module", None)   only the module's own forward: merged and disabled (PEFT unmerges on that
                       call), fan_in_fan_out, DoRA or another variant, lora_bias, adapters that are
                       not bias-free nn.Linear layers.
    Reads `__dict__` / `_modules` directly (the attributes behind PEFT's `disable_adapters`,
    `merged`, `active_adapter` properties) instead of nn.Module.__getattr__ and properties: it runs
    on every projection call of the training path, and ~5x less CPU time counts there."""
    d, mods = module.__dict__, module._modules
    merged = bool(d.get("merged_adapters"))
    if d.get("_disable_adapters", False):
        return ("module", None) if merged else ("base", None)
    if d.get("fan_in_fan_out", False):
        return ("module", None)
    if merged:
        return ("base", None)
    active = d.get("_active_adapter", "default")
    lora_A_mods, lora_B_mods = mods["lora_A"]._modules, mods["lora_B"]._modules
    names = [active] if isinstance(active, str) else active
    adapters = []
    for name in names:
        if name not in lora_A_mods:
            continue
        if (
            name in d.get("lora_variant", ())
            or d.get("use_dora", {}).get(name, False)
            or d.get("lora_bias", {}).get(name, False)
        ):
            return ("module", None)  # DoRA and other variants, lora_bias: stock PEFT path
        lora_A, lora_B = lora_A_mods[name], lora_B_mods[name]
        if (
            type(lora_A) is not nn.Linear
            or type(lora_B) is not nn.Linear
            or lora_A.bias is not None
            or lora_B.bias is not None
        ):
            return ("module", None)
        adapters.append(Adapter(name, lora_A, lora_B, float(d["scaling"][name]), mods["lora_dropout"]._modules[name]))
    return ("lora", adapters)


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
    if not is_lora_layer(module):
        return None
    base = module._modules["base_layer"]
    if not _is_plain_linear(base):
        return None
    kind, adapters = read_lora(module)
    if kind == "module" or (adapters and len(adapters) > 1):
        return None
    if not adapters:  # disabled, merged, or no active adapter in this layer
        return Proj(base, base.bias, None, None, 0.0)
    a = adapters[0]
    if not _dropout_is_identity(a.dropout):
        return None
    return Proj(base, base.bias, a.A.weight, a.B.weight, a.scaling)


def is_fusable(module: nn.Module) -> bool:
    return resolve(module) is not None
