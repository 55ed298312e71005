"""One fused forward bound onto one module INSTANCE, and released again; the marks that leaves.

    bind(module, role, spec, forward)   forward(self, *args, **kwargs) becomes this instance's forward
    release(module)                     the forward it had before comes back
    is_patched(module)                  whether a forward is bound now (what every other module asks)

The marks live in the instance's own __dict__, never on its class (other instances stay stock):
  _velotune_role           the role of the bound forward ("attention", "mlp", ...: FamilySpec.role_of)
  _velotune_spec           the FamilySpec the forward reads
  _velotune_stock_forward  the forward the module had (the fused one falls back to it)
  _velotune_saved          what `release` puts back, and which function was bound
A module carrying an accelerate hook (device_map) gets `_old_forward` replaced, so the hook still runs.
This module knows no forward: models/patch.py holds the table of fused forwards and binds them.
"""

from __future__ import annotations

import types

from torch import nn

ROLE = "_velotune_role"
_MARKS = ("_velotune_saved", "_velotune_stock_forward", "_velotune_spec", ROLE)


def _forward_attr(module: nn.Module) -> str:
    return "_old_forward" if hasattr(module, "_hf_hook") and hasattr(module, "_old_forward") else "forward"


def bind(module: nn.Module, role: str, spec, forward) -> None:
    """Make `forward` (a function taking the module first) this instance's forward, keeping the old one."""
    attr = _forward_attr(module)
    had_instance = attr in module.__dict__
    module._velotune_saved = (attr, module.__dict__.get(attr) if had_instance else None, had_instance, forward)
    module._velotune_stock_forward = getattr(module, attr)
    module._velotune_spec = spec
    setattr(module, ROLE, role)
    setattr(module, attr, types.MethodType(forward, module))


def release(module: nn.Module, extra_marks: tuple[str, ...] = ()) -> None:
    """Undo `bind` and drop its marks (and `extra_marks`). If someone wrapped the bound forward after
    us (e.g. TRL's add_fused_lm_head), their wrapper stays in place."""
    attr, saved, had_instance, forward = module._velotune_saved
    current = module.__dict__.get(attr)
    if getattr(current, "__func__", None) is forward:
        if had_instance:
            setattr(module, attr, saved)
        else:
            module.__dict__.pop(attr, None)
    for name in _MARKS + extra_marks:
        module.__dict__.pop(name, None)


def is_patched(module: nn.Module) -> bool:
    return ROLE in module.__dict__


def role_of(module: nn.Module) -> str | None:
    """The role of the forward bound to `module`, or None."""
    return module.__dict__.get(ROLE)
