"""On a CUDA GPU (skipped elsewhere): each kernel's bf16 error vs float64 is within 1.5x of the stock
path's, forward and gradients. bench/fused_kernels.py runs the same check at Llama-3-8B sizes."""

import pytest
import torch

pytestmark = pytest.mark.gpu


def _err(a, ref):
    return ((a.double() - ref.double()).norm() / ref.double().norm()).item()


def _compare(stock, ours, leaves, extra=()):
    def run(fn, dtype):
        xs = [x.detach().to(dtype).requires_grad_(x.requires_grad) for x in leaves]
        out = fn(*xs, *extra)
        outs = out if isinstance(out, tuple) else (out,)
        g = torch.autograd.grad(outs, [x for x in xs if x.requires_grad], [torch.ones_like(o) * 0.3 for o in outs])
        return [o.detach() for o in outs] + list(g)

    ref = run(stock, torch.float64)
    s = run(stock, torch.bfloat16)
    o = run(ours, torch.bfloat16)
    for a, b, r in zip(o, s, ref):
        assert _err(a, r) <= 1.5 * _err(b, r) + 1e-6


def test_gpu_kernels_bf16():
    from velotune.kernels.cross_entropy import cross_entropy, cross_entropy_reference
    from velotune.kernels.fused_linear_ce import fused_linear_cross_entropy, fused_linear_cross_entropy_reference
    from velotune.kernels.glu import glu_reference, swiglu
    from velotune.kernels.rmsnorm import rms_norm, rms_norm_reference
    from velotune.kernels.rope import apply_rope, apply_rope_reference

    dev = "cuda"
    x, w = torch.randn(64, 1000, device=dev), torch.randn(1000, device=dev)
    _compare(
        lambda a, b: rms_norm_reference(a, b, 1e-6),
        lambda a, b: rms_norm(a, b, 1e-6),
        [x.requires_grad_(), w.requires_grad_()],
    )
    g, u = torch.randn(64, 1000, device=dev), torch.randn(64, 1000, device=dev)
    _compare(lambda a, b: glu_reference(a, b, "silu"), swiglu, [g.requires_grad_(), u.requires_grad_()])
    q, k = torch.randn(2, 4, 16, 64, device=dev), torch.randn(2, 2, 16, 64, device=dev)
    cos, sin = torch.randn(2, 16, 64, device=dev).cos(), torch.randn(2, 16, 64, device=dev).sin()
    _compare(
        lambda a, b: apply_rope_reference(a, b, cos.to(a.dtype), sin.to(a.dtype)),
        lambda a, b: apply_rope(a, b, cos.to(a.dtype), sin.to(a.dtype)),
        [q.requires_grad_(), k.requires_grad_()],
    )
    labels = torch.randint(0, 5000, (64,), device=dev)
    labels[:5] = -100
    _compare(
        lambda a: cross_entropy_reference(a, labels, softcap=30.0),
        lambda a: cross_entropy(a, labels, softcap=30.0),
        [torch.randn(64, 5000, device=dev).requires_grad_()],
    )
    _compare(
        lambda h, W: fused_linear_cross_entropy_reference(h, W, labels),
        lambda h, W: fused_linear_cross_entropy(h, W, labels, memory_budget_bytes=16 * 5000 * 2),
        [torch.randn(64, 256, device=dev).requires_grad_(), (torch.randn(5000, 256, device=dev) / 16).requires_grad_()],
    )


def test_gpu_halves_accumulator_in_place_cast_at_lm_head_size():
    """The in-place cast of kernels/halves_accumulator.py with a launch's programs running in parallel
    (the interpreter runs them in order): Llama-3's lm_head size, bits equal to the out-of-place cast."""
    from velotune.kernels.halves_accumulator import finalize_, finalize_reference, new_accumulator

    V, H = 128256, 4096
    acc = new_accumulator(V, H, "cuda")
    for i, t in enumerate(acc):
        t.copy_(torch.randn(t.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(i)))
    scale = torch.tensor(0.37, device="cuda")
    for dtype in (torch.bfloat16, torch.float16):
        want = finalize_reference(acc, scale, dtype)
        got = finalize_((acc[0].clone(), acc[1].clone()), scale, dtype)
        assert torch.equal(got.view(torch.int16), want.view(torch.int16))
        del want, got


