"""The LoRA MLP as one autograd Function that saves only its input and recomputes in backward,
optionally a block of rows at a time: the recompute="mlp" path (memory/saved_offload.py), where it
replaces a torch checkpoint around lora_mlp.

    Y = lora_mlp_recomputed(X, gate_up, down, act, chunks=1)     # X [N, H] -> Y [N, H]

Same math, same kernels, same order as the checkpointed lora_mlp (fused.py), so with chunks=1 the
loss and every gradient are the same bits (tests/lora/test_recomputed_mlp.py):

  forward   gate, up = X Wg^T (+ s XA_g B_g^T), ...;  h = act(gate) * up;  hA = h A_d^T
            (per block of rows with chunks > 1: h and hA written a block at a time)
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

Memory, 8B at 2 x 2048 tokens, [N, I] = 112 MiB. Forward: one block writes h over gate, so its
peak is Wg, Wu, gate and up (4 x 112 MiB; lora_mlp's forward also holds h: 5); with chunks=4 it is
Wg, Wu, h and a quarter of gate and up (3.5 x 112). Backward: the checkpointed lora_mlp holds Wg, Wu,
gate, up and dh (5 x 112 MiB); this Function with chunks=4, Wg, Wu, dh and a quarter of gate and up
(3.5 x 112; a block's tensors are gone before the next block's are made). Gradients summed over
blocks accumulate in fp32 (one rounding per block's GEMM, then one at the end), and a block's GEMMs
may round differently from the whole's, so chunks > 1 is not bit-identical to chunks=1, only as
exact; the backward's blocks recompute gate and up exactly as the forward's blocks made them.
Only for frozen base weights and biases (LoRA / QLoRA); full fine-tuning keeps lora_mlp.
"""

from __future__ import annotations

from typing import Sequence

import torch

from velotune.lora.fused import flat_params, joined, scale_in_place, weight_in, group_backward, mlp_in
from velotune.lora.layers import Proj
from velotune.quant.weights import WEIGHT_BUFFERS


def _params(gate_up, down) -> list:
    """The Function's tensor inputs after X: W, b, A, B per gate/up projection, then the down adapter."""
    return flat_params(gate_up) + [down.A, down.B]


class _RecomputedMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, X, gate_up, down, act, chunks, *params):
        h, hA = _hidden(X, gate_up, down, act, _blocks(X.shape[0], chunks))
        WEIGHT_BUFFERS.drop_local()  # in a graph capture: Wg / Wu leave the pool before Wd comes
        W = weight_in(down, h.dtype)  # as _LoRAUp, _BaseDown
        b = None if down.bias is None else down.bias.to(h.dtype)
        if hA is None:
            Y = torch.nn.functional.linear(h, W, b)
        else:
            c = scale_in_place(torch.mm(hA, down.B.to(hA.dtype).t()), down.scaling)
            Y = c.addmm_(h, W.t())  # as torch.addmm(c, h, W^T), the same GEMM, without a second [N, H]
            if b is not None:
                Y.add_(b)
        ctx.save_for_backward(X)
        ctx.gate_up, ctx.down, ctx.act, ctx.chunks = gate_up, down, act, chunks
        return Y

    @staticmethod
    def backward(ctx, dY):
        (X,) = ctx.saved_tensors
        gate_up, down, act = ctx.gate_up, ctx.down, ctx.act
        needs = ctx.needs_input_grad[5:]
        n_gu = 4 * len(gate_up)
        need_dA, need_dB = (needs[n_gu], needs[n_gu + 1]) if down.A is not None else (False, False)
        dh = dY @ weight_in(down, dY.dtype)
        dhA = None if down.A is None else scale_in_place(dY @ down.B.to(dY.dtype), down.scaling)
        blocks = _blocks(X.shape[0], ctx.chunks)
        if len(blocks) == 1:
            dX, grads = _block_backward(
                X, dY, dh, dhA, gate_up, down, act, needs[:n_gu], need_dA, need_dB, ctx.needs_input_grad[0]
            )
        else:
            dX = torch.empty_like(X) if ctx.needs_input_grad[0] else None
            grads = [None] * (n_gu + 2)  # fp32 sums over the row blocks
            for rows in blocks:
                dXc, out = _block_backward(
                    X[rows],
                    dY[rows],
                    dh[rows],
                    None if dhA is None else dhA[rows],
                    gate_up,
                    down,
                    act,
                    needs[:n_gu],
                    need_dA,
                    need_dB,
                    ctx.needs_input_grad[0],
                )
                if dX is not None:
                    dX[rows] = dXc
                del dXc  # this block's tensors go before the next block's
                for i, g in enumerate(out):
                    if g is not None:
                        grads[i] = g.float() if grads[i] is None else grads[i].add_(g)
        grads = [None if g is None else g.to(p.dtype) for g, p in zip(grads, _params(gate_up, down))]
        return (dX, None, None, None, None, *grads)


