"""NF4 format: code book, quantise, dequantise (reference and Triton under the interpreter).

Bit-exact everywhere: against bitsandbytes' own CPU implementation, and against a float64
evaluation of the code book rounded to fp32 after each operation (what the format defines).
"""

from __future__ import annotations

import pytest
import torch

from velotune.kernels import force_triton
from velotune.quant.nf4_code import NF4_LEVELS
from velotune.quant.nf4 import (
    NF4Weight,
    absmax_reference,
    dequantize_nf4,
    dequantize_nf4_reference,
    dynamic_map,
    quantize_nf4,
)

bnbF = pytest.importorskip("bitsandbytes.functional")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# (shape, blocksize): odd block counts, a partial last block, > 256 blocks (so the nested absmax has
# two second-level blocks, the second one partial). ODD adds an odd element count, which our code
# handles but bitsandbytes' CPU backend sends through torch.compile (a minute per shape): kept out
# of the comparisons with bitsandbytes.
SHAPES = [((96, 192), 64), ((5, 70), 64), ((33, 192), 64), ((300, 64), 64), ((24, 40), 32), ((3, 512), 128)]
ODD = [((7, 9), 64)]
# Rows not a multiple of the block: bitsandbytes 0.50.2's CPU C kernel dequantises these wrongly
# (round-trip error 4x that of its own PyTorch backend), so they are compared with the latter.
RAGGED = [((64, 96), 64), ((32, 160), 128)]