def test_gpu_fused_linear_ce_trainable_bf16_weight_accumulators(monkeypatch):
    """A trainable bf16 lm_head over many chunks: dW from the in-place accumulator equals the plain
    fp32 accumulator's (cuBLAS over the whole [V, H], cast out of place) to within one bf16 ulp, where
    another GEMM kernel's summation order may differ, and bit for bit almost everywhere."""
    import velotune.kernels.fused_linear_ce as fl

    g = torch.Generator("cuda").manual_seed(0)
    n, H, V = 3000, 1024, 32000
    h = (torch.randn(n, H, device="cuda", generator=g) * 0.5).bfloat16()
    w = (torch.randn(V, H, device="cuda", generator=g) * 0.02).bfloat16()
    labels = torch.randint(0, V, (n,), device="cuda", generator=g)
    labels[::7] = -100

    def dw(accumulator):
        monkeypatch.setattr(fl, "_dw_in_place", accumulator)
        W = w.clone().requires_grad_(True)
        fl.fused_linear_cross_entropy(h, W, labels, memory_budget_bytes=500 * V * 2).backward()
        return W.grad

    ours = dw(fl._dw_in_place)
    plain = dw(lambda *a: False)
    assert ours.dtype == torch.bfloat16
    ulp = 2.0 ** (torch.frexp(plain.float())[1].float() - 8)
    assert ((ours.float() - plain.float()).abs() <= ulp).all()
    assert (ours == plain).float().mean().item() > 0.99


