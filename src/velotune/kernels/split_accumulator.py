"""An fp32 GEMM accumulator stored as two 16-bit planes, so its top half is the bf16 result.

Not the default since 2026-12-01: halves_accumulator.py (cuBLAS into two fp32 row halves, cast in
place) does the same job with the same memory, 1.94 vs 2.87 ms per 8B chunk on the H200. Kept as
`fused_linear_ce.DW_ACCUMULATOR = "planes"` for comparison (`bench/flce_chunks.py --dw`).

Used by the fused linear cross-entropy for the lm_head weight gradient, which sums one GEMM per row
chunk: dW [V, H] += dlogits_c^T @ hidden_c. Summing in fp32 keeps dW as accurate as stock's single
GEMM (a bf16 running sum is not: `bench/flce_accumulation.py`); but an fp32 [V, H] accumulator plus
the bf16 gradient cast from it at the end costs 6 bytes per element at the peak (3.1 GiB for
Llama-3's 128256 x 4096 lm_head).

Here the fp32 accumulator is split by bits: for each element, the fp32 pattern b (32 bits) lives as

    hi = b >> 16      in a bf16 tensor  (the top 16 bits of an fp32 number ARE a bf16 number)
    lo = b & 0xFFFF   in an int16 tensor

so the accumulator is still exactly fp32 (every update is the fp32 sum `old + partial`, with `old`
rebuilt bit for bit from the planes), 4 bytes per element, and at the end the bf16 gradient is
written over the hi plane in place: hi = round-to-nearest-even_bf16(fp32(hi:lo) * scale). The lo
plane is then freed and the hi plane IS the gradient tensor: no cast copy, 2 bytes per element left.

    hi, lo = new_accumulator(V, H, device)
    accumulate_(hi, lo, a, b)        # hi:lo += a^T @ b        a [K, M], b [K, N], bf16; fp32 sum
    finalize_(hi, lo, scale)         # hi = bf16(fp32(hi:lo) * scale); returns hi

`accumulate_` is one Triton GEMM whose epilogue reads both planes, adds its fp32 tile and writes
both planes back: the same 8 bytes of traffic per element as an fp32 C operand with beta = 1.
The torch reference (CPU) does the same through int32 bit arithmetic and `addmm` in fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from velotune.kernels import triton_enabled


# ---------------------------------------------------------------------------------------------------
# torch reference (CPU path and tests)
# ---------------------------------------------------------------------------------------------------
def combine_reference(hi: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """The fp32 value held by the two planes."""
    bits = ((hi.view(torch.int16).to(torch.int32) & 0xFFFF) << 16) | (lo.to(torch.int32) & 0xFFFF)
    return bits.view(torch.float32)


def split_reference_(val: torch.Tensor, hi: torch.Tensor, lo: torch.Tensor) -> None:
    """Write the fp32 tensor `val` into the two planes."""
    bits = val.contiguous().view(torch.int32)
    hi.view(torch.int16).copy_((bits >> 16).to(torch.int16))                # arithmetic shift: fits int16
    lo.copy_((((bits & 0xFFFF) ^ 0x8000) - 0x8000).to(torch.int16))        # 0..65535 -> two's complement


def accumulate_reference_(hi, lo, a, b) -> None:
    acc = combine_reference(hi, lo)
    acc.addmm_(a.t().float(), b.float())
    split_reference_(acc, hi, lo)


def finalize_reference_(hi, lo, scale) -> torch.Tensor:
    hi.copy_((combine_reference(hi, lo) * scale.float()).to(torch.bfloat16))
    return hi


# ---------------------------------------------------------------------------------------------------
# Triton
# ---------------------------------------------------------------------------------------------------
@triton.jit
def _plane_offsets(offs_m, offs_n, M, N, sc):
    c = offs_m[:, None].to(tl.int64) * sc + offs_n[None, :]
    return c, (offs_m[:, None] < M) & (offs_n[None, :] < N)


@triton.jit
def _load_planes(hi_ptr, lo_ptr, offs_m, offs_n, M, N, sc):
    """The fp32 tile held by the planes, rebuilt bit for bit: (hi << 16) | lo."""
    c, cmask = _plane_offsets(offs_m, offs_n, M, N, sc)
    hi = tl.load(hi_ptr + c, mask=cmask, other=0).to(tl.int32) & 0xFFFF
    lo = tl.load(lo_ptr + c, mask=cmask, other=0).to(tl.int32) & 0xFFFF
    return ((hi << 16) | lo).to(tl.float32, bitcast=True)


@triton.jit
def _store_planes(hi_ptr, lo_ptr, val, offs_m, offs_n, M, N, sc):
    c, cmask = _plane_offsets(offs_m, offs_n, M, N, sc)
    bits = val.to(tl.int32, bitcast=True)
    tl.store(hi_ptr + c, (bits >> 16).to(tl.int16), mask=cmask)
    tl.store(lo_ptr + c, (bits & 0xFFFF).to(tl.int16), mask=cmask)


@triton.jit
def _add_to_planes(hi_ptr, lo_ptr, acc, offs_m, offs_n, M, N, sc, FIRST: tl.constexpr = False):
    """The epilogue: old = fp32(hi:lo) rebuilt from the bits; new = old + acc (one fp32 add, as
    cuBLAS' beta = 1); new split into the planes again. acc [BM, BN] fp32 for rows offs_m, cols offs_n.
    FIRST: the planes hold nothing yet (not even zeros): new = acc, nothing is read (acc began as
    +0.0 in the dot, so it is already 0.0 + partial, never -0.0)."""
    if FIRST:
        new = acc
    else:
        new = _load_planes(hi_ptr, lo_ptr, offs_m, offs_n, M, N, sc) + acc
    _store_planes(hi_ptr, lo_ptr, new, offs_m, offs_n, M, N, sc)


@triton.jit
def _tile(N, BN: tl.constexpr):
    """This program's output tile (row block, column block); column blocks vary fastest, so the
    programs of one row block run together and its A tile ([K, BM]) is served from L2."""
    pid = tl.program_id(0)
    n_n = tl.cdiv(N, BN)
    return pid // n_n, pid % n_n


@triton.jit
def _dot_t(a, b, acc, UPCAST: tl.constexpr):
    """acc + a^T @ b for operand tiles a [BK, BM], b [BK, BN] (the K-loop step of every kernel here).
    UPCAST: CPU interpreter only, whose dot multiplies bf16 *bit patterns* (see accumulate_)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(tl.trans(a), b, acc)


@triton.jit
def _accumulate_kernel(a_ptr, b_ptr, hi_ptr, lo_ptr, M, N, K, sa, sb, sc,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr,
                       FIRST: tl.constexpr):
    # C [M, N] += A[K, M]^T @ B[K, N], plain pointer loads (any strides).
    pid_m, pid_n = _tile(N, BN)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + offs_k
        a = tl.load(a_ptr + kk[:, None].to(tl.int64) * sa + offs_m[None, :],
                    mask=(kk[:, None] < K) & (offs_m[None, :] < M), other=0.0)          # [BK, BM]
        b = tl.load(b_ptr + kk[:, None].to(tl.int64) * sb + offs_n[None, :],
                    mask=(kk[:, None] < K) & (offs_n[None, :] < N), other=0.0)          # [BK, BN]
        acc = _dot_t(a, b, acc, UPCAST)
    _add_to_planes(hi_ptr, lo_ptr, acc, offs_m, offs_n, M, N, sc, FIRST)


@triton.jit
def _accumulate_tma_kernel(a_desc, b_desc, hi_ptr, lo_ptr, M, N, K, sc,
                           BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr,
                           FIRST: tl.constexpr):
    # The same GEMM with its operand tiles fetched by the Hopper tensor-memory accelerator (host-made
    # descriptors; out-of-range rows and columns read as zeros), so the pipeline's loads are issued
    # by one thread instead of every thread computing addresses. Epilogue identical. (Used when the
    # planes' row stride does not suit TMA; else _accumulate_tma_planes_kernel.)
    pid_m, pid_n = _tile(N, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        a = a_desc.load([k0, pid_m * BM])                                   # [BK, BM]
        b = b_desc.load([k0, pid_n * BN])                                   # [BK, BN]
        acc = _dot_t(a, b, acc, UPCAST)
    _add_to_planes(hi_ptr, lo_ptr, acc, pid_m * BM + tl.arange(0, BM), pid_n * BN + tl.arange(0, BN), M, N, sc,
                   FIRST)


@triton.jit
def _accumulate_tma_planes_kernel(a_desc, b_desc, hi_desc, lo_desc, K,
                                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr,
                                  FIRST: tl.constexpr):
    # The TMA GEMM with the planes moved by TMA as well: the epilogue's loads and stores take a tile
    # coordinate, not one 64-bit address per element (those addresses made the pointer epilogue spill
    # ~3.5 KB per thread at 128 x 128 tiles, ptxas -v). The old tile is fetched before the main loop
    # (its latency hides under the GEMM); out-of-range rows and columns are clipped by the TMA unit.
    pid_m, pid_n = _tile(hi_desc.shape[1], BN)
    m0 = pid_m * BM
    n0 = pid_n * BN
    if not FIRST:
        hi = hi_desc.load([m0, n0]).to(tl.int32) & 0xFFFF
        lo = lo_desc.load([m0, n0]).to(tl.int32) & 0xFFFF
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        a = a_desc.load([k0, m0])                                            # [BK, BM]
        b = b_desc.load([k0, n0])                                            # [BK, BN]
        acc = _dot_t(a, b, acc, UPCAST)
    if not FIRST:
        acc = ((hi << 16) | lo).to(tl.float32, bitcast=True) + acc
    bits = acc.to(tl.int32, bitcast=True)
    hi_desc.store([m0, n0], (bits >> 16).to(tl.int16))
    lo_desc.store([m0, n0], (bits & 0xFFFF).to(tl.int16))


@triton.jit
def _finalize_kernel(hi_ptr, lo_ptr, scale_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    hi = tl.load(hi_ptr + offs, mask=mask, other=0).to(tl.int32) & 0xFFFF
    lo = tl.load(lo_ptr + offs, mask=mask, other=0).to(tl.int32) & 0xFFFF
    val = ((hi << 16) | lo).to(tl.float32, bitcast=True) * tl.load(scale_ptr)
    # round to nearest even on the bits (the hardware conversion; the interpreter would truncate)
    bits = val.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    tl.store(hi_ptr + offs, (bits >> 16).to(tl.int16), mask=mask)


# (BM, BN, BK, num_warps, num_stages[, loads]): 128 x 128 output tiles, K in steps of 64, one
# warpgroup, so that two programs fit an SM and one's epilogue (the plane traffic) overlaps the
# other's main loop. loads "tma-planes": operands and planes through TMA (_accumulate_tma_planes_kernel);
# "tma": operands only; anything else: plain loads. Each falls back to the next where strides do not
# suit TMA. `bench/split_accumulator.py` times alternatives; docs/perf-notes.md lists the ones that
# lost (a persistent kernel, an early plane load with pointer addressing).
CONFIG = (128, 128, 64, 4, 3, "tma-planes")   # H200, 8B chunk: 2.73 ms vs 2.99 for "tma" (same run)


def new_accumulator(m: int, n: int, device, zero: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi bf16 [m, n], lo int16 [m, n]): the fp32 value 0.0 (zero=True), or uninitialised for a
    first `accumulate_(..., first=True)` that writes every element without reading."""
    make = torch.zeros if zero else torch.empty
    return (make((m, n), dtype=torch.bfloat16, device=device), make((m, n), dtype=torch.int16, device=device))


def _tma_ok(*ts) -> bool:
    return all(t.data_ptr() % 16 == 0 and t.stride(0) * t.element_size() % 16 == 0 for t in ts)


def accumulate_(hi: torch.Tensor, lo: torch.Tensor, a: torch.Tensor, b: torch.Tensor, config=None,
                first: bool = False) -> None:
    """hi:lo [M, N] += a^T @ b, a [K, M] and b [K, N] bf16 with unit column stride, fp32 sum.
    first=True: hi:lo = a^T @ b, the planes are only written (they may hold garbage before).
    config: (BM, BN, BK, num_warps, num_stages[, loads]), default CONFIG; loads "tma-planes" or "tma":
    tiles through tensor descriptors (Hopper's TMA; row strides must be multiples of 16 bytes, else
    the next simpler kernel)."""
    K, M = a.shape
    N = b.shape[1]
    if b.shape[0] != K or hi.shape != (M, N) or lo.shape != (M, N):
        raise ValueError(f"accumulate_: a {tuple(a.shape)}, b {tuple(b.shape)}, planes {tuple(hi.shape)}")
    if not triton_enabled(a):
        if first:
            hi.zero_(), lo.zero_()
        accumulate_reference_(hi, lo, a, b)
        return
    a = a if a.stride(1) == 1 else a.contiguous()
    b = b if b.stride(1) == 1 else b.contiguous()
    assert hi.is_contiguous() and lo.is_contiguous()
    if M == 0 or N == 0:
        return
    if K == 0:
        if first:
            hi.zero_(), lo.zero_()
        return
    BM, BN, BK, warps, stages, *rest = config or CONFIG
    loads = rest[0] if rest else "ptr"
    n_tiles = triton.cdiv(M, BM) * triton.cdiv(N, BN)
    common = dict(BM=BM, BN=BN, BK=BK, UPCAST=not a.is_cuda, FIRST=first, num_warps=warps, num_stages=stages)
    if loads in ("tma", "tma-planes") and _tma_ok(a, b):
        from triton.tools.tensor_descriptor import TensorDescriptor

        a_desc = TensorDescriptor(a, [K, M], [a.stride(0), 1], [BK, BM])
        b_desc = TensorDescriptor(b, [K, N], [b.stride(0), 1], [BK, BN])
        if loads == "tma-planes" and _tma_ok(hi, lo):
            planes = [TensorDescriptor(t, [M, N], [N, 1], [BM, BN]) for t in (hi.view(torch.int16), lo)]
            _accumulate_tma_planes_kernel[(n_tiles,)](a_desc, b_desc, *planes, K, **common)
        else:
            _accumulate_tma_kernel[(n_tiles,)](a_desc, b_desc, hi.view(torch.int16), lo, M, N, K, N, **common)
        return
    # UPCAST: on CPU tensors (the Triton interpreter) the operands go to fp32 before tl.dot, because
    # the interpreter (triton 3.6, interpreter.py create_dot) multiplies bf16 values stored as uint16
    # as integers. Same math as the GPU's bf16 dot: bf16 x bf16 products are exact in fp32.
    _accumulate_kernel[(n_tiles,)](a, b, hi.view(torch.int16), lo, M, N, K, a.stride(0), b.stride(0), N, **common)


def finalize_(hi: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """hi = bf16(fp32(hi:lo) * scale) in place (scale: a 0-dim fp32 tensor, read on the device);
    returns hi, which is then the bf16 result. The lo plane is no longer needed."""
    if not triton_enabled(hi):
        return finalize_reference_(hi, lo, scale)
    n = hi.numel()
    if n:
        block = 2048
        _finalize_kernel[(triton.cdiv(n, block),)](hi.view(torch.int16), lo, scale.float().reshape(1), n,
                                                   BLOCK=block, num_warps=8)
    return hi
