"""An fp32 GEMM accumulator in two row halves, summed by cuBLAS, whose 16-bit result is written in
place: the lm_head weight gradient of the fused linear cross-entropy.

The fused CE sums one GEMM per row chunk, dW [V, H] += dlogits_c^T @ hidden_c, and the sum must be
fp32 (a bf16 running sum is not as accurate as stock's single GEMM: `bench/flce_accumulation.py`).
An fp32 [V, H] buffer plus the bf16 gradient cast from it would cost 6 bytes per element at the
peak; we want 4, and the gradient must end up as one contiguous bf16 [V, H] tensor.

Layout: two separate fp32 allocations, top = rows [0, Vt) and bottom = rows [Vt, V), Vt = ceil(V/2).
Each chunk adds into both with cuBLAS' bf16 GEMM with an fp32 output (`torch.addmm(..., out_dtype=
torch.float32)`, beta = 1; the first chunk beta = 0, so nothing is zero-filled or read). Top's
storage, 4 * Vt * H bytes, holds at least the 2 * V * H bytes of the 16-bit result, so `finalize_`
writes out[i] = dtype(fp32[i] * scale) into the front of top's storage and frees nothing but bottom:

    out element i (2 bytes at byte 2i) overwrites the fp32 element i // 2 of top (bytes 4(i//2)...).
    Phases over top's flat elements [a, b) with b <= 2a read [a, b) and write over [a/2, b/2),
    which lies below a: read by an earlier phase, and disjoint from what this phase reads (so no
    race between the programs of one launch). a grows geometrically: [P, 2P), [2P, 4P), ...
    The prefix [0, P) first goes through a small copy (P = PREFIX elements), since its output
    overlaps its own input. Then bottom's elements go after top's, into bytes [2 * n_top, 2 * V * H)
    of top's storage: fp32 elements of top that every phase has already read.
About log2(n_top / PREFIX) + 2 launches of a bandwidth-bound kernel (14 at Llama-3's lm_head).

    acc = new_accumulator(V, H, device)               # (top, bottom)
    accumulate_(acc, a, b, first=True)                # acc = a^T @ b      a [K, V], b [K, H], 16-bit
    accumulate_(acc, a, b)                            # acc += a^T @ b     fp32 sum
    dW = finalize_(acc, scale, torch.bfloat16)        # [V, H] = dtype(acc * scale), a view of top
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from velotune.kernels import triton_enabled

PREFIX = 1 << 16  # elements of top copied aside before the in-place phases (256 KiB)
BLOCK = 4096


def new_accumulator(v: int, h: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(top fp32 [ceil(v/2), h], bottom fp32 [v - ceil(v/2), h]), uninitialised: the first
    `accumulate_(..., first=True)` writes every element; `zero_` them when no chunk will run."""
    vt = (v + 1) // 2
    return (
        torch.empty((vt, h), dtype=torch.float32, device=device),
        torch.empty((v - vt, h), dtype=torch.float32, device=device),
    )


def _addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool) -> None:
    """acc (fp32) = [acc +] a @ b with an fp32 sum of the 16-bit products and no rounding of the
    partial product: cuBLAS' 16-bit GEMM with an fp32 output on CUDA; the operands upcast
    elsewhere (exact: 16-bit values are exact in fp32)."""
    if acc.is_cuda:
        torch.addmm(acc, a, b, out_dtype=torch.float32, beta=0.0 if first else 1.0, out=acc)
    elif first:
        torch.mm(a.float(), b.float(), out=acc)
    else:
        acc.addmm_(a.float(), b.float())


def accumulate_(acc: tuple[torch.Tensor, torch.Tensor], a: torch.Tensor, b: torch.Tensor, first: bool = False) -> None:
    """acc [V, H] (+)= a^T @ b, a [K, V] and b [K, H] (16-bit); first=True: overwrite."""
    top, bottom = acc
    vt = top.shape[0]
    _addmm_fp32_(top, a[:, :vt].t(), b, first)
    if bottom.shape[0]:
        _addmm_fp32_(bottom, a[:, vt:].t(), b, first)


def finalize_reference(acc, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What `finalize_` returns, out of place (tests)."""
    return (torch.cat(acc) * scale.float()).to(dtype)


@triton.jit
def _scale_cast_kernel(src_ptr, dst_ptr, scale_ptr, n, BLOCK: tl.constexpr, OUT_BF16: tl.constexpr):
    """dst[i] = dtype(src[i] * scale), round to nearest even. bf16 is written on the bits, as the
    hardware conversion rounds (the Triton interpreter would truncate); dst is then int16."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    val = tl.load(src_ptr + offs, mask=mask, other=0.0) * tl.load(scale_ptr)
    if OUT_BF16:
        bits = val.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        tl.store(dst_ptr + offs, (bits >> 16).to(tl.int16), mask=mask)
    else:
        tl.store(dst_ptr + offs, val.to(dst_ptr.dtype.element_ty), mask=mask)


def _scale_cast(src: torch.Tensor, dst: torch.Tensor, scale: torch.Tensor) -> None:
    """dst = dtype(src * scale) over flat views (src fp32, dst 16-bit, same length)."""
    n = src.numel()
    if n == 0:
        return
    bf16 = dst.dtype == torch.bfloat16
    _scale_cast_kernel[(triton.cdiv(n, BLOCK),)](
        src, dst.view(torch.int16) if bf16 else dst, scale, n, BLOCK=BLOCK, OUT_BF16=bf16, num_warps=8
    )


def finalize_(acc: tuple[torch.Tensor, torch.Tensor], scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """dtype(acc * scale) [V, H], contiguous, written over the front of top's storage (see the module
    docstring); scale: a 0-dim tensor read on the device. Consumes the accumulator."""
    top, bottom = acc
    v, h = top.shape[0] + bottom.shape[0], top.shape[1]
    scale = scale.float().reshape(1)
    out = top.view(-1).view(dtype)[: v * h]  # top's storage as 16-bit elements
    if not triton_enabled(top):
        out.copy_(finalize_reference(acc, scale, dtype).view(-1))  # out of place: a full-size temp
        return out.view(v, h)
    src = top.view(-1)
    n_top = src.numel()
    p = min(PREFIX, n_top)
    _scale_cast(src[:p].clone(), out[:p], scale)  # output of the prefix overlaps its input
    for a, b in phases(n_top, p):  # reads [a, b), writes over fp32 [a/2, b/2)
        _scale_cast(src[a:b], out[a:b], scale)
    _scale_cast(bottom.view(-1), out[n_top:], scale)  # over fp32 elements every phase has read
    return out.view(v, h)


def phases(n: int, prefix: int) -> list[tuple[int, int]]:
    """The in-place launches after the prefix: [a, b) ranges covering [prefix, n) in order, each with
    b <= 2a, so that what one launch writes (fp32 elements [a/2, b/2)) was read by earlier ones and
    is not read by it. (On the GPU a launch's programs run in any order; the Triton interpreter runs
    them in order, where any in-place plan would pass: tests check this invariant directly.)"""
    out, a = [], prefix
    while a < n:
        b = min(2 * a, n)
        out.append((a, b))
        a = b
    return out
