"""Triton NF4 dequantisation: packed nibbles + (double-quantised) absmax -> bf16 / fp16 / fp32.

Per packed byte i (elements 2i, 2i+1, always in the same absmax block because blocksize is even):

    blk     = 2i // blocksize
    absmax  = fp32(code2[qa[blk]] * absmax2[blk // blocksize2]) + offset      (nested)
            = absmax[blk]                                                      (plain)
    out[2i]   = dtype(NF4[byte >> 4] * absmax)         high nibble first
    out[2i+1] = dtype(NF4[byte & 15] * absmax)

The kernel is memory bound: it reads 0.5 B and writes 2 B per bf16 element (the absmax and code
loads hit L1/L2: 32 consecutive bytes share one absmax).

Layout: a program handles a [ROWS, blocksize/2] tile of bytes, one row per absmax block (blocksize
a power of two, as every NF4 block size is): the nested-absmax chain runs once per block, and both
nibbles come from ONE 8-byte load of a 256-entry pair table (fp32 NF4[b >> 4] | NF4[b & 15] << 32).

Bit-exactness with bitsandbytes needs the nested absmax to be a product rounded to fp32 THEN a sum:
the launch passes `enable_fp_fusion=False` so the compiler never contracts them into one fused
multiply-add.

A launch is replayed from a per-weight plan once the JIT has compiled it (kernels/launch.py: a QLoRA
step dequantises ~640 times, and the JIT's per-call host time added up).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from velotune.kernels.launch import LaunchPlan
from velotune.quant.nf4_code import nf4_code


@triton.jit
def nf4_absmax(
    absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, blk, mask, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr
):
    """fp32 absmax of blocks `blk` (any shape): code2[qa] * absmax2, then + offset, two roundings."""
    if NESTED:
        qa = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        scale2 = tl.load(absmax2_ptr + blk // BLOCKSIZE2, mask=mask, other=0.0)
        absmax = tl.load(code2_ptr + qa, mask=mask, other=0.0) * scale2
        absmax = absmax + tl.load(offset_ptr)  # separate rounding (no FMA, see above)
    else:
        absmax = tl.load(absmax_ptr + blk, mask=mask, other=0.0).to(tl.float32)
    return absmax  # one return: the compiler types both branches


@triton.jit
def to_out_dtype(vals, OUT_TY: tl.constexpr, OUT_BF16: tl.constexpr):
    """fp32 -> the output dtype; bf16 with round-to-nearest-even written out on the bits (what the
    hardware conversion does; the Triton interpreter would truncate instead). Values are finite."""
    if OUT_BF16:
        bits = vals.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        out = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        out = vals.to(OUT_TY)
    return out


@triton.jit
def _nf4_dequant_rows_kernel(
    packed_ptr,
    absmax_ptr,
    code2_ptr,
    absmax2_ptr,
    offset_ptr,
    pairs_ptr,
    out_ptr,
    n_elements,
    BLOCKSIZE: tl.constexpr,
    BLOCKSIZE2: tl.constexpr,
    NESTED: tl.constexpr,
    ROWS: tl.constexpr,
    OUT_BF16: tl.constexpr,
):
    HB: tl.constexpr = BLOCKSIZE // 2  # packed bytes per absmax block
    pid = tl.program_id(0).to(tl.int64)
    blk = pid * ROWS + tl.arange(0, ROWS)  # [ROWS] absmax blocks of this program
    absmax = nf4_absmax(
        absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, blk, blk * BLOCKSIZE < n_elements, BLOCKSIZE2, NESTED
    )
    i = blk[:, None] * HB + tl.arange(0, HB)[None, :]  # [ROWS, HB] byte indices
    byte = tl.load(packed_ptr + i, mask=2 * i < n_elements, other=0).to(tl.int32)
    pair = tl.load(pairs_ptr + byte)  # int64: NF4[hi nibble] bits | NF4[lo] << 32
    hi = (pair & 0xFFFFFFFF).to(tl.uint32).to(tl.float32, bitcast=True) * absmax[:, None]
    lo = ((pair >> 32) & 0xFFFFFFFF).to(tl.uint32).to(tl.float32, bitcast=True) * absmax[:, None]
    vals = tl.interleave(hi, lo)  # [ROWS, BLOCKSIZE], element order
    e = blk[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    tl.store(out_ptr + e, to_out_dtype(vals, out_ptr.dtype.element_ty, OUT_BF16), mask=e < n_elements)


@functools.lru_cache(maxsize=None)
def _pair_table(device: torch.device) -> torch.Tensor:
    """int64 [256]: for byte b, the fp32 bits of NF4[b >> 4] in the low word, of NF4[b & 15] in the high."""
    bits = nf4_code("cpu").view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    b = torch.arange(256)
    pairs = bits[b >> 4] | (bits[b & 15] << 32)  # may set bit 63: wraps to a negative int64
    return pairs.to(device)


def _kernel_args(nf4):
    """(absmax, code2, absmax2, offset) as the kernel takes them; built once per NF4Weight."""
    args = nf4.__dict__.get("_kernel_args")
    if args is None:
        if nf4.nested:
            args = (nf4.absmax, nf4.code2, nf4.absmax2, nf4.offset.reshape(1).float())
        else:
            absmax = nf4.absmax.float()
            args = (absmax, absmax, absmax, absmax)  # unused pointers when NESTED=False
        nf4.__dict__["_kernel_args"] = args
    return args


# launch plans kept per weight: the training loop's buffer slots (velotune.quant.weights) need 2 per dtype
PLANS_PER_WEIGHT = 8


def dequantize_nf4_triton(nf4, out: torch.Tensor) -> torch.Tensor:
    """Write the dequantised weight of `nf4` (a quant.nf4.NF4Weight) into `out` (contiguous,
    nf4.numel elements, fp32/bf16/fp16)."""
    plan = nf4.__dict__.get("_launch_plans", {}).get((out.data_ptr(), out.dtype))
    if (
        plan is not None
        and out.numel() == nf4.numel
        and out.is_contiguous()
        and plan.device == torch.cuda.current_device()
    ):
        plan(out)
        return out
    n = nf4.numel
    assert out.is_contiguous() and out.numel() == n and nf4.packed.is_contiguous()
    if nf4.blocksize < 2 or nf4.blocksize & (nf4.blocksize - 1):
        raise ValueError(f"blocksize must be a power of two, got {nf4.blocksize}")
    absmax, code2, absmax2, offset = _kernel_args(nf4)
    fn = _nf4_dequant_rows_kernel
    rows = max(1, 2048 // nf4.blocksize)
    grid = (triton.cdiv(triton.cdiv(n, nf4.blocksize), rows),)
    args = (nf4.packed, absmax, code2, absmax2, offset, _pair_table(nf4.device), out, n)
    consts = dict(
        BLOCKSIZE=nf4.blocksize,
        BLOCKSIZE2=nf4.blocksize2,
        NESTED=nf4.nested,
        ROWS=rows,
        OUT_BF16=out.dtype == torch.bfloat16,
    )
    compiled = fn[grid](*args, **consts, num_warps=4, enable_fp_fusion=False)
    if out.is_cuda and isinstance(compiled, triton.compiler.CompiledKernel):
        plans = nf4.__dict__.setdefault("_launch_plans", {})
        if len(plans) >= PLANS_PER_WEIGHT:  # outputs at ever new addresses (not the training buffers)
            plans.clear()
        # the output is the only argument that varies for this weight (same address and dtype: same
        # specialisation), so its plan replays the compiled kernel's launcher directly (launch.py)
        plans[(out.data_ptr(), out.dtype)] = LaunchPlan(compiled, fn, grid, args, consts, slots=(6,))
    return out
