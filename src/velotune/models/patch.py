"""Bind velotune's fused forwards onto module INSTANCES, table-driven and revertible.

    patch(model, spec)  -> number of modules bound    (each keeps its stock forward for fallbacks)
    unpatch(model)      -> stock behaviour everywhere (class forwards, or whatever was there before)

FUSED_FORWARDS is the one table of fused forwards by role; binding itself (and the marks it leaves on
an instance) is models/binding.py. Nothing global changes: other instances of the same transformers
classes stay stock. What runs fused is summarised by models/report.py.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import nn

from velotune.models import positions
from velotune.models.attention import attention_forward
from velotune.models.binding import bind, is_patched, release
from velotune.models.lora_linear import lora_linear_forward
from velotune.models.loss import causal_lm_forward
from velotune.models.mlp import mlp_forward
from velotune.models.norm import norm_forward
from velotune.models.padding_free import stack_forward
from velotune.models.rope_scaling import restore_context
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


def bind_forward(module: nn.Module, role: str, spec: FamilySpec) -> None:
    """Bind the fused forward of `role` onto this instance (models/binding.py)."""
    bind(module, role, spec, BOUND_FORWARDS[role])


def release_forward(module: nn.Module) -> None:
    """Undo `bind_forward`; the decoder stack's padding-free switch goes with it."""
    release(module, extra_marks=("_velotune_padding_free",))


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
    if model.__dict__.get("_velotune_stock_rotary") is not None:
        restore_context(model)
    return n
