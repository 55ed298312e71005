"""RMSNorm Triton kernel (interpreter) vs the torch reference and a float64 reference."""

import pytest
import torch

import velotune.kernels.rmsnorm as rmsnorm_mod
from kernel_checks import assert_close, grads, leaf
from velotune.kernels import force_triton
from velotune.kernels.rmsnorm import rms_norm, rms_norm_reference


def _run(x, w, offset, dy, fn):
    y = fn(x, w, 1e-6, offset=offset)
    return (y, *grads(y, [x, w], dy))


CASES = [  # (shape of x, offset, weight trainable, non-contiguous, max block)
    ((1, 1, 7), 0.0, True, False, None),  # batch 1, odd hidden
    ((3, 5, 33), 1.0, True, False, None),  # Gemma style, odd hidden
    ((4, 3, 32), 0.0, False, True, None),  # frozen weight, transposed (non-contiguous) input
    ((2, 37), 1.0, True, False, 16),  # row longer than one block: chunked path
    ((2, 16385), 0.0, True, False, None),  # > 16384, odd: chunked at the default block cap
]


@pytest.mark.parametrize("shape,offset,train_w,noncontig,block", CASES)
def test_rmsnorm_kernel(shape, offset, train_w, noncontig, block, monkeypatch):
    if block:
        monkeypatch.setattr(rmsnorm_mod, "MAX_BLOCK", block)
    H = shape[-1]
    base = torch.randn(shape[1], shape[0], H) if noncontig else torch.randn(shape)
    w0, dy = torch.randn(H), torch.randn(shape)

    def inputs(dtype):
        x = leaf(base, dtype)
        return (x.transpose(0, 1) if noncontig else x), leaf(w0, dtype, grad=train_w)

    x, w = inputs(torch.float32)
    assert x.is_contiguous() != noncontig
    with force_triton():
        got = _run(x, w, offset, dy, rms_norm)
    ref = _run(*inputs(torch.float32), offset, dy, rms_norm_reference)
    ref64 = _run(*inputs(torch.float64), offset, dy.double(), rms_norm_reference)
    for name, g, r, r64 in zip(("y", "dx", "dw"), got, ref, ref64):
        if r is None:
            assert g is None, f"{name} computed for a frozen weight"
            continue
        assert_close(g, r, what=f"{name} vs torch")
        assert_close(g, r64.float(), what=f"{name} vs float64")


def test_rmsnorm_kernel_llama_mixed_dtypes():
    """bf16 activations with an fp32 weight: output promotes to fp32 like LlamaRMSNorm.
    (The interpreter casts fp32 -> bf16 by truncation, the GPU rounds to nearest: compare to one
    bf16 ulp here; bench/fused_kernels.py checks bf16 accuracy on the GPU.)"""
    x = torch.randn(3, 17).to(torch.bfloat16)
    w = torch.randn(17)
    with force_triton():
        y = rms_norm(x, w, 1e-5)
    ref = rms_norm_reference(x, w, 1e-5)
    assert y.dtype == ref.dtype == torch.float32
    assert_close(y, ref, tol=2**-7)


@pytest.mark.parametrize("shape,block", [((3, 5, 33), None), ((2, 37), 16)])
def test_rmsnorm_kernel_weight_in_fp32(shape, block, monkeypatch):
    """OLMo 2's convention: (w * n) in fp32, rounded once; equal to Olmo2RMSNorm and to float64, with
    bf16 input rounding like the stock module's (one bf16 ulp on the interpreter, see above)."""
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm

    if block:
        monkeypatch.setattr(rmsnorm_mod, "MAX_BLOCK", block)
    H = shape[-1]
    x0, w0, dy = torch.randn(shape), torch.randn(H), torch.randn(shape)
    x, w = leaf(x0, torch.float32), leaf(w0, torch.float32)
    with force_triton():
        got = (rms_norm(x, w, 1e-6, weight_in_fp32=True),)
    got = (*got, *grads(got[0], [x, w], dy))
    stock = Olmo2RMSNorm(H, eps=1e-6).double()
    with torch.no_grad():
        stock.weight.copy_(w0)
    x64 = leaf(x0, torch.float64)
    y64 = stock(x64)
    ref64 = (y64, *grads(y64, [x64, stock.weight], dy.double()))
    for name, g, r64 in zip(("y", "dx", "dw"), got, ref64):
        assert_close(g, r64.float(), what=f"{name} vs float64 Olmo2RMSNorm")
    xb = x0.to(torch.bfloat16)
    stock_b = Olmo2RMSNorm(H, eps=1e-6).to(torch.bfloat16)
    with torch.no_grad():
        stock_b.weight.copy_(w0)
    with force_triton():
        yb = rms_norm(xb, stock_b.weight, 1e-6, weight_in_fp32=True)
    assert yb.dtype == torch.bfloat16
    assert torch.equal(rms_norm_reference(xb, stock_b.weight, 1e-6, weight_in_fp32=True), stock_b(xb))
    torch.testing.assert_close(yb.float(), stock_b(xb).float(), rtol=2**-7, atol=0)
