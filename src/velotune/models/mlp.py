"""Fused gated MLP forward: down(act(gate(x)) * up(x)) with LoRA on any of the three, one function.

Falls back to the stock forward when a projection cannot be fused (LoRA dropout in training, DoRA,
several active adapters...) or the activation is not one the GLU kernels implement exactly.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from velotune.lora import lora_mlp, resolve
from velotune.lora.recomputed_mlp import lora_mlp_recomputed
from velotune.models.switch import switched

_VALUES_UNUSED = [False]
_CHECKPOINTED = [False]


def checkpointed_mlp():
    """Within this block (a decoder layer under recompute="mlp", memory/saved_offload.py) every
    patched MLP saves only its input and backward recomputes it: through lora/recomputed_mlp.py
    (frozen base weights), else as a non-reentrant torch checkpoint of lora_mlp (stopping before the
    frozen down projection, see lora_mlp)."""
    return switched(_CHECKPOINTED, True)


def mlp_output_values_unused():
    """Within this block a decoder layer runs only so that gradients can be taken through it (the
    captured recompute of memory/layer_graphs.py): fused MLPs whose output meets nothing but the
    residual add (no sandwich norm after them, see FamilySpec) skip the frozen down GEMM and return
    uninitialised values (`lora_mlp(values_unused=True)`). Gradients are unchanged."""
    return switched(_VALUES_UNUSED, True)


def recomputes_without_mlp_values(fn):
    """fn for torch's non-reentrant checkpoint, whose first call is the forward and every later call
    a recompute: checkpoint keeps only what the recompute's ops save and drops its outputs, so
    later calls run under mlp_output_values_unused() (no frozen down GEMM, no [N, I] hidden
    activation made; what is saved is the same bits)."""
    calls = [0]

    def run(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 1:
            return fn(*args, **kwargs)
        with mlp_output_values_unused():
            return fn(*args, **kwargs)

    return run


def set_row_blocks(mlp: torch.nn.Module, blocks: int) -> None:
    """Under recompute="mlp" this MLP runs forward and backward in `blocks` row blocks
    (lora/recomputed_mlp.py; get_peft_model(mlp_row_blocks=...), which checks the value). 1 (the
    default) is the same bits as checkpointing lora_mlp; more lowers the MLP's memory peak at the
    cost of more, smaller GEMMs (H200, 8B QLoRA 2 x 2048, graphed: 4 blocks -0.16 GiB of graph
    pool, 3-4% slower; BENCHMARKS.md)."""
    mlp._velotune_row_blocks = blocks


# False: recompute="mlp" checkpoints lora_mlp with torch's checkpoint instead (the path before
# lora/recomputed_mlp.py; the same bits with one row block), for A/B runs.
RECOMPUTED_MLP = True


def mlp_forward(self, x):
    """Replacement for `<Family>MLP.forward`: x [..., H] -> [..., H]."""
    plan = _plan(self)
    if _CHECKPOINTED[0] and torch.is_grad_enabled():
        if RECOMPUTED_MLP and plan is not None and _frozen_bases(plan):   # saves x only, recomputes in backward
            gate_up, down, act = plan
            shape = x.shape
            blocks = getattr(self, "_velotune_row_blocks", 1)
            return lora_mlp_recomputed(x.reshape(-1, shape[-1]), gate_up, down, act, blocks).view(shape)
        # the fused MLP draws no random numbers (LoRA dropout sends it to the stock path), so its
        # recompute needs no RNG state saved and restored (host time per layer and step)
        return checkpoint(recomputes_without_mlp_values(_mlp_forward), self, plan, x, use_reentrant=False,
                          preserve_rng_state=plan is None)
    return _mlp_forward(self, plan, x)


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


def _mlp_forward(self, plan, x):
    if plan is None:
        return self._velotune_stock_forward(x)
    gate_up, down, act = plan
    shape = x.shape
    skip = _VALUES_UNUSED[0] and not self._velotune_spec.sandwich_norms
    return lora_mlp(x.reshape(-1, shape[-1]), gate_up, down, act, values_unused=skip).view(shape)
