"""Fused LoRA autograd functions with hand-written backward passes.

Every projection here is `Y = X @ W^T + b + s * (X @ A^T) @ B^T` with W frozen (LoRA) or trainable
(full fine-tuning), A [r, in], B [out, r], r small. Shapes: X [N, in] with N = batch * seq.

Forward, for a group of projections that read the same X (q/k/v, or gate/up):
    XA = X @ cat(A_i)^T                    [N, sum r_i]   one GEMM for every adapter of the group
    Y_i = X @ W_i^T + b_i                  [N, out_i]     the base GEMM
    Y_i += s_i * XA_i @ B_i^T                             addmm_ into Y_i (no temporary [N, out])

Backward (derivation: dL/dX of X@M^T is dY@M; dL/dM is dY^T@X), ordered so that every product
with a large dimension goes through the rank r:
    dB_i  = s_i * dY_i^T @ XA_i            [out, r]   (uses the saved XA, not X)
    dXA_i = s_i * dY_i @ B_i               [N, r]
    dA    = dXA^T @ X                      [sum r, in]  one GEMM for the group
    dX    = sum_i dY_i @ W_i  +  dXA @ cat(A_i)          (addmm_ accumulation, one [N, in] buffer)
    dW_i  = dY_i^T @ X,  db_i = sum_N dY_i               (only when W_i / b_i require grad)
Saved: X and XA (N x sum r) per group, and the adapters cast to the compute dtype (r x d, so backward does
not cast them again). W is never saved: it is re-read with `get_base_weight` in
backward, so 4-bit layers dequantise into a shared buffer instead of keeping a copy alive.

The MLP keeps gate and up (needed by the activation's backward) and recomputes h = act(gate) * up
in backward instead of saving it (one elementwise pass, saves N x I). It is split into three
functions ordered so that checkpoint recomputation can skip the down projection (see lora_mlp).
Everything runs in X's dtype (the compute dtype): no fp32 casts of the LoRA branch.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from velotune.lora.layers import Proj
from velotune.quant import get_base_weight


def weight_in(p: Proj, dtype: torch.dtype) -> torch.Tensor:
    w = get_base_weight(p.base)
    return w if w.dtype == dtype else w.to(dtype)


def scale_in_place(t: torch.Tensor, s: float) -> torch.Tensor:
    """t *= s in place; nothing when s == 1 (lora_alpha == r, the common setting): x * 1.0 == x
    exactly, and the step saves a kernel launch per use (a training step is bound by host time,
    see docs/perf-notes.md)."""
    return t if s == 1.0 else t.mul_(s)


def _mm_to(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, s: float) -> torch.Tensor:
    """s * (a @ b) in `dtype`: an adapter's gradient (fp32 master weights) from compute-dtype
    operands. On CUDA, bf16/fp16 operands and an fp32 result: cuBLAS writes its fp32 accumulator
    directly (torch.mm out_dtype), so there is no rounding to the compute dtype first and no cast
    kernel after (8B: ~10 fewer graph nodes per layer backward). Elsewhere: the GEMM in the
    operands' dtype, then the cast."""
    if a.is_cuda and dtype == torch.float32 and a.dtype in (torch.bfloat16, torch.float16) and b.dtype == a.dtype:
        return scale_in_place(torch.mm(a, b, out_dtype=torch.float32), s)
    return scale_in_place(a @ b, s).to(dtype)


def _cast_together(tensors: Sequence[torch.Tensor], dtype: torch.dtype):
    """`tensors` (adapter weights, r x d each) in `dtype`, as views of ONE new flat buffer filled by
    one concatenation and one cast: a group's adapters cost two kernel launches instead of one cast
    each (see docs/perf-notes.md). Same values as `t.to(dtype)`.
    Returns (casts, flat buffer); when every tensor is already in `dtype`: (tensors, None)."""
    if all(t.dtype == dtype for t in tensors):
        return list(tensors), None
    # one concatenation (CatArrayBatchedCopy: a grid over every element) and one cast. A multi-tensor
    # copy (`torch._foreach_copy_`) is one kernel too, but it gives each 64K-element chunk of each
    # tensor one thread block: 8B's groups are ~6 chunks, slower per group (docs/perf-notes.md)
    flat = torch.cat([t.reshape(-1) for t in tensors]).to(dtype)
    out, off = [], 0
    for t in tensors:
        out.append(flat[off : off + t.numel()].view(t.shape))
        off += t.numel()
    return out, flat


