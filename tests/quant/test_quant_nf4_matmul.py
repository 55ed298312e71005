"""Fused NF4 matmul (dequantisation inside the GEMM's K loop) under the Triton interpreter.

Multiplying by the identity picks single weights out of the sum (one non-zero product per output,
exact in fp32), so Y = I @ W^T must equal the dequantised W^T bit for bit in every dtype: the fused
kernel consumes exactly the values the standalone dequantisation (and bitsandbytes) produces. A
random X then checks the GEMM itself against the unfused path.
"""
from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from velotune.kernels import force_triton
from velotune.quant.nf4 import dequantize_nf4, nf4_code, quantize_nf4
from velotune.quant.nf4_matmul import _expand, nf4_linear, nf4_linear_reference


def _nf4(N, K, dtype, double_quant=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(N, K, generator=g) * torch.rand(N, 1, generator=g).mul(3)).to(dtype)
    return quantize_nf4(w, blocksize=64, double_quant=double_quant)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])   # bf16: the interpreter's tl.dot reads raw bits
@pytest.mark.parametrize("double_quant", [True, False])
def test_fused_weights_are_the_dequantised_weights(dtype, double_quant):
    N, K = 80, 256                              # N not a multiple of the tile: masked edges
    nf4 = _nf4(N, K, dtype, double_quant)
    eye = torch.eye(K, dtype=dtype)
    with force_triton():
        y = nf4_linear(eye, nf4)                # [K, N] = W^T
    assert y.dtype == dtype and torch.equal(y, dequantize_nf4(nf4).t())


@triton.jit
def _expand_and_store(out_ptr, packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, nf4_ptr, K, N,
                      BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, OUT_BF16: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    w = _expand(packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, nf4_ptr, offs_n, k0, K, N,
                BLOCKSIZE, BLOCKSIZE2, NESTED, BLOCK_N, BLOCK_K, OUT_BF16, out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs_n[:, None] * K + k0 + tl.arange(0, BLOCK_K)[None, :], w, mask=offs_n[:, None] < N)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_tile_expansion_is_bit_exact(dtype):
    """The in-register expansion the GEMM feeds to tl.dot, stored out: the dequantised weight, bit for bit
    (covers bf16, whose rounding is written out on the bits)."""
    N, K = 80, 256
    nf4 = _nf4(N, K, dtype)
    out = torch.full((N, K), float("nan"), dtype=dtype)
    with force_triton():
        _expand_and_store[(triton.cdiv(N, 32), K // 128)](
            out, nf4.packed, nf4.absmax, nf4.code2, nf4.absmax2, nf4.offset.reshape(1).float(), nf4_code("cpu"),
            K, N, BLOCKSIZE=64, BLOCKSIZE2=nf4.blocksize2, NESTED=True, BLOCK_N=32, BLOCK_K=128,
            OUT_BF16=dtype == torch.bfloat16)
    assert torch.equal(out, dequantize_nf4(nf4))


@pytest.mark.parametrize("M", [5, 40, 130])     # the three tile configurations
def test_fused_matmul_matches_unfused(M):
    N, K = 72, 256
    nf4 = _nf4(N, K, torch.float32)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M))
    with force_triton():
        y = nf4_linear(x, nf4)
    ref = nf4_linear_reference(x, nf4)
    ref64 = x.double() @ dequantize_nf4(nf4).double().t()
    assert ((y - ref).norm() / ref.norm()).item() <= 1e-6
    assert ((y.double() - ref64).norm() / ref64.norm()).item() <= 1e-6


def test_fused_matmul_errors_and_fallbacks():
    nf4 = _nf4(16, 192, torch.float32)          # K = 192: not a multiple of the 128-wide K tile
    x = torch.randn(3, 192)
    with force_triton():
        assert torch.equal(nf4_linear(x, nf4), nf4_linear_reference(x, nf4))
        with pytest.raises(ValueError, match="must be"):
            nf4_linear(torch.randn(3, 100), nf4)
        with pytest.raises(ValueError, match="dtype"):
            nf4_linear(x.to(torch.bfloat16), nf4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_matmul_on_gpu(dtype):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    N, K = 1000, 1024
    g = torch.Generator(device="cuda").manual_seed(0)
    nf4 = quantize_nf4((torch.randn(N, K, device="cuda", generator=g)).to(dtype))
    eye = torch.eye(K, dtype=dtype, device="cuda")
    assert torch.equal(nf4_linear(eye, nf4), dequantize_nf4(nf4).t())       # the weights, bit for bit
    for M in (1, 40, 4096):
        x = torch.randn(M, K, device="cuda", generator=g).to(dtype)
        ref64 = x.double() @ dequantize_nf4(nf4).double().t()
        err = lambda y: ((y.double() - ref64).norm() / ref64.norm()).item()  # noqa: E731
        assert err(nf4_linear(x, nf4)) <= 1.5 * err(nf4_linear_reference(x, nf4)) + 1e-6
