"""SwiGLU / GeGLU Triton kernels (interpreter) vs the torch reference and a float64 reference."""
import pytest
import torch

from kernel_checks import assert_close, grads, leaf
from velotune.kernels import force_triton
from velotune.kernels.glu import glu, glu_backward, glu_forward, glu_reference


@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("noncontig", [False, True])
def test_glu_kernel(act, noncontig):
    shape = (3, 37)  # odd
    g0 = torch.randn(shape[::-1] if noncontig else shape) * 3
    u0 = torch.randn(g0.shape)
    dh = torch.randn(shape)

    def run(fn, dtype):
        g, u = leaf(g0, dtype), leaf(u0, dtype)
        gv, uv = (g.t(), u.t()) if noncontig else (g, u)
        h = fn(gv, uv, act)
        return (h, *grads(h, [g, u], dh.to(dtype)))

    with force_triton():
        got = run(glu, torch.float32)
    ref = run(glu_reference, torch.float32)
    ref64 = run(glu_reference, torch.float64)
    for name, a, r, r64 in zip(("h", "dgate", "dup"), got, ref, ref64):
        assert_close(a, r, what=f"{name} vs torch")
        assert_close(a, r64.float(), what=f"{name} vs float64")


@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh"])
def test_glu_raw_pair_reuses_buffers(act):
    gate, up, dh = torch.randn(2, 5, 11), torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    g, u = leaf(gate), leaf(up)
    h_ref = glu_reference(g, u, act)
    dg_ref, du_ref = torch.autograd.grad(h_ref, [g, u], dh)
    with force_triton():
        h = glu_forward(gate, up, act)
        gbuf, ubuf = gate.clone(), up.clone()
        dg, du = glu_backward(dh, gbuf, ubuf, act)
    assert dg.data_ptr() == gbuf.data_ptr() and du.data_ptr() == ubuf.data_ptr()
    assert_close(h, h_ref)
    assert_close(dg, dg_ref)
    assert_close(du, du_ref)


def test_glu_rejects_bad_input():
    with pytest.raises(ValueError, match="activation"):
        glu(torch.randn(2), torch.randn(2), "relu2")
    with pytest.raises(ValueError, match="shape"):
        glu(torch.randn(2), torch.randn(3), "silu")
