"""Fused LoRA forward for one PEFT LoRA `Linear` on its own (the generic path, models/generic.py).

    y = x @ W^T + b + s * (x @ A^T) @ B^T      x [..., in] -> y [..., out], in x's dtype

One autograd function (lora/fused.py `lora_projections` with a single projection) instead of PEFT's
base call, input cast, two adapter calls, scaling and add: the adapters are cast to the compute
dtype once (r x d, tiny), the adapter product is added in place into the base GEMM's output, and the
backward is the hand-written one. Saved: x and x @ A^T (N x r), as PEFT's own graph keeps.
Falls back to the module's stock forward whenever `resolve` says the layer cannot take the fused path
right now (dropout in training, DoRA, several adapters, merged, hooks...), or for extra arguments.
"""

from __future__ import annotations

from velotune.lora import lora_projections, resolve


def lora_linear_forward(self, x, *args, **kwargs):
    """Replacement for a PEFT `lora.Linear.forward` (bound per instance by models/generic.py)."""
    proj = resolve(self) if not args and not kwargs and x.dim() >= 2 else None
    if proj is None:
        return self._velotune_stock_forward(x, *args, **kwargs)
    shape = x.shape
    (y,) = lora_projections(x.reshape(-1, shape[-1]), [proj])
    return y.view(*shape[:-1], y.shape[-1])
