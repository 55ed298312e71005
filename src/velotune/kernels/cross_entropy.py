"""Cross-entropy over a large vocabulary in fp32, chunked over the vocab, without an fp32 logits copy.

    loss = cross_entropy(logits, labels, ignore_index=-100, softcap=None, logit_scale=None,
                         reduction="mean", num_items_in_batch=None)

logits [N, V] (any float dtype, rows may be strided), labels [N] int. Per row, in fp32:
    u = logits * logit_scale                     (if logit_scale)
    z = softcap * tanh(u / softcap)              (if softcap; Gemma 2 final-logit softcapping)
    loss_row = logsumexp(z) - z[label]           (0 for label == ignore_index)
Reduction: num_items_in_batch given -> sum / num_items_in_batch (transformers' ForCausalLMLoss);
else "mean" -> sum / #non-ignored (NaN when every row is ignored, like F.cross_entropy), "sum" -> sum.

Derivation of the backward (p = softmax(z), y = onehot(label)):
    dloss_row/dz = p - y
    dz/du = 1 - tanh^2(u/softcap) = 1 - (z/softcap)^2        (1 without softcap)
    du/dx = logit_scale                                       (1 without scale)
    dlogits = coef * (p - y) * dz/du * du/dx,   coef = grad_output / denominator, 0 on ignored rows.
The forward saves only lse [N] (fp32); the backward recomputes p = exp(z - lse) chunk by chunk.
Kernels loop over the vocab in BLOCK-wide chunks with an online max/sum, so any V works (262144+).
One kernel, launched once per pass (FORWARD, then BACKWARD), run in place on a chunk of logits, is the
core of fused_linear_ce.
Labels outside [0, V) other than ignore_index are not checked on the GPU (no host sync); they give
a meaningless loss instead of an error. The CPU path (F.cross_entropy) raises for them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from velotune.kernels import triton_enabled

MAX_BLOCK = 8192


def _check(logits, labels, reduction):
    if logits.dim() != 2 or labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(
            f"cross_entropy: need logits [N, V] and labels [N], got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    if reduction not in ("mean", "sum"):
        raise ValueError(f"cross_entropy: reduction must be 'mean' or 'sum', got {reduction!r}")


def transform_logits_reference(logits, softcap=None, logit_scale=None):
    """fp32 logits after logit scaling and softcapping (Gemma2: tanh(x / cap) * cap).
    (float64 logits stay float64, for references.)"""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if logit_scale is not None:
        z = z * logit_scale
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    return z


def cross_entropy_reference(
    logits, labels, *, ignore_index=-100, softcap=None, logit_scale=None, reduction="mean", num_items_in_batch=None
):
    """Plain PyTorch, matching transformers' ForCausalLMLoss / fixed_cross_entropy on shifted labels."""
    _check(logits, labels, reduction)
    z = transform_logits_reference(logits, softcap, logit_scale)
    if num_items_in_batch is not None:
        loss = F.cross_entropy(z, labels, ignore_index=ignore_index, reduction="sum")
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        return loss / num_items_in_batch
    return F.cross_entropy(z, labels, ignore_index=ignore_index, reduction=reduction)


def cross_entropy(
    logits, labels, *, ignore_index=-100, softcap=None, logit_scale=None, reduction="mean", num_items_in_batch=None
):
    """Scalar fp32 loss (see module docstring). CUDA -> Triton, CPU -> reference."""
    _check(logits, labels, reduction)
    if not triton_enabled(logits):
        return cross_entropy_reference(
            logits,
            labels,
            ignore_index=ignore_index,
            softcap=softcap,
            logit_scale=logit_scale,
            reduction=reduction,
            num_items_in_batch=num_items_in_batch,
        )
    return _CrossEntropy.apply(logits, labels, ignore_index, softcap, logit_scale, reduction, num_items_in_batch)


