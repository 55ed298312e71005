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


@pytest.mark.parametrize("triton", [False, True])
def test_glu_forward_writes_over_gate_when_asked(triton):
    """glu_forward(..., out=gate): h lands in gate's buffer (same bits as a new tensor); a strided
    gate (Phi-3's half of [gate | up]) on the Triton path gets a new tensor instead."""
    gate, up = torch.randn(6, 40) * 2, torch.randn(6, 40)
    with force_triton(triton):
        want = glu_forward(gate, up, "silu")
        buf = gate.clone()
        h = glu_forward(buf, up, "silu", out=buf)
        assert h.data_ptr() == buf.data_ptr() and torch.equal(h, want)
        gu = torch.cat((gate, up), dim=-1)
        g_half, u_half = gu.chunk(2, dim=-1)
        want2 = glu_forward(g_half, u_half, "silu")  # (CPU elementwise rounding may follow the layout)
        h2 = glu_forward(g_half, u_half, "silu", out=g_half)
        assert torch.equal(h2, want2)


def test_glu_rejects_bad_input():
    with pytest.raises(ValueError, match="activation"):
        glu(torch.randn(2), torch.randn(2), "relu2")
    with pytest.raises(ValueError, match="shape"):
        glu(torch.randn(2), torch.randn(3), "silu")


def _lora_case(N, I, r, strided, seed=0):
    """gate, up [N, I] (halves of one [N, 2I] buffer when strided, as Phi-3's gate_up), dh [N, I],
    dhA [N, r], A [r, I]."""
    g = torch.Generator().manual_seed(seed)
    if strided:
        gu = torch.randn(N, 2 * I, generator=g) * 2
        gate, up = gu.chunk(2, dim=-1)
    else:
        gate, up = torch.randn(N, I, generator=g) * 2, torch.randn(N, I, generator=g)
    return gate, up, torch.randn(N, I, generator=g), torch.randn(N, r, generator=g), torch.randn(r, I, generator=g)


@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("N,I,r,strided", [(70, 100, 4, False), (130, 64, 16, True), (5, 9, 20, False)])
@pytest.mark.parametrize("split", [1, 3])
def test_lora_a_grad_kernel_makes_no_h(act, N, I, r, strided, split, monkeypatch):
    """dhA^T @ (act(gate) * up): the kernel (tiles over rows and columns, r padded to 16; the rows
    in `split` chunks summed after, at most one per 64-row block) vs torch and float64. N, I not
    multiples of the 64-wide tiles; r below, at and above 16."""
    from velotune.kernels import glu
    from velotune.kernels.glu import glu_lora_a_grad

    monkeypatch.setattr(glu, "LORA_A_SPLIT", split)

    gate, up, _, dhA, _ = _lora_case(N, I, r, strided)
    with force_triton():
        got = glu_lora_a_grad(dhA, gate, up, act)
    ref = glu_lora_a_grad(dhA, gate, up, act)  # CPU path: h made, then the GEMM
    ref64 = dhA.double().t() @ glu_reference(gate.double(), up.double(), act)
    assert got.dtype == torch.float32 and got.shape == (r, I)
    assert_close(got, ref, what="vs torch")
    assert_close(got, ref64, what="vs float64")


@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("N,I,r,strided", [(70, 300, 4, False), (130, 64, 16, True), (5, 9, 20, False)])
def test_lora_project_kernel_makes_no_h(act, N, I, r, strided):
    """(act(gate) * up) @ A^T: the kernel (32-row programs walking I in 128-wide steps, r padded to
    16) vs torch and float64. N, I not multiples of the tiles (I = 300: three steps, the last
    partial); r below, at and above 16."""
    from velotune.kernels.glu import glu_lora_project

    gate, up, _, _, A = _lora_case(N, I, r, strided, seed=2)
    with force_triton():
        got = glu_lora_project(gate, up, A, act)
    ref = glu_lora_project(gate, up, A, act)  # CPU path: h made, then the GEMM
    h = glu_forward(gate, up, act)
    assert torch.equal(glu_lora_project(gate, up, A, act, h=h), ref)  # a given h is used as it is
    ref64 = glu_reference(gate.double(), up.double(), act) @ A.double().t()
    assert got.dtype == gate.dtype and got.shape == (N, r)
    assert_close(got, ref, what="vs torch")
    assert_close(got, ref64, what="vs float64")


def test_float64_takes_the_torch_path():
    """float64 (the references, on the GPU too) takes the torch path (kernels.triton_enabled): the
    kernels compute in fp32 at most (on the GPU a float64 call of the rank-r kernels failed to
    compile). Bit-equal to the CPU path with Triton forced; fp32 math would differ in the low bits."""
    from velotune.kernels.glu import glu_lora_a_grad, glu_lora_project

    gate, up, _, dhA, A = (t.double() for t in _lora_case(70, 300, 4, False, seed=3))
    want = (glu_lora_project(gate, up, A, "silu"), glu_lora_a_grad(dhA, gate, up, "silu"))
    want += (glu_forward(gate, up, "silu"),)
    with force_triton():
        got = (
            glu_lora_project(gate, up, A, "silu"),
            glu_lora_a_grad(dhA, gate, up, "silu"),
            glu_forward(gate, up, "silu"),
        )
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("N,I,r,strided", [(70, 100, 4, False), (130, 64, 16, True), (5, 9, 20, False)])
def test_glu_backward_folds_the_rank_r_gradient_in(act, N, I, r, strided):
    """glu_backward(dh, gate, up, lora=(dhA, A)) == glu_backward(dh + dhA @ A, gate, up): in place
    (strided halves too), against the CPU path and float64."""
    gate, up, dh, dhA, A = _lora_case(N, I, r, strided, seed=1)
    g64, u64 = leaf(gate, torch.float64), leaf(up, torch.float64)
    ref64 = torch.autograd.grad(glu_reference(g64, u64, act), [g64, u64], (dh + dhA @ A).double())
    ref = glu_backward(dh, gate.clone(), up.clone(), act, lora=(dhA, A))  # CPU: addmm, then the torch backward
    gbuf, ubuf = gate.clone(), up.clone()
    if strided:
        buf = torch.cat((gate, up), dim=-1)
        gbuf, ubuf = buf.chunk(2, dim=-1)
    with force_triton():
        dg, du = glu_backward(dh, gbuf, ubuf, act, lora=(dhA, A))
    assert dg.data_ptr() == gbuf.data_ptr() and du.data_ptr() == ubuf.data_ptr()
    for name, a, b, b64 in zip(("dgate", "dup"), (dg, du), ref, ref64):
        assert_close(a, b, what=f"{name} vs torch")
        assert_close(a, b64.float(), what=f"{name} vs float64")