def _blocks(N: int, chunks: int) -> list[slice]:
    """ceil(N / chunks)-row slices covering N rows (one slice when chunks <= 1)."""
    step = max(1, -(-N // max(1, chunks)))
    return [slice(a, min(N, a + step)) for a in range(0, N, step)] or [slice(0, N)]


def _hidden(X, gate_up, down, act, blocks):
    """h = act(gate) * up [N, I] and hA = h A_d^T [N, r] (None without a down adapter), a row block
    at a time: per block gate and up are made, hA taken from them (glu_lora_project) and h written
    over gate (one block) or into its rows of h (several). Peak: Wg, Wu, h and one block's gate and
    up; one block: Wg, Wu, gate, up (h is gate)."""
    from velotune.kernels.glu import glu_forward, glu_lora_project

    if len(blocks) == 1:
        gate, up, _, _, A = mlp_in(X, gate_up, down.A)
        hA = None if A is None else glu_lora_project(gate, up, A, act)  # as _MLPIn: from gate, up
        return glu_forward(gate, up, act, out=gate), hA  # gate's last reader was hA
    h = hA = None
    for rows in blocks:
        gate, up, _, _, A = mlp_in(X[rows], gate_up, down.A)
        if h is None:
            h = gate.new_empty((X.shape[0], gate.shape[1]))
            hA = None if A is None else gate.new_empty((X.shape[0], A.shape[0]))
        if A is not None:
            hA[rows] = glu_lora_project(gate, up, A, act)
        hc = glu_forward(gate, up, act, out=h[rows])  # rows of a contiguous h: written in place
        if hc.data_ptr() != h[rows].data_ptr():
            h[rows] = hc
        del hc, gate, up
    return h, hA


def _block_backward(X, dY, dh, dhA, gate_up, down, act, needs_gu, need_dA, need_dB, need_dX):
    """One row block of the backward: gate and up recomputed, the down adapter's gradients, the GLU
    backward in place over gate / up, dX rows and the gate/up adapters' gradients.
    Returns (dX rows or None, [gate/up grads..., dA_d, dB_d]); the block's [rows, I] tensors die here."""
    from velotune.kernels.glu import glu_backward, glu_lora_a_grad, glu_lora_project

    gate, up, XA, casts, A = mlp_in(X, gate_up, down.A)
    dA = dB = lora = None
    if A is not None:
        hA = glu_lora_project(gate, up, A, act)
        if need_dB:
            dB = scale_in_place(dY.t() @ hA, down.scaling)
        if need_dA:
            dA = glu_lora_a_grad(dhA, gate, up, act)
        lora = (dhA, A.to(dh.dtype))
    dgate, dup = glu_backward(dh, gate, up, act, lora=lora)
    dYs = (dgate, dup) if len(gate_up) == 2 else (joined(dgate, dup),)
    dX, grads = group_backward(X, XA, gate_up, dYs, needs_gu, need_dX, casts)
    return dX, [*grads, dA, dB]


def lora_mlp_recomputed(
    X: torch.Tensor, gate_up: Sequence[Proj], down: Proj, act: str, chunks: int = 1
) -> torch.Tensor:
    """X [N, H] -> [N, H] through _RecomputedMLP (see the module docstring). Base weights and biases
    must be frozen."""
    return _RecomputedMLP.apply(X, tuple(gate_up), down, act, chunks, *_params(gate_up, down))
