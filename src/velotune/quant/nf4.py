"""NF4 (4-bit NormalFloat) in the bitsandbytes format: code book, quantise, dequantise.

The format (bitsandbytes 0.4x-0.5x `Params4bit` + `QuantState`), for a weight W [out, in] whose
n = out * in elements are read flattened, row-major:

    packed  uint8 [ceil(n / 2)]       byte i = (q[2i] << 4) | q[2i + 1]       (high nibble first)
    absmax  one per block of `blocksize` (64) elements: max |W| over the block, either
            plain:   fp32 [nblocks]
            nested:  ("double quantisation") uint8 codes [nblocks] into the 256-entry signed dynamic
                     map `code2`, scaled per block of `blocksize2` (256) absmax values by fp32
                     `absmax2` [ceil(nblocks / 256)], shifted by the fp32 scalar `offset`:
                         absmax[b] = fp32( fp32(code2[qa[b]] * absmax2[b // 256]) + offset )
    W[e]  = to_dtype( fp32(NF4[q[e]] * absmax[e // blocksize]) )

Every step above is one correctly rounded fp32 operation (a product, then a separate sum: never a
fused multiply-add), exactly as bitsandbytes' CUDA and CPU kernels compute it. So a float64
evaluation rounded to fp32 after each operation gives the same bits, and so do we.

The CPU path is the plain-PyTorch reference below; CUDA tensors (or `velotune.kernels.force_triton()`)
use the Triton kernel in `quant/dequant_kernel.py`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from velotune.kernels import triton_enabled
from velotune.quant.dequant_kernel import dequantize_nf4_triton
from velotune.quant.nf4_code import nf4_code

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """bitsandbytes' 8-bit "dynamic" map (the code book of the nested absmax), fp32 [256], sorted.

    Same construction as `bitsandbytes.functional.create_dynamic_map`, so quantisation works without
    bitsandbytes installed: a sign, a run of zero bits as a decimal exponent (10^-6 .. 10^0), the rest
    a linear fraction in [0.1, 1].
    """
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        fraction_items = int(
            2 ** (i + non_sign_bits - max_exponent_bits) + 1
            if signed
            else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1
        )
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    if additional_items > 0:
        boundaries = torch.linspace(0.1, 1, additional_items + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data.append(0)
    data.append(1.0)
    gap = 256 - len(data)
    data += [0.0] * gap
    return torch.tensor(data, dtype=torch.float32).sort().values


@dataclass
class NF4Weight:
    """One NF4-quantised tensor (the tensors are those of the bitsandbytes objects, not copies).

    packed    uint8 [ceil(n/2)]        two codes per byte, high nibble first
    absmax    uint8 [nblocks] (nested) or fp32 [nblocks]
    shape     the original shape; n = prod(shape)
    dtype     the dtype bitsandbytes dequantises to (the dtype the weight was quantised from)
    blocksize elements per absmax
    code2, absmax2, offset, blocksize2: the nested (double-quantised) absmax state, else None
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    code2: torch.Tensor | None = None
    absmax2: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    blocksize2: int = 256

    @property
    def nested(self) -> bool:
        return self.code2 is not None

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @classmethod
    def from_bnb(cls, data: torch.Tensor, quant_state) -> "NF4Weight":
        """Wrap bitsandbytes' packed data (any `quant_storage` dtype) and its `QuantState`."""
        if getattr(quant_state, "packing_format_for_cpu", False):
            # bitsandbytes' CPU inference (eval mode, no grad, AVX512-BF16 CPUs) repacks the weight in
            # place into its own layout with a bf16 absmax; that is no longer the NF4 format.
            raise ValueError(
                "this 4-bit weight was repacked by bitsandbytes' CPU inference path (an eval-mode "
                "forward without gradients); reload the model, or run it in train mode"
            )
        if quant_state.quant_type != "nf4":
            raise ValueError(f"velotune dequantises NF4 only, got quant_type={quant_state.quant_type!r}")
        packed = data.reshape(-1)
        if packed.dtype != torch.uint8:
            packed = packed.view(torch.uint8)
        nested = bool(quant_state.nested)
        s2 = quant_state.state2 if nested else None
        return cls(
            packed=packed,
            absmax=quant_state.absmax,
            shape=torch.Size(quant_state.shape),
            dtype=quant_state.dtype,
            blocksize=int(quant_state.blocksize),
            code2=s2.code if nested else None,
            absmax2=s2.absmax if nested else None,
            offset=quant_state.offset if nested else None,
            blocksize2=int(s2.blocksize) if nested else 256,
        )

    def rows(self, start: int, stop: int) -> "NF4Weight":
        """Rows start:stop of a 2-D weight as an NF4Weight of their own, sharing this one's storage
        (views, no copy): dequantising it gives exactly rows start:stop of the whole dequantised. For
        working on a weight a block of rows at a time (a block of the MLP's intermediate size).
        The rows must start and end on a quantisation block: start * in_features a multiple of
        blocksize (and of blocksize * blocksize2 when nested, so the nested absmax groups line up)."""
        if len(self.shape) != 2:
            raise ValueError(f"rows() needs a 2-D weight, got shape {tuple(self.shape)}")
        n_rows, cols = self.shape
        if not 0 <= start <= stop <= n_rows:
            raise ValueError(f"rows {start}:{stop} outside 0:{n_rows}")
        unit = self.blocksize * (self.blocksize2 if self.nested else 1)
        for r in (start, stop):
            if r != n_rows and (r * cols) % unit:
                raise ValueError(
                    f"rows {start}:{stop}: row {r} does not start a quantisation block "
                    f"(row * {cols} must be a multiple of {unit})"
                )
        a, b = start * cols, stop * cols
        blocks = slice(a // self.blocksize, -(-b // self.blocksize))
        absmax2 = None
        if self.nested:
            absmax2 = self.absmax2[blocks.start // self.blocksize2 : -(-blocks.stop // self.blocksize2)]
        return dataclasses.replace(
            self,
            packed=self.packed[a // 2 : -(-b // 2)],
            absmax=self.absmax[blocks],
            absmax2=absmax2,
            shape=torch.Size((stop - start, cols)),
        )

    def to_bnb(self):
        """(packed [ceil(n/2), 1], QuantState) as bitsandbytes builds them (needs bitsandbytes)."""
        from bitsandbytes.functional import QuantState

        state2 = None
        if self.nested:
            state2 = QuantState(absmax=self.absmax2, code=self.code2, blocksize=self.blocksize2, dtype=torch.float32)
        qs = QuantState(
            absmax=self.absmax,
            shape=torch.Size(self.shape),
            code=nf4_code(self.device),
            blocksize=self.blocksize,
            quant_type="nf4",
            dtype=self.dtype,
            offset=self.offset,
            state2=state2,
        )
        return self.packed.reshape(-1, 1), qs


# ----------------------------------------------------------------------------------------------
# Quantisation (plain PyTorch; the same arithmetic as bitsandbytes' default backend)
# ----------------------------------------------------------------------------------------------


def _blockwise_absmax_and_scaled(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x fp32 [n] -> absmax fp32 [nblocks], x scaled into [-1, 1] fp32 [n] (last block may be short)."""
    n = x.numel()
    pad = (-n) % blocksize
    xb = torch.nn.functional.pad(x, (0, pad)).view(-1, blocksize)
    absmax = xb.abs().amax(dim=1)
    # x * (1 / absmax), as bitsandbytes computes it (not x / absmax: a different rounding).
    scaled = torch.clamp(xb * (1.0 / absmax.clamp(min=1e-38)).view(-1, 1), -1, 1).reshape(-1)[:n]
    return absmax, scaled


def _nearest(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of the sorted `code` (ties go up, as bitsandbytes' bucketize)."""
    bounds = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, bounds, out_int32=True).to(torch.uint8)


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True, blocksize2: int = 256) -> NF4Weight:
    """Quantise `w` (fp32/bf16/fp16, any shape) to NF4 in the bitsandbytes layout.

    Bit-identical to `bitsandbytes.functional.quantize_4bit(w, blocksize, compress_statistics=
    double_quant, quant_type="nf4")` on its default (PyTorch) backend; tests check this.
    """
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize}")
    if w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"NF4 quantises fp32/bf16/fp16 tensors, got {w.dtype}")
    x = w.detach().reshape(-1).float()
    absmax, scaled = _blockwise_absmax_and_scaled(x, blocksize)
    q = _nearest(scaled, nf4_code(w.device))
    if q.numel() % 2:
        q = torch.cat([q, q.new_zeros(1)])
    packed = (q[0::2] << 4) | q[1::2]
    out = NF4Weight(packed=packed, absmax=absmax, shape=torch.Size(w.shape), dtype=w.dtype, blocksize=blocksize)
    if double_quant:
        offset = absmax.mean()
        absmax2, scaled2 = _blockwise_absmax_and_scaled(absmax - offset, blocksize2)
        code2 = dynamic_map().to(w.device)
        out.absmax, out.code2, out.absmax2, out.offset = _nearest(scaled2, code2), code2, absmax2, offset
        out.blocksize2 = blocksize2
    return out


