"""Per-token log-probabilities (and entropies) of lm_head's output without the [N, V] logits, the
gradient's vocabulary GEMM done in forward: what RL trainers (TRL's GRPO) score completions with.

    logp, ent = fused_linear_logprobs(hidden, weight, targets, bias=None, temperature=1.0,
                                      softcap=None, logit_scale=None, entropy=True,
                                      memory_budget_bytes=64 * 2**20)

hidden [N, H], weight [V, H] (lm_head layout), bias [V] or None, targets [N] int in [0, V).
Per row, in fp32 (the semantics of TRL's `add_fused_lm_head`):
    y    = hidden @ weight.T + bias              in the compute dtype (the autocast dtype under
                                                 autocast, else hidden's and weight's promoted dtype)
    z    = softcap * tanh(y * logit_scale / softcap) / temperature   (scale / softcap when given)
    logp = z[target] - logsumexp(z)              -> [N] fp32
    ent  = logsumexp(z) - sum_v softmax(z)_v z_v -> [N] fp32 (None with entropy=False)

Gradients flow to `hidden` only: lm_head must be frozen (LoRA, QLoRA) -- a weight or bias that
requires grad is refused (ValueError); callers keep another path for a trainable head.

Why it is cheaper than recomputing: d logp_n / d hidden_n does not depend on the upstream gradient,
    u_n = ((onehot(target_n) - p_n) * dz/dy_n) @ weight                              [H]
so forward computes it for each chunk of rows right after the chunk's logits (the logits buffer is
overwritten in place by (onehot - p) * dz/dy, then one GEMM) and keeps u [N, H] in fp32; backward is
d_hidden = grad_logp[:, None] * u. Two vocabulary-sized GEMMs per chunk in all, where a head that
recomputes the logits in backward runs three. The entropy's gradient (an entropy bonus in the loss)
is not precomputed: when it arrives, backward recomputes each chunk's logits for it. Without grad
(scoring under no_grad: old or reference log-probs) forward runs one GEMM per chunk.

Rows are processed in chunks of C = memory_budget_bytes // (V * itemsize) (every row of a chunk
carries the whole vocabulary). CUDA runs a Triton kernel per chunk (one program per row: an online
max / sum over the vocabulary, then the gradient row in place); CPU runs the same math in torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from velotune.kernels import triton_enabled
from velotune.kernels.cross_entropy import (
    logit_transform,
    row_logsumexp,
    transform_args,
    transform_logits_reference,
)
from velotune.kernels.fused_linear_ce import check_head_args, chunk_rows

DEFAULT_BUDGET = 64 * 2**20  # bytes of logits one chunk may hold


# ----------------------------------------------------------------------------------------------------
# the per-chunk pass: Triton on CUDA, the same math in torch on CPU
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _logprob_rows_kernel(
    L,
    sl,
    TARGETS,
    LOGP,
    ENT,
    LSE,
    V,
    scale,
    cap,
    inv_t,
    HAS_SCALE: tl.constexpr,
    HAS_CAP: tl.constexpr,
    WANT_ENT: tl.constexpr,
    WANT_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """LOGP[row] = z[target] - lse, LSE[row] = lse, ENT[row] = lse - sum(p * z) (online over the vocab);
    with WANT_GRAD the row L[row] is then overwritten by (onehot(target) - p) * dz/dy."""
    row = tl.program_id(0).to(tl.int64)
    L += row * sl
    target = tl.load(TARGETS + row)
    lse, zt, pz = row_logsumexp(L, V, target, scale, cap, inv_t, HAS_SCALE, HAS_CAP, WANT_ENT, BLOCK)
    tl.store(LOGP + row, zt - lse)
    tl.store(LSE + row, lse)
    if WANT_ENT:
        tl.store(ENT + row, lse - pz)
    if WANT_GRAD:
        cols = tl.arange(0, BLOCK)
        for start in range(0, V, BLOCK):
            mask = start + cols < V
            x = tl.load(L + start + cols, mask=mask, other=0.0).to(tl.float32)
            z, dz = logit_transform(x, scale, cap, HAS_SCALE, HAS_CAP)
            p = tl.exp(z * inv_t - lse)
            g = tl.where(start + cols == target, 1.0 - p, -p) * (dz * inv_t)
            tl.store(L + start + cols, g.to(L.dtype.element_ty), mask=mask)


def _z_and_slope(y: torch.Tensor, inv_t: float, softcap, logit_scale):
    """(z, dz/dy) in fp32 for a logits chunk y, as the kernel computes them."""
    z = transform_logits_reference(y, softcap, logit_scale)
    slope = torch.full((), inv_t * (1.0 if logit_scale is None else float(logit_scale)), device=y.device)
    if softcap is not None:
        slope = slope * (1.0 - (z / softcap) ** 2)
    return z * inv_t, slope


def _rows_torch(y, targets, inv_t, softcap, logit_scale, want_ent, want_grad):
    z, slope = _z_and_slope(y, inv_t, softcap, logit_scale)
    lse = torch.logsumexp(z, dim=-1)
    logp = z.gather(1, targets[:, None])[:, 0] - lse
    ent = None
    p = None
    if want_ent or want_grad:
        p = torch.exp(z - lse[:, None])
    if want_ent:
        ent = lse - (p * z).sum(-1)
    if want_grad:
        g = p.neg_()
        g[torch.arange(len(targets), device=g.device), targets] += 1.0
        y.copy_(g * slope)
    return logp, ent, lse


def logprob_rows(y, targets, inv_t, softcap, logit_scale, want_ent, want_grad):
    """(logp [C], ent [C] or None, lse [C]) fp32 for a logits chunk y [C, V] (unit column stride);
    with want_grad, y is overwritten by (onehot(target) - p) * dz/dy."""
    if not triton_enabled(y):
        return _rows_torch(y, targets, inv_t, softcap, logit_scale, want_ent, want_grad)
    C, V = y.shape
    logp = torch.empty(C, dtype=torch.float32, device=y.device)
    lse = torch.empty(C, dtype=torch.float32, device=y.device)
    ent = torch.empty(C, dtype=torch.float32, device=y.device) if want_ent else lse
    if C:
        values, meta = transform_args(softcap, logit_scale, V)
        _logprob_rows_kernel[(C,)](
            y,
            y.stride(0),
            targets,
            logp,
            ent,
            lse,
            V,
            *values,
            float(inv_t),
            WANT_ENT=want_ent,
            WANT_GRAD=want_grad,
            **meta,
        )
    return logp, ent if want_ent else None, lse


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with an fp32 result, without rounding the product to a 16-bit dtype first."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError):
            pass
    return a.float() @ b.float()


def _logits(h, w, bias):
    return torch.addmm(bias, h, w.t()) if bias is not None else h @ w.t()


# ----------------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------------
class _FusedLinearLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, inv_t, softcap, logit_scale, want_ent, budget, dtype):
        ctx.set_materialize_grads(False)  # an entropy used only for metrics sends no gradient
        need_grad = ctx.needs_input_grad[0]
        N = hidden.shape[0]
        V = weight.shape[0]
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        targets = targets.contiguous()
        logp = torch.empty(N, dtype=torch.float32, device=hidden.device)
        ent = torch.empty(N, dtype=torch.float32, device=hidden.device) if want_ent else None
        lse = torch.empty(N, dtype=torch.float32, device=hidden.device)
        u = torch.empty((N, hidden.shape[1]), dtype=torch.float32, device=hidden.device) if need_grad else None
        step = chunk_rows(N, V, torch.finfo(dtype).bits // 8, budget)
        for s in range(0, N, step):
            e = min(s + step, N)
            y = _logits(hidden[s:e].to(dtype), w, b)
            lp, en, ls = logprob_rows(y, targets[s:e], inv_t, softcap, logit_scale, want_ent, need_grad)
            logp[s:e], lse[s:e] = lp, ls
            if want_ent:
                ent[s:e] = en
            if need_grad:
                u[s:e] = _mm_fp32(y, w)
            del y
        ctx.save_for_backward(u, hidden, weight, bias, targets, lse, ent)
        ctx.args = (inv_t, softcap, logit_scale, budget, dtype)
        if ent is None:
            return logp
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, grad_ent=None):
        u, hidden, weight, bias, targets, lse, ent = ctx.saved_tensors
        inv_t, softcap, logit_scale, budget, dtype = ctx.args
        d_hidden = None
        if grad_logp is not None:
            d_hidden = grad_logp.float()[:, None] * u
        if grad_ent is not None:
            d_ent = _entropy_grad(hidden, weight, bias, lse, ent, grad_ent.float(), ctx.args)
            d_hidden = d_ent if d_hidden is None else d_hidden.add_(d_ent)
        if d_hidden is not None:
            d_hidden = d_hidden.to(hidden.dtype)
        return d_hidden, None, None, None, None, None, None, None, None, None


def _entropy_grad(hidden, weight, bias, lse, ent, g, args) -> torch.Tensor:
    """d(sum_n g_n ent_n) / d hidden [N, H] fp32, recomputing each chunk's logits (torch ops):
    d ent / dz_j = -p_j (log p_j + ent)."""
    inv_t, softcap, logit_scale, budget, dtype = args
    N, V = hidden.shape[0], weight.shape[0]
    w = weight.to(dtype)
    b = None if bias is None else bias.to(dtype)
    out = torch.empty((N, hidden.shape[1]), dtype=torch.float32, device=hidden.device)
    step = chunk_rows(N, V, torch.finfo(dtype).bits // 8, budget)
    for s in range(0, N, step):
        e = min(s + step, N)
        y = _logits(hidden[s:e].to(dtype), w, b)
        z, slope = _z_and_slope(y, inv_t, softcap, logit_scale)
        log_p = z - lse[s:e, None]
        gz = -g[s:e, None] * torch.exp(log_p) * (log_p + ent[s:e, None]) * slope
        out[s:e] = _mm_fp32(gz.to(dtype), w)
    return out


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float | None = None,
    entropy: bool = True,
    memory_budget_bytes: int = DEFAULT_BUDGET,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logp [N] fp32, entropy [N] fp32 or None): see the module docstring."""
    check_head_args("fused_linear_logprobs", hidden, weight, bias, ("targets", targets), memory_budget_bytes)
    if not temperature > 0:
        raise ValueError(f"fused_linear_logprobs: temperature must be positive, got {temperature!r}")
    if torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad)):
        raise ValueError(
            "fused_linear_logprobs: lm_head's weight/bias require grad; this head computes gradients for "
            "the hidden states only (freeze lm_head, or use a head that recomputes the logits in backward)"
        )
    device = hidden.device
    if torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)
    else:
        dtype = torch.promote_types(hidden.dtype, weight.dtype)
    with torch.autocast(device.type, enabled=False):
        out = _FusedLinearLogprob.apply(
            hidden,
            weight,
            bias,
            targets,
            1.0 / float(temperature),
            softcap,
            logit_scale,
            bool(entropy),
            int(memory_budget_bytes),
            dtype,
        )
    if entropy:
        return out[0], out[1]
    return out, None


def fused_linear_logprobs_reference(
    hidden, weight, targets, *, bias=None, temperature=1.0, softcap=None, logit_scale=None, entropy=True
):
    """Plain PyTorch from the full logits (materialises [N, V]): the same outputs and autograd."""
    y = torch.nn.functional.linear(hidden, weight, bias)
    z = transform_logits_reference(y, softcap, logit_scale) / temperature
    logp_all = torch.log_softmax(z, dim=-1)
    logp = logp_all.gather(1, targets[:, None])[:, 0]
    ent = -(logp_all.exp() * logp_all).sum(-1) if entropy else None
    return logp, ent
