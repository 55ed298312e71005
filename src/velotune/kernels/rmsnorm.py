"""RMSNorm with a hand-written backward.

    y = rms_norm(x, weight, eps)              # Llama:  weight * (x_f32 * rstd).to(x.dtype)
    y = rms_norm(x, weight, eps, offset=1.0)  # Gemma2: (x_f32 * rstd * (1 + weight_f32)).to(x.dtype)
    y = rms_norm(x, weight, eps, weight_in_fp32=True)  # OLMo 2: (x_f32 * rstd * weight_f32).to(x.dtype)

x: [..., H] (any leading dims, any strides), weight: [H]. rstd = 1 / sqrt(mean(x_f32^2) + eps), one
fp32 number per row. Forward saves only x and rstd [rows] (fp32); backward gives dx and, only when
`weight.requires_grad`, dweight.

Derivation (per row, in fp32; n = x * r, r = (mean(x^2) + eps)^-1/2, H = row length):
    dr/dx_j   = -r^3 * x_j / H
    dn_i/dx_j = r * delta_ij - x_i * r^3 * x_j / H
  With g = dL/dn (Llama: g = dy * w; Gemma: g = dy * (offset + w)):
    dx = r * g - x * r^3 * sum_i(g_i * x_i) / H  =  r * (g - n * mean(g * n))
    dw = sum over rows of dy * n   (Llama: n rounded to x.dtype first, exactly as the forward used it)
The cast `.to(x.dtype)` in the Llama forward is treated as identity by autograd, and so here.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from velotune.kernels import triton_enabled
from velotune.kernels.launch import launch_named

# Longest row held in registers at once; longer rows are processed in chunks of this size.
MAX_BLOCK = 16384


def rms_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float, *, offset: float = 0.0, weight_in_fp32: bool = False
):
    """Plain PyTorch, op for op what LlamaRMSNorm (offset=0) / Gemma2RMSNorm (offset=1) /
    Olmo2RMSNorm (weight_in_fp32) compute (float64 inputs stay float64, for references)."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    n = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if offset == 0.0 and not weight_in_fp32:
        return weight * n.to(x.dtype)
    if offset == 0.0:
        return (weight * n).to(x.dtype)
    return (n * (offset + weight.to(xf.dtype))).to(x.dtype)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, *, offset: float = 0.0, weight_in_fp32: bool = False
) -> torch.Tensor:
    """RMSNorm over the last dim. x [..., H], weight [H] -> [..., H].

    Output dtype: Llama style (offset=0) follows torch promotion of (weight, x) like LlamaRMSNorm;
    Gemma style, and weight_in_fp32 (the weight multiplies the fp32 normalised row, one rounding at
    the end, as OLMo 2), return x.dtype. CUDA tensors run the Triton kernels, CPU the reference.
    """
    if x.shape[-1] != weight.shape[-1]:
        raise ValueError(f"rms_norm: hidden size {x.shape[-1]} != weight size {weight.shape[-1]}")
    if not triton_enabled(x):
        return rms_norm_reference(x, weight, eps, offset=offset, weight_in_fp32=weight_in_fp32)
    return _RMSNorm.apply(x, weight, float(eps), float(offset), bool(weight_in_fp32))


# ----------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _rms_fwd_kernel(
    X, sx, Y, sy, W, RSTD, H, eps, offset, GEMMA: tl.constexpr, BLOCK: tl.constexpr, SINGLE: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    X += row * sx
    Y += row * sy
    cols = tl.arange(0, BLOCK)
    if SINGLE:
        mask = cols < H
        x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
        r = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / H + eps)
        tl.store(RSTD + row, r)
        n = x * r
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        if GEMMA:
            y = n * (offset + w)
        else:
            y = n.to(X.dtype.element_ty).to(tl.float32) * w  # Llama: round n to x.dtype first
        tl.store(Y + cols, y.to(Y.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, H, BLOCK):
            mask = start + cols < H
            x = tl.load(X + start + cols, mask=mask, other=0.0).to(tl.float32)
            acc += x * x
        r = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / H + eps)
        tl.store(RSTD + row, r)
        for start in range(0, H, BLOCK):
            mask = start + cols < H
            n = tl.load(X + start + cols, mask=mask, other=0.0).to(tl.float32) * r
            w = tl.load(W + start + cols, mask=mask, other=0.0).to(tl.float32)
            if GEMMA:
                y = n * (offset + w)
            else:
                y = n.to(X.dtype.element_ty).to(tl.float32) * w
            tl.store(Y + start + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["M", "rows_per_prog"])  # both change with the token count: one kernel for all