def _weight(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * torch.rand(shape[0], 1, generator=g).mul(3)  # uneven block scales
    return w.to(dtype)


def _float64_dequant(nf4: NF4Weight, dtype) -> torch.Tensor:
    """The format's definition evaluated in float64, rounded to fp32 after each operation."""
    f32 = lambda x: x.float().double()  # noqa: E731  round a float64 value to fp32 (exact products stay exact)
    code = torch.tensor(NF4_LEVELS, dtype=torch.float64)
    n = nf4.numel
    q = torch.stack([nf4.packed >> 4, nf4.packed & 15], 1).reshape(-1)[:n].long()
    if nf4.nested:
        a2 = nf4.absmax2.double().repeat_interleave(nf4.blocksize2)[: nf4.absmax.numel()]
        absmax = f32(f32(nf4.code2.double()[nf4.absmax.long()] * a2) + nf4.offset.double())
    else:
        absmax = nf4.absmax.double()
    w = f32(code[q] * absmax.repeat_interleave(nf4.blocksize)[:n])
    return w.to(dtype).reshape(nf4.shape)


def test_code_book_is_bitsandbytes_and_the_normal_quantiles():
    ours = torch.tensor(NF4_LEVELS, dtype=torch.float32)
    assert torch.equal(ours, bnbF.get_4bit_type("nf4", device="cpu"))
    # Rebuilt from N(0,1) quantiles in float64 (QLoRA's construction: 8 positive, 7 negative, 0),
    # stored in fp32, normalised by the largest: bit for bit the table.
    off = 0.9677083
    pos = torch.special.ndtri(torch.linspace(off, 0.5, 9)[:-1].double())
    neg = -torch.special.ndtri(torch.linspace(off, 0.5, 8)[:-1].double())
    v = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).float().sort().values
    assert torch.equal(v / v.max(), ours)
    assert torch.equal(dynamic_map(), bnbF.create_dynamic_map())


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_matches_bitsandbytes(dtype):
    """4-bit codes and fp32 absmax: bit-exact with bitsandbytes' CPU implementation.

    The nested (8-bit) absmax codes: ours is the nearest code of the dynamic map; bitsandbytes' CPU
    C kernel uses a fast search that picks a neighbour of the nearest code for ~0.1% of values (its
    PyTorch and CUDA backends pick the nearest). So there we check nearest-ness and adjacency.
    """
    for i, (shape, bs) in enumerate(SHAPES):
        w = _weight(shape, dtype, seed=i)
        for double_quant in (False, True):
            ref_q, ref_s = bnbF.quantize_4bit(w, blocksize=bs, compress_statistics=double_quant, quant_type="nf4")
            ours = quantize_nf4(w, blocksize=bs, double_quant=double_quant)
            assert torch.equal(ours.packed, ref_q.reshape(-1)), shape
            assert ours.nested == ref_s.nested
            if not double_quant:
                assert torch.equal(ours.absmax, ref_s.absmax), shape
                continue
            assert torch.equal(ours.absmax2, ref_s.state2.absmax) and torch.equal(ours.offset, ref_s.offset)
            assert torch.equal(ours.code2, ref_s.state2.code)
            # nearest code, in float64, of the scaled absmax
            am = w.reshape(-1).float()
            am = torch.nn.functional.pad(am, (0, (-am.numel()) % bs)).view(-1, bs).abs().amax(1).double()
            x = (am - ours.offset.double()) / ours.absmax2.double().repeat_interleave(256)[: am.numel()]
            dist = lambda q: (x - ours.code2.double()[q.long()]).abs()  # noqa: E731
            assert (dist(ours.absmax) <= dist(ref_s.absmax) + 1e-7).all()
            diff = ours.absmax.long() - ref_s.absmax.long()
            assert diff.abs().max() <= 1 and (diff != 0).float().mean() < 0.05


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_is_nearest_code_float64(dtype):
    """Round trip vs a float64 reference: each value maps to its nearest NF4 level (ties aside)."""
    code = torch.tensor(NF4_LEVELS, dtype=torch.float64)
    for i, (shape, bs) in enumerate(SHAPES + ODD):
        w = _weight(shape, dtype, seed=30 + i)
        nf4 = quantize_nf4(w, blocksize=bs, double_quant=False)
        x = w.reshape(-1).double()
        absmax = nf4.absmax.double().repeat_interleave(bs)[: x.numel()]
        scaled = x / absmax
        d = (scaled[:, None] - code[None, :]).abs()  # [n, 16]
        q = torch.stack([nf4.packed >> 4, nf4.packed & 15], 1).reshape(-1)[: x.numel()].long()
        best = d.min(1).values
        assert (d.gather(1, q[:, None])[:, 0] <= best + 1e-6).all()  # nearest, up to fp32 rounding of ties
        assert (q == d.argmin(1)).float().mean() > 0.999
        # and the dequantised value is that level times the block's absmax, rounded once
        assert torch.equal(dequantize_nf4(nf4), _float64_dequant(nf4, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_reference_bit_exact(dtype):
    """bitsandbytes' own states (nested and plain) read through from_bnb: equal to bitsandbytes'
    CPU dequantisation and to the float64 evaluation of the format."""
    for i, (shape, bs) in enumerate(SHAPES):
        w = _weight(shape, dtype, seed=10 + i)
        for double_quant in (True, False):
            q, state = bnbF.quantize_4bit(w, blocksize=bs, compress_statistics=double_quant, quant_type="nf4")
            nf4 = NF4Weight.from_bnb(q, state)
            ours = dequantize_nf4(nf4)  # CPU tensors: the reference path
            assert ours.dtype == dtype and ours.shape == w.shape
            assert torch.equal(ours, bnbF.dequantize_4bit(q, state)), shape
            assert torch.equal(ours, _float64_dequant(nf4, dtype)), shape
            theirs = (
                bnbF.dequantize_blockwise(state.absmax, state.state2) + state.offset if double_quant else state.absmax
            )
            assert torch.equal(absmax_reference(nf4), theirs)


def test_dequantize_matches_bitsandbytes_pytorch_backend():
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    reference = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)  # no torch.compile
    for i, (shape, bs) in enumerate(SHAPES + RAGGED):
        for dtype in DTYPES:
            w = _weight(shape, dtype, seed=40 + i)
            q, state = bnbF.quantize_4bit(w, blocksize=bs, compress_statistics=True, quant_type="nf4")
            nf4 = NF4Weight.from_bnb(q, state)
            theirs = reference(
                q.reshape(-1), absmax_reference(nf4), bnbF.get_4bit_type("nf4", device="cpu"), bs, tuple(shape), dtype
            )
            assert torch.equal(dequantize_nf4(nf4), theirs), (shape, dtype)
            assert torch.equal(dequantize_nf4(nf4), _float64_dequant(nf4, dtype)), (shape, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_kernel_bit_exact_under_interpreter(dtype):
    for i, (shape, bs) in enumerate(SHAPES + ODD + RAGGED):
        for double_quant in (True, False):
            w = _weight(shape, torch.float32, seed=20 + i)
            nf4 = quantize_nf4(w, blocksize=bs, double_quant=double_quant)
            nf4.dtype = dtype
            ref = dequantize_nf4_reference(nf4)
            out = torch.full((w.numel() + 5,), float("nan"), dtype=dtype)  # poisoned, oversized
            with force_triton():
                got = dequantize_nf4(nf4, out=out)
            assert got.data_ptr() == out.data_ptr() and got.shape == w.shape
            assert torch.equal(got, ref), (shape, double_quant)
            assert torch.isnan(out[w.numel() :]).all()  # nothing written past the weight


def test_triton_kernel_matches_bitsandbytes_on_its_own_states():
    """States produced by bitsandbytes itself (bf16 weight, nested absmax), read through from_bnb."""
    w = _weight((40, 192), torch.bfloat16, seed=3)
    q, state = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    with force_triton():
        got = dequantize_nf4(NF4Weight.from_bnb(q, state))
    assert torch.equal(got, bnbF.dequantize_4bit(q, state))


def test_to_bnb_round_trip_and_errors():
    w = _weight((8, 64), torch.bfloat16)
    nf4 = quantize_nf4(w)
    q, state = nf4.to_bnb()
    assert torch.equal(bnbF.dequantize_4bit(q, state), dequantize_nf4(nf4))
    with pytest.raises(ValueError, match="blocksize"):
        quantize_nf4(w, blocksize=48)
    with pytest.raises(ValueError, match="fp32/bf16/fp16"):
        quantize_nf4(w.to(torch.float64))
    with pytest.raises(ValueError, match="out must be"):
        dequantize_nf4(nf4, out=torch.empty(10, dtype=torch.bfloat16))
    fq, fstate = bnbF.quantize_4bit(w, blocksize=64, quant_type="fp4")
    with pytest.raises(ValueError, match="NF4 only"):
        NF4Weight.from_bnb(fq, fstate)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_kernel_bit_exact_vs_bitsandbytes_cuda(dtype):
    """On the GPU: bitsandbytes' CUDA quantiser and dequantiser vs our Triton kernel (and our reference)."""
    for i, (shape, bs) in enumerate(SHAPES + RAGGED + [((1024, 4096), 64), ((4096, 1408), 64)]):
        w = _weight(shape, dtype, seed=50 + i).cuda()
        q, state = bnbF.quantize_4bit(w, blocksize=bs, compress_statistics=True, quant_type="nf4")
        nf4 = NF4Weight.from_bnb(q, state)
        ours = dequantize_nf4(nf4)
        assert torch.equal(ours, bnbF.dequantize_4bit(q, state)), (shape, dtype)
        assert torch.equal(ours, dequantize_nf4_reference(nf4)), (shape, dtype)
        from velotune.quant.dequant_kernel import dequantize_nf4_triton

        # the launch plans (kernels/launch.py): a repeated call, then an output 2 bytes off
        # 16-byte alignment (its own plan, made by the JIT for that alignment), both still exact
        again = dequantize_nf4_triton(nf4, torch.empty_like(ours).view(-1))
        assert torch.equal(again.view(ours.shape), ours), (shape, dtype)
        buf = torch.empty(ours.numel() + 8, dtype=ours.dtype, device=ours.device)
        for _ in range(2):  # the second call replays the launch plan made by the first
            buf.fill_(float("nan"))
            odd = dequantize_nf4_triton(nf4, buf[1 : 1 + ours.numel()])
            assert torch.equal(odd.view(ours.shape), ours), (shape, dtype)
            assert torch.isnan(buf[0]) and torch.isnan(buf[1 + ours.numel() :]).all()
        with pytest.raises(AssertionError):  # same address, wrong size: no replay, the check fires
            dequantize_nf4_triton(nf4, buf[1 : ours.numel()])


@pytest.mark.parametrize("nested", [True, False])
def test_row_blocks_dequantise_to_the_rows_of_the_whole(nested):
    """NF4Weight.rows(a, b): views of the same storage whose dequantisation is exactly rows a:b of the
    whole (reference and Triton kernel), including the last, partial nested absmax group; rows that
    do not start a quantisation block are refused."""
    w = _weight((160, 256), torch.bfloat16, seed=4)  # 640 blocks of 64: nested groups 256, 256, 128
    nf4 = quantize_nf4(w, 64, double_quant=nested)
    whole = dequantize_nf4(nf4)
    cuts = [0, 64, 128, 160] if nested else [0, 1, 64, 97, 160]  # nested: 64 rows = one group of 256 blocks
    for a, b in zip(cuts, cuts[1:]):
        part = nf4.rows(a, b)
        assert part.packed.data_ptr() == nf4.packed.data_ptr() + a * 256 // 2  # a view, no copy
        assert torch.equal(dequantize_nf4(part), whole[a:b])
        with force_triton():
            assert torch.equal(dequantize_nf4(part), whole[a:b])
    assert torch.equal(dequantize_nf4(nf4.rows(0, 160)), whole)
    for a, b in ([32, 64], [0, 200], [5, 3]) if nested else ([0, 161], [5, 3]):
        with pytest.raises(ValueError, match="rows"):
            nf4.rows(a, b)
