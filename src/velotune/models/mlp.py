"""Fused gated MLP forward: down(act(gate(x)) * up(x)) with LoRA on any of the three, one function.

Falls back to the stock forward when a projection cannot be fused (LoRA dropout in training, DoRA,
several active adapters...) or the activation is not one the GLU kernels implement exactly.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from velotune.lora import lora_mlp, resolve
from velotune.lora.recomputed_mlp import lora_mlp_recomputed
from velotune.models.modes import LayerModes, modes_of


def recomputes_without_mlp_values(fn, modes: LayerModes | None):
    """fn for torch's non-reentrant checkpoint, whose first call is the forward and every later call
    a recompute: checkpoint keeps only what the recompute's ops save and drops its outputs, so
    later calls run with `modes.mlp_values_unused` set (the layer's LayerModes, models/modes.py: no
    frozen down GEMM, no [N, I] hidden activation made; what is saved is the same bits). modes None:
    fn itself."""
    if modes is None:
        return fn
    calls = [0]

    def run(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 1:
            return fn(*args, **kwargs)
        with modes.set(mlp_values_unused=True):
            return fn(*args, **kwargs)

    return run


def set_row_blocks(mlp: torch.nn.Module, blocks: int) -> None:
    """Under recompute="mlp" this MLP runs forward and backward in `blocks` row blocks
    (lora/recomputed_mlp.py; get_peft_model(mlp_row_blocks=...), which checks the value). 1 (the
    default) is the same bits as checkpointing lora_mlp; more lowers the MLP's memory peak at the
    cost of more, smaller GEMMs (docs/perf-notes.md)."""
    mlp._velotune_row_blocks = blocks


def mlp_forward(self, x):
    """Replacement for `<Family>MLP.forward`: x [..., H] -> [..., H]. Under its layer's modes
    (models/modes.py): checkpointed_mlp saves only x and recomputes in backward (lora/recomputed_mlp.py
    with frozen base weights, else a non-reentrant torch checkpoint of lora_mlp, stopping before the
    frozen down projection); mlp_values_unused skips the frozen down GEMM (see _mlp_forward)."""
    plan = _plan(self)
    modes = modes_of(self)
    if modes.checkpointed_mlp and torch.is_grad_enabled():
        if plan is not None and _frozen_bases(plan):  # saves x only, recomputes in backward
            gate_up, down, act = plan
            shape = x.shape
            blocks = getattr(self, "_velotune_row_blocks", 1)
            return lora_mlp_recomputed(x.reshape(-1, shape[-1]), gate_up, down, act, blocks).view(shape)
        # the fused MLP draws no random numbers (LoRA dropout sends it to the stock path), so its
        # recompute needs no RNG state saved and restored (host time per layer and step)
        calls = [0]

        def forward_then_recompute(module, plan, x):  # the checkpoint's recomputes: values unused
            calls[0] += 1
            return _mlp_forward(module, plan, x, values_unused=calls[0] > 1 or modes.mlp_values_unused)

        return checkpoint(forward_then_recompute, self, plan, x, use_reentrant=False, preserve_rng_state=plan is None)
    return _mlp_forward(self, plan, x, modes.mlp_values_unused)


def _frozen_bases(plan) -> bool:
    gate_up, down, _ = plan
    return not any(t is not None and t.requires_grad for p in (*gate_up, down) for t in (p.base.weight, p.bias))


def _plan(self):
    """(gate/up projections, down projection, activation) for the fused path, or None (stock)."""
    spec = self._velotune_spec
    act = spec.activation(self.config)
    if spec.gate_up == "fused":
        gate_up = [resolve(self.gate_up_proj)]
    else:
        gate_up = [resolve(self.gate_proj), resolve(self.up_proj)]
    down = resolve(self.down_proj)
    if act is None or down is None or any(p is None for p in gate_up):
        return None
    return gate_up, down, act


def _mlp_forward(self, plan, x, values_unused: bool = False):
    """values_unused: only gradients will be taken through the output (a recompute): fused MLPs whose
    output meets nothing but the residual add (no sandwich norm after them, see FamilySpec) skip the
    frozen down GEMM and return uninitialised values (`lora_mlp(values_unused=True)`)."""
    if plan is None:
        return self._velotune_stock_forward(x)
    gate_up, down, act = plan
    shape = x.shape
    skip = values_unused and not self._velotune_spec.sandwich_norms
    return lora_mlp(x.reshape(-1, shape[-1]), gate_up, down, act, values_unused=skip).view(shape)