# ----------------------------------------------------------------------------------------------------
# Triton kernels, one program per row, looping over the vocab
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _tanh(x):
    # tanh from exp (libdevice.tanh is unavailable under the interpreter): for |x| >= 1/16
    # tanh|x| = (1 - e) / (1 + e), e = exp(-2|x|) (no overflow); below, the odd Taylor series to x^9
    # (the exp form would lose relative precision to cancellation there).
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    big = (1.0 - e) / (1.0 + e)
    x2 = ax * ax
    small = ax * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
    t = tl.where(ax < 0.0625, small, big)
    return tl.where(x < 0, -t, t)


@triton.jit
def logit_transform(x, scale, cap, HAS_SCALE: tl.constexpr, HAS_CAP: tl.constexpr):
    """(z, dz/dx) for fp32 logits x: scale, then softcap (the row kernels here and in fused_linear_logprob.py)."""
    d = tl.full(x.shape, 1.0, tl.float32)
    if HAS_SCALE:
        x = x * scale
        d = d * scale
    if HAS_CAP:
        t = _tanh(x / cap)
        x = t * cap
        d = d * (1.0 - t * t)
    return x, d


@triton.jit
def row_logsumexp(
    L,
    V,
    target,
    scale,
    cap,
    inv_t,
    HAS_SCALE: tl.constexpr,
    HAS_CAP: tl.constexpr,
    WANT_PZ: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One pass over the row L[0:V] in BLOCK-wide chunks with an online max / sum, z = logit_transform(L) * inv_t
    in fp32. Returns (lse = logsumexp(z), z[target] (-inf for target in [V, V rounded up to BLOCK), 0 outside),
    sum(softmax(z) * z) with WANT_PZ, else 0.0). The row kernels here and in fused_linear_logprob.py share it."""
    cols = tl.arange(0, BLOCK)
    m = float("-inf")
    s = 0.0
    sz = 0.0
    zt = 0.0
    for start in range(0, V, BLOCK):
        mask = start + cols < V
        x = tl.load(L + start + cols, mask=mask, other=0.0).to(tl.float32)
        z, _ = logit_transform(x, scale, cap, HAS_SCALE, HAS_CAP)
        z = z * inv_t
        zm = tl.where(mask, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(zm, axis=0))
        r = tl.exp(m - m_new)
        e = tl.exp(zm - m_new)
        s = s * r + tl.sum(e, axis=0)
        if WANT_PZ:
            sz = sz * r + tl.sum(tl.where(mask, e * z, 0.0), axis=0)
        m = m_new
        zt += tl.sum(tl.where(start + cols == target, zm, 0.0), axis=0)
    return m + tl.log(s), zt, sz / s


@triton.jit
def _ce_rows_kernel(
    L,
    sl,
    G,
    sg,
    LABELS,
    LOSS,
    LSE,
    COEF,
    V,
    ignore_index,
    scale,
    cap,
    HAS_SCALE: tl.constexpr,
    HAS_CAP: tl.constexpr,
    FORWARD: tl.constexpr,
    BACKWARD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """FORWARD: LOSS[row] = lse - z[label] (0 if ignored), LSE[row] = lse = logsumexp(z), online over vocab
    chunks; else lse is read from LSE[row]. BACKWARD: G[row] = coef * (softmax(z) - onehot(label)) * dz/dx,
    zero rows for ignored labels. G may alias L (in place): each element is read before it is written, by
    the same program. Pointers a phase does not use may be any tensor of the right dtype."""
    row = tl.program_id(0).to(tl.int64)
    L += row * sl
    label = tl.load(LABELS + row)
    if FORWARD:
        lse, zl, _ = row_logsumexp(L, V, label, scale, cap, 1.0, HAS_SCALE, HAS_CAP, False, BLOCK)
        tl.store(LSE + row, lse)
        tl.store(LOSS + row, tl.where(label == ignore_index, 0.0, lse - zl))
    else:
        lse = tl.load(LSE + row)
    if BACKWARD:
        G += row * sg
        coef = tl.load(COEF)
        coef = tl.where(label == ignore_index, 0.0, coef)
        cols = tl.arange(0, BLOCK)
        for start in range(0, V, BLOCK):
            mask = start + cols < V
            x = tl.load(L + start + cols, mask=mask, other=0.0).to(tl.float32)
            z, dz = logit_transform(x, scale, cap, HAS_SCALE, HAS_CAP)
            p = tl.exp(z - lse)
            p = tl.where(start + cols == label, p - 1.0, p)
            g = tl.where(coef == 0.0, 0.0, coef * p * dz)  # ignored rows: exact zeros, even if coef = inf
            tl.store(G + start + cols, g.to(G.dtype.element_ty), mask=mask)


def _block(V: int) -> int:
    return min(triton.next_power_of_2(V), MAX_BLOCK)


def _num_warps(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


def transform_args(softcap, logit_scale, V):
    """The trailing arguments of a row kernel over the vocab (both here, fused_linear_logprob.py's): the
    (scale, cap) values, then their constexpr flags, the vocab block and the warp count."""
    block = _block(V)
    values = (1.0 if logit_scale is None else float(logit_scale), 1.0 if softcap is None else float(softcap))
    meta = dict(
        HAS_SCALE=logit_scale is not None, HAS_CAP=softcap is not None, BLOCK=block, num_warps=_num_warps(block)
    )
    return values, meta


def _launch_rows(logits, out, labels, loss, lse, coef, ignore_index, softcap, logit_scale, forward):
    """_ce_rows_kernel over the N rows of logits, its forward phase or (forward=False) its backward one."""
    N, V = logits.shape
    if N:
        values, meta = transform_args(softcap, logit_scale, V)
        _ce_rows_kernel[(N,)](
            logits,
            logits.stride(0),
            out,
            out.stride(0),
            labels,
            loss,
            lse,
            coef,
            V,
            ignore_index,
            *values,
            FORWARD=forward,
            BACKWARD=not forward,
            **meta,
        )


def ce_forward_rows(logits, labels, ignore_index, softcap, logit_scale):
    """Per-row (loss [N], lse [N]) fp32 via the Triton kernel. logits [N, V] with unit column stride."""
    N = logits.shape[0]
    loss = torch.empty(N, dtype=torch.float32, device=logits.device)
    lse = torch.empty(N, dtype=torch.float32, device=logits.device)
    _launch_rows(logits, logits, labels, loss, lse, lse, ignore_index, softcap, logit_scale, forward=True)
    return loss, lse


def ce_backward_rows(logits, labels, lse, coef, ignore_index, softcap, logit_scale, out):
    """out [N, V] = dloss/dlogits scaled by the 0-dim fp32 tensor `coef`; `out` may be `logits`."""
    _launch_rows(logits, out, labels, lse, lse, coef, ignore_index, softcap, logit_scale, forward=False)
    return out


def loss_denominator(labels, ignore_index, reduction, num_items_in_batch):
    """0-dim fp32 tensor the summed loss is divided by (on labels' device, no host sync)."""
    if num_items_in_batch is not None:
        return torch.as_tensor(num_items_in_batch, device=labels.device).to(torch.float32)
    if reduction == "mean":
        return (labels != ignore_index).sum().to(torch.float32)
    return torch.ones((), dtype=torch.float32, device=labels.device)


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index, softcap, logit_scale, reduction, num_items):
        x = logits if logits.stride(-1) == 1 else logits.contiguous()
        labels = labels.contiguous()
        rows, lse = ce_forward_rows(x, labels, ignore_index, softcap, logit_scale)
        denom = loss_denominator(labels, ignore_index, reduction, num_items)
        ctx.save_for_backward(x, labels, lse, denom)
        ctx.args = (ignore_index, softcap, logit_scale)
        return rows.sum() / denom

    @staticmethod
    def backward(ctx, grad):
        x, labels, lse, denom = ctx.saved_tensors
        ignore_index, softcap, logit_scale = ctx.args
        coef = (grad.float() / denom).reshape(())
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        ce_backward_rows(x, labels, lse, coef, ignore_index, softcap, logit_scale, out)
        return out, None, None, None, None, None, None
