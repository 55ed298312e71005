"""The LoRA MLP as one autograd Function that saves only its input and recomputes in backward,
optionally a block of rows at a time: the recompute="mlp" path (train/saved_offload.py), where it
replaces a torch checkpoint around lora_mlp.

    Y = lora_mlp_recomputed(X, gate_up, down, act, chunks=1)     # X [N, H] -> Y [N, H]

Same math, same kernels, same order as the checkpointed lora_mlp (fused.py), so with chunks=1 the
loss and every gradient are the same bits (tests/lora/test_recomputed_mlp.py):

  forward   gate, up = X Wg^T (+ s XA_g B_g^T), ...;  h = act(gate) * up;  hA = h A_d^T
            Y = h Wd^T + s hA B_d^T                                     saves X only
  backward  dh  = dY Wd                     [N, I], all rows, before the recompute (as the
                                            checkpoint's backward runs it: its node saves nothing)
            dhA = s dY B_d                  [N, r]
            then per block of rows (chunks of N):
            gate, up = recomputed           (Wg / Wu dequantised by the first block, kept by the
                                            weight buffers for the others and for dX: no extra
                                            dequantisation)
            hA  = h A_d^T                   (glu_lora_project: h made per tile, never stored)
            dB_d += s dY^T hA;  dA_d += dhA^T h   (glu_lora_a_grad)
            dgate, dup = GLU backward of dh + dhA A_d, in place over gate / up
            dX rows, and the gate/up adapters' gradients (fused.group_backward)

Memory, 8B at 2 x 2048 tokens, [N, I] = 112 MiB: the forward writes h over gate, so its peak is Wg,
Wu, gate and up (4 x 112 MiB; lora_mlp's forward also holds h: 5). At the backward's peak the
checkpointed lora_mlp holds Wg, Wu, gate, up and dh (5 x 112 MiB); this Function with chunks=4, Wg,
Wu, dh and a quarter of gate and up (3.5 x 112 MiB). Gradients summed over blocks accumulate in fp32
(one rounding per block's GEMM, then one at the end), so chunks > 1 is not bit-identical to
chunks=1, only as exact.
Only for frozen base weights and biases (LoRA / QLoRA); full fine-tuning keeps lora_mlp.
"""
from __future__ import annotations

from typing import Sequence

import torch

from velotune.lora.fused import _flat_params, _joined, _scale, _weight, group_backward, mlp_in
from velotune.lora.layers import Proj


def _params(gate_up, down) -> list:
    """The Function's tensor inputs after X: W, b, A, B per gate/up projection, then the down adapter."""
    return _flat_params(gate_up) + [down.A, down.B]


class _RecomputedMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, X, gate_up, down, act, chunks, *params):
        from velotune.kernels.glu import glu_forward, glu_lora_project

        gate, up, _, _, A = mlp_in(X, gate_up, down.A)
        hA = None if A is None else glu_lora_project(gate, up, A, act)        # as _MLPIn: from gate, up
        h = glu_forward(gate, up, act, out=gate)     # over gate, its last reader being the line above:
        del gate, up                                 # Wg, Wu, gate, up at the peak, not also h
        W = _weight(down, h.dtype)                                             # as _LoRAUp, _BaseDown
        b = None if down.bias is None else down.bias.to(h.dtype)
        if hA is None:
            Y = torch.nn.functional.linear(h, W, b)
        else:
            c = _scale(torch.mm(hA, down.B.to(hA.dtype).t()), down.scaling)
            Y = torch.addmm(c, h, W.t())
            if b is not None:
                Y.add_(b)
        ctx.save_for_backward(X)
        ctx.gate_up, ctx.down, ctx.act, ctx.chunks = gate_up, down, act, chunks
        return Y

    @staticmethod
    def backward(ctx, dY):
        from velotune.kernels.glu import glu_backward, glu_lora_a_grad, glu_lora_project

        (X,) = ctx.saved_tensors
        gate_up, down, act = ctx.gate_up, ctx.down, ctx.act
        needs = ctx.needs_input_grad[5:]
        n_gu = 4 * len(gate_up)
        need_dA, need_dB = (needs[n_gu], needs[n_gu + 1]) if down.A is not None else (False, False)
        dh = dY @ _weight(down, dY.dtype)
        dhA = None if down.A is None else _scale(dY @ down.B.to(dY.dtype), down.scaling)
        N = X.shape[0]
        step = max(1, -(-N // max(1, ctx.chunks)))
        one = step >= N
        dX = torch.empty_like(X) if ctx.needs_input_grad[0] and not one else None   # one block: its own dX
        acc: list = [None] * (n_gu + 2)                # fp32 sums over the row blocks (chunks > 1)
        out: list = [None] * (n_gu + 2)
        for a in range(0, N, step):
            rows = slice(a, min(N, a + step))
            Xc, dYc, dhc = (X, dY, dh) if one else (X[rows], dY[rows], dh[rows])
            gate, up, XA, casts, A = mlp_in(Xc, gate_up, down.A)
            lora = None
            if A is not None:
                dhAc = dhA if one else dhA[rows]
                hA = glu_lora_project(gate, up, A, act)
                if need_dB:
                    out[n_gu + 1] = _scale(dYc.t() @ hA, down.scaling)
                if need_dA:
                    out[n_gu] = glu_lora_a_grad(dhAc, gate, up, act)
                lora = (dhAc, A.to(dhc.dtype))
            dgate, dup = glu_backward(dhc, gate, up, act, lora=lora)
            dYs = (dgate, dup) if len(gate_up) == 2 else (_joined(dgate, dup),)
            dXc, grads = group_backward(Xc, XA, gate_up, dYs, needs[:n_gu], ctx.needs_input_grad[0], casts)
            out[:n_gu] = grads
            if one:
                dX = dXc
                break
            if dX is not None:
                dX[rows] = dXc
            for i, g in enumerate(out):
                if g is not None:
                    acc[i] = g.float() if acc[i] is None else acc[i].add_(g)
        final = out if one else acc
        grads = [None if g is None else g.to(p.dtype) for g, p in zip(final, _params(gate_up, down))]
        return (dX, None, None, None, None, *grads)


def lora_mlp_recomputed(X: torch.Tensor, gate_up: Sequence[Proj], down: Proj, act: str,
                        chunks: int = 1) -> torch.Tensor:
    """X [N, H] -> [N, H] through _RecomputedMLP (see the module docstring). Base weights and biases
    must be frozen."""
    return _RecomputedMLP.apply(X, tuple(gate_up), down, act, chunks, *_params(gate_up, down))