# ----------------------------------------------------------------------------------------------
# Dequantisation: reference (the CPU path) and dispatch
# ----------------------------------------------------------------------------------------------


def absmax_reference(nf4: NF4Weight) -> torch.Tensor:
    """The per-block absmax, fp32 [nblocks]: for nested states, product then sum (two roundings)."""
    if not nf4.nested:
        return nf4.absmax.float()
    a2 = nf4.absmax2.repeat_interleave(nf4.blocksize2)[: nf4.absmax.numel()]
    return nf4.code2[nf4.absmax.long()] * a2 + nf4.offset  # two separate ops in eager torch: no FMA


def dequantize_nf4_reference(nf4: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Plain-PyTorch dequantisation: a fresh tensor of `nf4.shape` in `dtype` (default nf4.dtype)."""
    dtype = dtype or nf4.dtype
    n = nf4.numel
    codes = torch.stack([nf4.packed >> 4, nf4.packed & 15], dim=1).reshape(-1)[:n].long()
    absmax = absmax_reference(nf4).repeat_interleave(nf4.blocksize)[:n]
    return (nf4_code(nf4.device)[codes] * absmax).to(dtype).reshape(nf4.shape)


def dequantize_nf4(nf4: NF4Weight, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantise to `dtype` (default: the dtype bitsandbytes would give), into `out` if given.

    `out`: a contiguous tensor of at least prod(shape) elements of `dtype` (its first prod(shape)
    elements are written and returned viewed as `shape`). CUDA (or `force_triton()`): velotune's
    Triton kernel; CPU: the reference. Both are bit-identical to bitsandbytes.
    """
    dtype = dtype or nf4.dtype
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"NF4 dequantises to fp32/bf16/fp16, got {dtype}")
    n = nf4.numel
    if out is not None:
        if out.dtype != dtype or not out.is_contiguous() or out.numel() < n or out.device != nf4.device:
            raise ValueError(f"out must be a contiguous {dtype} tensor on {nf4.device} with >= {n} elements")
        out = out.view(-1)[:n].view(nf4.shape)
    if triton_enabled(nf4.packed):
        if out is None:
            out = torch.empty(nf4.shape, dtype=dtype, device=nf4.device)
        dequantize_nf4_triton(nf4, out)
        return out
    w = dequantize_nf4_reference(nf4, dtype)
    if out is None:
        return w
    out.copy_(w)
    return out