def _group_casts(projs: Sequence[Proj], dtype: torch.dtype, extra: Sequence[torch.Tensor] = ()):
    """(cat(A_i) [sum r, in] or None, [B_i or None per projection], [extra...]) in `dtype`.

    The A_i go first into the flat buffer, so their concatenation along dim 0 is a view of it."""
    As = [p.A for p in projs if p.A is not None]
    Bs = [p.B for p in projs if p.A is not None]
    casts, flat = _cast_together(As + Bs + list(extra), dtype)
    nA, nB = len(As), len(Bs)
    if nA == 0:
        A = None
    elif nA == 1:
        A = casts[0]
    elif flat is None:  # no cast needed: concatenate (a copy)
        A = torch.cat(casts[:nA], 0)
    else:  # consecutive rows of the flat buffer
        A = flat[: sum(a.numel() for a in As)].view(-1, As[0].shape[1])
    Bi = iter(casts[nA : nA + nB])
    return A, [next(Bi) if p.A is not None else None for p in projs], casts[nA + nB :]


def _cat_A(projs: Sequence[Proj], dtype: torch.dtype) -> torch.Tensor | None:
    return _group_casts(projs, dtype)[0]


def group_forward(X: torch.Tensor, projs: Sequence[Proj], extra: Sequence[torch.Tensor] = ()):
    """X [N, in] -> ([Y_i [N, out_i]], XA [N, sum r] or None, casts[, extra casts]).

    casts: the adapters in X's dtype as forward used them, (cat(A_i) [sum r, in], B_i [out_i, r]...);
    saving them lets backward skip casting again. They are r x d: tiny. All of them (and `extra`,
    other adapter weights the caller wants in X's dtype, returned only when given) are cast by one
    launch (`_cast_together`).
    """
    A, Bs, extra_casts = _group_casts(projs, X.dtype, extra)
    XA = X @ A.t() if A is not None else None
    outs, off = [], 0
    for p, B in zip(projs, Bs):
        bias = p.bias if p.bias is None or p.bias.dtype == X.dtype else p.bias.to(X.dtype)
        Y = F.linear(X, weight_in(p, X.dtype), bias)
        if p.A is not None:
            r = p.A.shape[0]
            Y.addmm_(XA[:, off : off + r], B.t(), alpha=p.scaling)
            off += r
        outs.append(Y)
    if extra:
        return outs, XA, (A, *Bs), extra_casts
    return outs, XA, (A, *Bs)


