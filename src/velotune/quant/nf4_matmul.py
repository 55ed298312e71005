"""NF4 dequantisation fused into the matmul: Y = X @ W^T with W read as 4-bit codes, never written out.

    Y = nf4_linear(X, nf4)              # X [M, K] (bf16 / fp16 / fp32), nf4 = NF4Weight of W [N, K]
    Y = nf4_linear_reference(X, nf4)    # X @ dequantize_nf4(nf4).T  (what it must equal)

The alternative to velotune's default QLoRA path (dequantise W into a reused buffer with
`dequant_kernel.py`, then cuBLAS): here each program computes a [BLOCK_M, BLOCK_N] tile of Y, and for
every BLOCK_K slice of the reduction it loads the packed bytes of W [BLOCK_N, BLOCK_K / 2], expands
them to values in registers and feeds `tl.dot`. The weight costs 0.5 B/element of memory traffic
instead of 0.5 (read codes) + 2 (write bf16) + 2 (read bf16 in the GEMM); the price is the expansion
work inside the GEMM's main loop. Which wins depends on M (tokens): `bench/qlora.py --dequant` times
both on the card.

Values: element (n, k) of W is code q = nibble of packed byte (n*K + k) // 2 (high nibble first) and
absmax block b = (n*K + k) // blocksize; with K a multiple of blocksize (every Llama-family
projection) a block never straddles rows, so b = n * (K / blocksize) + k / blocksize. The expanded
value is dtype(fp32(NF4[q] * absmax[b])) -- the same correctly rounded steps as the dequantisation
kernel (and bitsandbytes), so the GEMM consumes bit-identical weights; only the GEMM's own summation
order differs from cuBLAS (ordinary fp32-accumulation rounding).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from velotune.kernels import triton_enabled
from velotune.quant.dequant_kernel import nf4_absmax, to_out_dtype
from velotune.quant.nf4 import NF4Weight, dequantize_nf4, nf4_code


def nf4_linear_reference(x: torch.Tensor, nf4: NF4Weight) -> torch.Tensor:
    """x [M, K] @ W^T with W dequantised to x's dtype first (the unfused path)."""
    w = dequantize_nf4(nf4, nf4.dtype)
    return x @ w.to(x.dtype).t()


@triton.jit
def _expand(packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, nf4_ptr, offs_n, k0, K, N,
            BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, OUT_BF16: tl.constexpr, OUT_TY: tl.constexpr):
    """W[offs_n, k0:k0+BLOCK_K] as values of the GEMM dtype, [BLOCK_N, BLOCK_K]."""
    HALF_K: tl.constexpr = BLOCK_K // 2
    nmask = offs_n[:, None] < N
    byte_idx = (offs_n[:, None].to(tl.int64) * K + k0) // 2 + tl.arange(0, HALF_K)[None, :]
    byte = tl.load(packed_ptr + byte_idx, mask=nmask, other=0).to(tl.int32)
    hi = tl.load(nf4_ptr + (byte >> 4))
    lo = tl.load(nf4_ptr + (byte & 15))
    vals = tl.interleave(hi, lo)                                     # [BLOCK_N, BLOCK_K]
    # one absmax per (row, blocksize-long run of k): BLOCK_K is a multiple of BLOCKSIZE
    NB: tl.constexpr = BLOCK_K // BLOCKSIZE
    blk = offs_n[:, None].to(tl.int64) * (K // BLOCKSIZE) + k0 // BLOCKSIZE + tl.arange(0, NB)[None, :]
    absmax = nf4_absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, blk, nmask, BLOCKSIZE2, NESTED)
    vals = tl.reshape(vals, (BLOCK_N, NB, BLOCKSIZE)) * absmax[:, :, None]
    return to_out_dtype(tl.reshape(vals, (BLOCK_N, BLOCK_K)), OUT_TY, OUT_BF16)


@triton.jit
def _nf4_matmul_kernel(x_ptr, y_ptr, packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, nf4_ptr,
                       M, N, K, sxm, sym,
                       BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       GROUP_M: tl.constexpr, OUT_BF16: tl.constexpr, FP32: tl.constexpr):
    # grouped ordering of the tiles: consecutive programs share W tiles in L2
    pid = tl.program_id(0)
    n_m, n_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * n_n)
    first_m = group * GROUP_M
    size_m = min(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * n_n)) % size_m
    pid_n = (pid % (GROUP_M * n_n)) // size_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * sxm + k0 + offs_k[None, :],
                    mask=offs_m[:, None] < M, other=0.0)
        w = _expand(packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, nf4_ptr, offs_n, k0, K, N,
                    BLOCKSIZE, BLOCKSIZE2, NESTED, BLOCK_N, BLOCK_K, OUT_BF16, x_ptr.dtype.element_ty)
        if FP32:
            acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    tl.store(y_ptr + offs_m[:, None].to(tl.int64) * sym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def _config(M: int) -> dict:
    """Tile sizes by the number of rows: decode-like M gets thin tiles, training M square ones."""
    if M <= 16:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=3)
    if M <= 64:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)


def nf4_linear(x: torch.Tensor, nf4: NF4Weight) -> torch.Tensor:
    """x [M, K] @ W^T -> [M, N] in x's dtype, W = the NF4 weight [N, K] expanded tile by tile.

    The weights consumed equal `dequantize_nf4(nf4)` cast to x's dtype bit for bit when x's dtype is
    the quantisation dtype (the usual case); CPU tensors without `force_triton()` use the reference.
    """
    N, K = nf4.shape
    if x.dim() != 2 or x.shape[1] != K:
        raise ValueError(f"nf4_linear: x must be [M, {K}], got {tuple(x.shape)}")
    if not triton_enabled(x):
        return nf4_linear_reference(x, nf4)
    if x.dtype != nf4.dtype:
        raise ValueError(f"nf4_linear: x dtype {x.dtype} must be the weight's dequantisation dtype {nf4.dtype}")
    cfg = _config(x.shape[0])
    if K % cfg["BLOCK_K"] or cfg["BLOCK_K"] % nf4.blocksize:
        return nf4_linear_reference(x, nf4)          # shapes the tiling does not cover
    x = x if x.stride(1) == 1 else x.contiguous()
    M = x.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if nf4.nested:
        absmax, code2, absmax2, offset = nf4.absmax, nf4.code2, nf4.absmax2, nf4.offset.reshape(1).float()
    else:
        absmax = nf4.absmax.float()
        code2 = absmax2 = offset = absmax
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    _nf4_matmul_kernel[grid](x, y, nf4.packed, absmax, code2, absmax2, offset, nf4_code(x.device),
                             M, N, K, x.stride(0), y.stride(0),
                             BLOCKSIZE=nf4.blocksize, BLOCKSIZE2=nf4.blocksize2, NESTED=nf4.nested,
                             OUT_BF16=x.dtype == torch.bfloat16, FP32=x.dtype == torch.float32,
                             enable_fp_fusion=False, **cfg)
    return y
