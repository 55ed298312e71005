"""On a CUDA GPU (skipped elsewhere): each kernel's bf16 error vs float64 is within 1.5x of the stock
path's, forward and gradients. bench/kernels.py runs the same check at Llama-3-8B sizes."""
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
        g = torch.autograd.grad(outs, [x for x in xs if x.requires_grad],
                                [torch.ones_like(o) * 0.3 for o in outs])
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
    _compare(lambda a, b: rms_norm_reference(a, b, 1e-6), lambda a, b: rms_norm(a, b, 1e-6),
             [x.requires_grad_(), w.requires_grad_()])
    g, u = torch.randn(64, 1000, device=dev), torch.randn(64, 1000, device=dev)
    _compare(lambda a, b: glu_reference(a, b, "silu"), swiglu, [g.requires_grad_(), u.requires_grad_()])
    q, k = torch.randn(2, 4, 16, 64, device=dev), torch.randn(2, 2, 16, 64, device=dev)
    cos, sin = torch.randn(2, 16, 64, device=dev).cos(), torch.randn(2, 16, 64, device=dev).sin()
    _compare(lambda a, b: apply_rope_reference(a, b, cos.to(a.dtype), sin.to(a.dtype)),
             lambda a, b: apply_rope(a, b, cos.to(a.dtype), sin.to(a.dtype)),
             [q.requires_grad_(), k.requires_grad_()])
    labels = torch.randint(0, 5000, (64,), device=dev)
    labels[:5] = -100
    _compare(lambda a: cross_entropy_reference(a, labels, softcap=30.0),
             lambda a: cross_entropy(a, labels, softcap=30.0),
             [torch.randn(64, 5000, device=dev).requires_grad_()])
    _compare(lambda h, W: fused_linear_cross_entropy_reference(h, W, labels),
             lambda h, W: fused_linear_cross_entropy(h, W, labels, memory_budget_bytes=16 * 5000 * 2),
             [torch.randn(64, 256, device=dev).requires_grad_(), (torch.randn(5000, 256, device=dev) / 16).requires_grad_()])