def _as(t: torch.Tensor | None, param: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`param` in `dtype`: the cast forward saved (t) when it is that dtype, else a new cast."""
    return t if t is not None and t.dtype == dtype else param.to(dtype)


def group_backward(
    X, XA, projs: Sequence[Proj], dYs, needs: Sequence[bool], need_dX: bool = True, casts: Sequence | None = None
):
    """Gradients of `group_forward`. needs: 4 flags per projection (W, b, A, B); casts: what
    group_forward returned as such (optional).

    Returns (dX or None, [dW, db, dA, dB] * len(projs)), None where not needed.
    """
    casts = casts or (None,) * (len(projs) + 1)
    grads: list = []
    dX = None
    dXAs = []
    for i, (p, dY) in enumerate(zip(projs, dYs)):
        need_W, need_b, need_A, need_B = needs[4 * i : 4 * i + 4]
        if need_dX:
            W = weight_in(p, dY.dtype)
            dX = dY @ W if dX is None else dX.addmm_(dY, W)
        dW = (dY.t() @ X).to(p.base.weight.dtype) if need_W else None
        db = dY.sum(0).to(p.bias.dtype) if need_b else None
        dB = None
        if p.A is not None:
            r = p.A.shape[0]
            off = sum(q.A.shape[0] for q in projs[:i] if q.A is not None)
            if need_B:
                dB = _mm_to(dY.t(), XA[:, off : off + r], p.B.dtype, p.scaling)
            dXAs.append(scale_in_place(dY @ _as(casts[1 + i], p.B, dY.dtype), p.scaling))
        grads += [dW, db, None, dB]
    if dXAs:
        dXA = dXAs[0] if len(dXAs) == 1 else torch.cat(dXAs, 1)  # [N, sum r]
        A = casts[0] if casts[0] is not None and casts[0].dtype == X.dtype else _cat_A(projs, X.dtype)
        if need_dX:
            dX.addmm_(dXA, A)
        a_dtypes = {p.A.dtype for p in projs if p.A is not None}
        if len(a_dtypes) == 1:  # one GEMM (and cast) for the group; each dA_i is a row slice
            dA = _mm_to(dXA.t(), X, a_dtypes.pop(), 1.0)  # [sum r, in]
        else:
            dA = dXA.t() @ X
        off = 0
        for i, p in enumerate(projs):
            if p.A is not None:
                r = p.A.shape[0]
                if needs[4 * i + 2]:
                    grads[4 * i + 2] = dA[off : off + r].to(p.A.dtype)
                off += r
    return dX, grads


def flat_params(projs: Sequence[Proj]) -> list:
    """The tensors autograd must see as inputs (so it routes their gradients): W, b, A, B each."""
    out = []
    for p in projs:
        out += [p.base.weight, p.bias, p.A, p.B]
    return out


class LoRAProjections(torch.autograd.Function):
    """Several projections of one input (q/k/v, or just o): returns one output per projection."""

    @staticmethod
    def forward(ctx, X, projs, *params):
        outs, XA, casts = group_forward(X, projs)
        ctx.projs = projs
        ctx.save_for_backward(X, XA, *casts)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *dYs):
        X, XA, *casts = ctx.saved_tensors
        dX, grads = group_backward(X, XA, ctx.projs, dYs, ctx.needs_input_grad[2:], ctx.needs_input_grad[0], casts)
        return (dX, None, *grads)


def lora_projections(X: torch.Tensor, projs: Sequence[Proj]) -> tuple[torch.Tensor, ...]:
    """X [N, in] -> tuple of Y_i [N, out_i], through the fused function."""
    return LoRAProjections.apply(X, tuple(projs), *flat_params(projs))


def mlp_in(X: torch.Tensor, gate_up: Sequence[Proj], A_down: torch.Tensor | None):
    """(gate, up, XA, casts, A_down in X's dtype or None) for rows X [N, H]: the gate/up group, with the
    down adapter's A cast by the same launch (group_forward's `extra`). gate / up: [N, I] each (the
    halves of Phi-3's one [gate | up] output)."""
    if A_down is None:
        gu, XA, casts = group_forward(X, gate_up)
        A = None
    else:
        gu, XA, casts, (A,) = group_forward(X, gate_up, extra=(A_down,))
    gate, up = gu if len(gu) == 2 else gu[0].chunk(2, dim=-1)
    return gate, up, XA, casts, A


class _MLPIn(torch.autograd.Function):
    """X -> (h = act(gate) * up, hA = h @ A_down^T): the gate/up group, the GLU, and the down adapter's A.

    Saves X, XA (gate/up adapters), gate and up; h is recomputed in backward, never saved.
    hA comes from gate and up (`glu_lora_project`; on the GPU h is made per tile, never stored), so it
    is the same bits whether h is made or not. h_unused (a recompute, where nothing reads h's values,
    see lora_mlp): h is not made at all and its output is a stand-in of its shape that holds no
    memory; backward never reads h.
    """

    @staticmethod
    def forward(ctx, X, gate_up, act, A_down, h_unused, *params):
        from velotune.kernels.glu import glu_forward, glu_lora_project

        gate, up, XA, casts, A = mlp_in(X, gate_up, A_down)
        h = None if h_unused else glu_forward(gate, up, act)
        hA = None if A is None else glu_lora_project(gate, up, A, act, h=h)
        if h is None:  # [N, I] of one element: checkpoint's recompute compares shapes and dtypes only
            h = gate.new_empty(1).expand(gate.shape)
        ctx.gate_up, ctx.act = gate_up, act
        ctx.a_dtype = None if A_down is None else A_down.dtype
        ctx.save_for_backward(X, XA, gate, up, A, *casts)
        return h, hA

    @staticmethod
    def backward(ctx, dh, dhA):
        from velotune.kernels.glu import glu_backward, glu_lora_a_grad

        X, XA, gate, up, A_down, *casts = ctx.saved_tensors  # A_down: in the compute dtype
        dA_down, lora = None, None
        if A_down is not None and dhA is not None:
            if ctx.needs_input_grad[3]:  # [r, I] = dhA^T @ h, h recomputed on the fly
                dA_down = glu_lora_a_grad(dhA, gate, up, ctx.act).to(ctx.a_dtype)
            lora = (dhA, A_down.to(dh.dtype))  # dh += dhA @ A_down (.to: no-op usually)
        # gate / up (and, on the GPU, dh + dhA @ A_down) become dgate / dup in place: at this, the MLP
        # backward's memory peak, the only [N, I] tensors alive are gate, up and dh
        dgate, dup = glu_backward(dh, gate, up, ctx.act, lora=lora)
        dYs = (dgate, dup) if len(ctx.gate_up) == 2 else (joined(dgate, dup),)
        dX, grads = group_backward(X, XA, ctx.gate_up, dYs, ctx.needs_input_grad[5:], ctx.needs_input_grad[0], casts)
        return (dX, None, None, dA_down, None, *grads)


def joined(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """cat((a, b), -1) for [N, I] x2; when a and b are the two halves of one [N, 2I] buffer (Phi-3's
    gate_up output, whose halves the GLU backward overwrote in place) that buffer, not a copy."""
    n, i = a.shape
    if (
        b.shape == a.shape
        and a.stride() == b.stride() == (2 * i, 1)
        and a.dtype == b.dtype
        and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
        and b.storage_offset() == a.storage_offset() + i
    ):
        return a.as_strided((n, 2 * i), (2 * i, 1), a.storage_offset())
    return torch.cat((a, b), dim=-1)


class _LoRAUp(torch.autograd.Function):
    """hA [N, r] -> s * hA @ B^T [N, out]. Saves hA (N x r)."""

    @staticmethod
    def forward(ctx, hA, B, scaling):
        ctx.scaling, ctx.b_dtype = scaling, B.dtype
        B = B.to(hA.dtype)
        ctx.save_for_backward(hA, B)  # B in the compute dtype
        return scale_in_place(torch.mm(hA, B.t()), scaling)

    @staticmethod
    def backward(ctx, dY):
        hA, B = ctx.saved_tensors
        s = ctx.scaling
        dhA = scale_in_place(dY @ B.to(dY.dtype), s) if ctx.needs_input_grad[0] else None
        dB = _mm_to(dY.t(), hA, ctx.b_dtype, s) if ctx.needs_input_grad[1] else None
        return dhA, dB, None


class _BaseDown(torch.autograd.Function):
    """(h, c) -> c + h @ W^T + b: the frozen down projection, plus whatever c the adapter produced.

    Saves nothing unless W or b is trainable (full fine-tuning: then h). So under non-reentrant
    checkpointing this is the layer's last op that saves anything only in full fine-tuning; with LoRA
    the recomputation stops after _LoRAUp and this GEMM (2*N*I*H flops) is never recomputed.
    """

    @staticmethod
    def forward(ctx, h, c, down, weight, bias, values_unused=False):
        if values_unused:  # a recompute for gradients only: nothing reads Y's values (see lora_mlp)
            Y = torch.empty((h.shape[0], down.base.out_features), dtype=h.dtype, device=h.device)
        else:
            W = weight_in(down, h.dtype)
            b = None if bias is None else bias.to(h.dtype)
            if c is None:
                Y = F.linear(h, W, b)
            else:
                Y = torch.addmm(c, h, W.t())
                if b is not None:
                    Y.add_(b)
        ctx.down = down
        ctx.has_c = c is not None
        trainable = ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
        ctx.save_for_backward(h if trainable else None)
        return Y

    @staticmethod
    def backward(ctx, dY):
        (h,) = ctx.saved_tensors
        down = ctx.down
        dh = dY @ weight_in(down, dY.dtype) if ctx.needs_input_grad[0] else None
        dW = (dY.t() @ h).to(down.base.weight.dtype) if ctx.needs_input_grad[3] else None
        db = dY.sum(0).to(down.bias.dtype) if ctx.needs_input_grad[4] else None
        return dh, (dY if ctx.has_c else None), None, dW, db, None


def lora_mlp(
    X: torch.Tensor, gate_up: Sequence[Proj], down: Proj, act: str, values_unused: bool = False
) -> torch.Tensor:
    """X [N, H] -> [N, H]: down(act(gate(X)) * up(X)) with adapters on any of the three.

    gate_up: two projections (gate, up), or one fused projection whose output is [gate | up]
    (Phi-3's gate_up_proj). act in {"silu", "gelu", "gelu_tanh"}.
    Three functions, in this order: _MLPIn (gate/up/GLU, and h @ A_down^T), _LoRAUp (the down
    adapter's B), _BaseDown (h @ W_down^T added to it) -- see _BaseDown for why this order.
    values_unused=True: the caller recomputes only to take gradients and nothing after the MLP saves
    its output (a residual add follows), so the frozen down GEMM (and its dequantisation) is skipped,
    h = act(gate) * up is not made (the down adapter's A gets it tile by tile: glu_lora_project), and
    the output holds uninitialised values; gradients are unchanged, since no backward formula
    reads them. This is what non-reentrant checkpointing's early stop saves on the eager path
    (memory/layer_graphs.py uses it for the captured recompute).
    """
    # nothing reads h's values when the MLP's output values are unused and the down weight is frozen
    h_unused = values_unused and not (
        down.base.weight.requires_grad or (down.bias is not None and down.bias.requires_grad)
    )
    h, hA = _MLPIn.apply(X, tuple(gate_up), act, down.A, h_unused, *flat_params(gate_up))
    c = _LoRAUp.apply(hA, down.B, down.scaling) if down.A is not None else None
    return _BaseDown.apply(h, c, down, down.base.weight, down.bias, values_unused)