def test_gpu_rope_launch_plans_replay_exactly():
    """RoPE launches replayed from plans (kernels/launch.py) after the first: new tensors each call,
    an unaligned view (its own JIT launch, no plan), and the backward; all equal the first launch's
    result, which equals the torch reference to bf16 rounding."""
    from velotune.kernels import rope as rope_mod
    from velotune.kernels.rope import apply_rope_, apply_rope_reference

    rope_mod._PLANS.clear()
    B, T, Hq, Hk, D = 2, 64, 4, 2, 128
    g = torch.Generator("cuda").manual_seed(0)
    q0 = torch.randn(B * T, Hq * D, device="cuda", generator=g).bfloat16()
    k0 = torch.randn(B * T, Hk * D, device="cuda", generator=g).bfloat16()
    pos = torch.arange(T, device="cuda")
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2, device="cuda").float() / D))
    ang = torch.cat([pos[:, None] * inv[None]] * 2, -1)
    cos, sin = ang.cos()[None].bfloat16(), ang.sin()[None].bfloat16()

    def run(q_src, k_src):  # fresh, contiguous, not views: rotated in place (one launch)
        return apply_rope_(q_src.clone(), k_src.clone(), cos, sin, D)

    first = run(q0, k0)
    ref_q, ref_k = apply_rope_reference(
        q0.view(B, T, Hq, D).transpose(1, 2).float(),
        k0.view(B, T, Hk, D).transpose(1, 2).float(),
        cos.float(),
        sin.float(),
    )
    assert (first[0].float().view(B, T, Hq, D).transpose(1, 2) - ref_q).abs().max() < 0.05
    for _ in range(3):
        again = run(q0, k0)
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])
    assert len(rope_mod._PLANS) >= 1
    # unaligned storage: a different specialisation, so no plan may be reused for it
    qbuf = torch.empty(q0.numel() + 1, device="cuda", dtype=q0.dtype)
    qbuf[1:].copy_(q0.view(-1))
    un_q = qbuf[1:].view(q0.shape)
    kq = k0.clone()
    rot = rope_mod._rows
    rot(un_q, un_q, kq, kq, cos, sin, B, T, D, backward=False)
    assert torch.equal(un_q, first[0]) and torch.equal(kq, first[1])
    # backward through autograd, twice (the second from a plan)
    grads = []
    for _ in range(2):
        q = (q0.float() * 1).bfloat16().requires_grad_(True)
        k = (k0.float() * 1).bfloat16().requires_grad_(True)
        qa, ka = q * 1, k * 1
        out_q, out_k = apply_rope_(qa, ka, cos, sin, D)
        (out_q.float().square().sum() + out_k.float().sum()).backward()
        grads.append((q.grad, k.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


@pytest.mark.parametrize("which", ["rmsnorm", "gemma_rmsnorm", "swiglu", "geglu_tanh"])
def test_gpu_launch_plans_of_norm_and_glu_replay_exactly(which):
    """After the first (JIT) launch, forward and backward replay from plans (kernels/launch.py): with
    new tensors each time, outputs and gradients stay bit-identical to the first call's."""
    from velotune.kernels import glu as glu_mod, rmsnorm as rms_mod
    from velotune.kernels.glu import geglu, swiglu
    from velotune.kernels.rmsnorm import rms_norm

    rms_mod._FWD_PLANS.clear(), rms_mod._BWD_PLANS.clear(), glu_mod._PLANS.clear()
    g = torch.Generator("cuda").manual_seed(1)
    a0 = torch.randn(300, 1000, device="cuda", generator=g).bfloat16()
    b0 = torch.randn(300, 1000, device="cuda", generator=g).bfloat16()
    fn = {
        "rmsnorm": lambda a, b: rms_norm(a, b[0], 1e-6),
        "gemma_rmsnorm": lambda a, b: rms_norm(a, b[0], 1e-6, offset=1.0),
        "swiglu": swiglu,
        "geglu_tanh": lambda a, b: geglu(a, b, "tanh"),
    }[which]
    runs = []
    for _ in range(3):
        a = a0.clone().requires_grad_(True)
        b = b0.clone().requires_grad_(True)
        out = fn(a, b)
        (out.float() * 0.5).sum().backward()
        runs.append((out.detach(), a.grad, b.grad))
    plans = len(rms_mod._FWD_PLANS) + len(rms_mod._BWD_PLANS) + len(glu_mod._PLANS)
    assert plans == 2
    for run in runs[1:]:
        assert all(torch.equal(x, y) for x, y in zip(run, runs[0]))


@pytest.mark.parametrize("strided", [False, True])
def test_gpu_mlp_lora_backward_pieces_bf16(strided, monkeypatch):
    """The fused MLP pieces at an 8B-like size (N = 2048 tokens, I = 14336, r = 16), in bf16: dA_down
    and hA = h @ A_down^T without making h, and dgate / dup with dh + dhA @ A_down folded in (in place,
    strided rows as Phi-3's gate_up halves): error vs float64 within 1.5x of the unfused bf16 path's
    (h, then a bf16 GEMM; torch.addmm, then the GLU backward); launch plans replay the same bits."""
    from velotune.kernels import glu as glu_mod
    from velotune.kernels.glu import glu_backward, glu_forward, glu_lora_a_grad, glu_lora_project, glu_reference

    N, I, r = 2048, 14336, 16
    gen = torch.Generator("cuda").manual_seed(7)
    rand = lambda *s: torch.randn(*s, device="cuda", generator=gen)  # noqa: E731
    if strided:
        gate64, up64 = (rand(N, 2 * I) * 2).double().chunk(2, dim=-1)
    else:
        gate64, up64 = (rand(N, I) * 2).double(), rand(N, I).double()
    dh64, dhA64, A64 = rand(N, I).double(), rand(N, r).double(), (rand(r, I) / 4).double()
    bf = lambda t: t.to(torch.bfloat16)  # noqa: E731
    gate, up = bf(gate64), bf(up64)
    if strided:
        gate, up = torch.cat((gate, up), dim=-1).chunk(2, dim=-1)
    dh, dhA, A = bf(dh64), bf(dhA64), bf(A64)
    g64, u64 = gate.double(), up.double()  # the bf16 inputs, exactly, in float64

    want = dhA.double().t() @ glu_reference(g64, u64, "silu")
    unfused = (dhA.t() @ glu_forward(gate, up, "silu")).float()
    glu_mod._PLANS.clear()
    got = glu_lora_a_grad(dhA, gate, up, "silu")
    again = glu_lora_a_grad(dhA, gate, up, "silu")  # from its launch plan
    assert torch.equal(got, again)
    assert _err(got, want) <= 1.5 * _err(unfused, want) + 1e-6

    # hA = h @ A_down^T without making h (the MLP recompute's path), and from its launch plan
    want_hA = glu_reference(g64, u64, "silu") @ A.double().t()
    unfused_hA = glu_forward(gate, up, "silu") @ A.t()
    hA = glu_lora_project(gate, up, A, "silu")
    assert hA.dtype == torch.bfloat16 and torch.equal(hA, glu_lora_project(gate, up, A, "silu"))
    assert _err(hA, want_hA) <= 1.5 * _err(unfused_hA, want_hA) + 1e-6

    g = g64.clone().requires_grad_()
    u = u64.clone().requires_grad_()
    want_dg, want_du = torch.autograd.grad(glu_reference(g, u, "silu"), [g, u], dh.double() + dhA.double() @ A.double())
    ref_dg, ref_du = glu_backward(torch.addmm(dh, dhA, A), gate.clone(), up.clone(), "silu")
    gbuf, ubuf = gate.clone(), up.clone()
    if strided:
        gbuf, ubuf = torch.cat((gate, up), dim=-1).chunk(2, dim=-1)
    dg, du = glu_backward(dh, gbuf, ubuf, "silu", lora=(dhA, A))
    assert dg.data_ptr() == gbuf.data_ptr() and du.data_ptr() == ubuf.data_ptr()
    assert _err(dg, want_dg) <= 1.5 * _err(ref_dg, want_dg) + 1e-6
    assert _err(du, want_du) <= 1.5 * _err(ref_du, want_du) + 1e-6