def _rms_bwd_kernel(
    DY,
    sdy,
    X,
    sx,
    DX,
    sdx,
    W,
    RSTD,
    DWP,
    M,
    H,
    rows_per_prog,
    offset,
    GEMMA: tl.constexpr,
    HAS_DW: tl.constexpr,
    BLOCK: tl.constexpr,
    SINGLE: tl.constexpr,
):
    # One program handles `rows_per_prog` consecutive rows and keeps a private fp32 partial dW row
    # (registers when the row fits one block, else its own row of DWP in global memory); the
    # partials are summed over programs afterwards -- deterministic, no atomics.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    row0 = pid.to(tl.int64) * rows_per_prog
    row1 = tl.minimum(row0 + rows_per_prog, M)
    DWP += pid.to(tl.int64) * H
    if SINGLE:
        mask = cols < H
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK], dtype=tl.float32)
        for row in range(row0, row1):
            dy = tl.load(DY + row * sdy + cols, mask=mask, other=0.0).to(tl.float32)
            x = tl.load(X + row * sx + cols, mask=mask, other=0.0).to(tl.float32)
            r = tl.load(RSTD + row)
            n = x * r
            if GEMMA:
                g = dy * (offset + w)
            else:
                g = dy * w
            # dx = r * (g - n * mean(g * n))
            dx = r * (g - n * (tl.sum(g * n, axis=0) / H))
            tl.store(DX + row * sdx + cols, dx.to(DX.dtype.element_ty), mask=mask)
            if HAS_DW:
                if GEMMA:
                    dw += dy * n
                else:
                    dw += dy * n.to(X.dtype.element_ty).to(tl.float32)
        if HAS_DW:
            tl.store(DWP + cols, dw, mask=mask)
    else:
        for row in range(row0, row1):
            r = tl.load(RSTD + row)
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, H, BLOCK):
                mask = start + cols < H
                dy = tl.load(DY + row * sdy + start + cols, mask=mask, other=0.0).to(tl.float32)
                x = tl.load(X + row * sx + start + cols, mask=mask, other=0.0).to(tl.float32)
                w = tl.load(W + start + cols, mask=mask, other=0.0).to(tl.float32)
                if GEMMA:
                    g = dy * (offset + w)
                else:
                    g = dy * w
                acc += g * x * r
            c = tl.sum(acc, axis=0) / H
            for start in range(0, H, BLOCK):
                mask = start + cols < H
                dy = tl.load(DY + row * sdy + start + cols, mask=mask, other=0.0).to(tl.float32)
                x = tl.load(X + row * sx + start + cols, mask=mask, other=0.0).to(tl.float32)
                w = tl.load(W + start + cols, mask=mask, other=0.0).to(tl.float32)
                n = x * r
                if GEMMA:
                    g = dy * (offset + w)
                else:
                    g = dy * w
                dx = r * (g - n * c)
                tl.store(DX + row * sdx + start + cols, dx.to(DX.dtype.element_ty), mask=mask)
                if HAS_DW:
                    if GEMMA:
                        contrib = dy * n
                    else:
                        contrib = dy * n.to(X.dtype.element_ty).to(tl.float32)
                    part = tl.load(DWP + start + cols, mask=mask, other=0.0)
                    tl.store(DWP + start + cols, part + contrib, mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[..., H] -> [M, H] with unit stride along H; copies only when no such view exists."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x.reshape(-1, x.shape[-1])


def _block(H: int) -> tuple[int, bool]:
    block = min(triton.next_power_of_2(H), MAX_BLOCK)
    return block, block >= H


def _num_warps(block: int) -> int:
    return 4 if block <= 2048 else 8 if block <= 8192 else 16


@functools.lru_cache(maxsize=None)
def _sm_count(device: int) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


# launch plans (kernels/launch.py): keyed by everything the compiled kernel depends on but the tensors
_FWD_PLANS: dict = {}
_BWD_PLANS: dict = {}


def _launch(plans, kernel, progs, x2, weight, rstd, offset, gemma, **named) -> None:
    """`kernel` (forward: a program per row; backward: a chunk of rows each) over `progs` programs,
    none when progs is 0, with the arguments both kernels take: x2 [M, H] and its row stride, the
    weight, rstd [M] (fp32), offset, H, and the constexprs GEMMA and BLOCK / SINGLE (the row block
    `_block` gives, launched with its warps). named: the kernel's own other arguments."""
    if not progs:
        return
    H = x2.shape[1]
    block, single = _block(H)
    shared = dict(
        X=x2, sx=x2.stride(0), W=weight, RSTD=rstd, H=H, offset=offset, GEMMA=gemma, BLOCK=block, SINGLE=single
    )
    launch_named(plans, kernel, (progs,), dict(named, **shared), num_warps=_num_warps(block))


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, offset, weight_in_fp32=False):
        shape = x.shape
        x2 = _rows(x)
        M, H = x2.shape
        gemma = offset != 0.0 or weight_in_fp32  # the kernels' fp32 (offset + w) * n path
        out_dtype = x.dtype if gemma else torch.promote_types(weight.dtype, x.dtype)
        y = torch.empty((M, H), dtype=out_dtype, device=x.device)
        rstd = torch.empty(M, dtype=torch.float32, device=x.device)
        _launch(_FWD_PLANS, _rms_fwd_kernel, M, x2, weight, rstd, offset, gemma, Y=y, sy=y.stride(0), eps=eps)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.offset, ctx.shape, ctx.gemma = offset, shape, gemma
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        M, H = x2.shape
        dy2 = _rows(dy)
        dx = torch.empty((M, H), dtype=x2.dtype, device=x2.device)
        has_dw = ctx.needs_input_grad[1]
        _, single = _block(H)
        if x2.is_cuda:  # enough programs in flight to hide each row's load -> reduce -> store latency
            progs = _sm_count(x2.get_device()) * 8
        else:
            progs = 4
        progs = max(1, min(progs, M))
        rows_per_prog = triton.cdiv(M, progs) if M > 0 else 1
        progs = triton.cdiv(M, rows_per_prog) if M > 0 else 0
        # single-block rows: every program stores its whole partial row, so no zero-fill is needed
        alloc = torch.empty if single and M > 0 else torch.zeros
        dwp = alloc((max(progs, 1), H) if has_dw else (1, 1), dtype=torch.float32, device=x2.device)
        _launch(
            _BWD_PLANS,
            _rms_bwd_kernel,
            progs,
            x2,
            weight,
            rstd,
            ctx.offset,
            ctx.gemma,
            DY=dy2,
            sdy=dy2.stride(0),
            DX=dx,
            sdx=dx.stride(0),
            DWP=dwp,
            M=M,
            rows_per_prog=rows_per_prog,
            HAS_DW=has_dw,
        )
        dw = dwp.sum(0).to(weight.dtype) if has_dw else None
        return dx.view(ctx.shape), dw, None, None, None
