"""Helpers for the kernel tests: normwise relative error and float64 twins of inputs."""

import torch

TOL = 1e-5  # fp32 relative error bound of the issue


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| / max |ref| (normwise, so tiny entries do not dominate); 0 when both are 0."""
    a, ref = a.detach().double(), ref.detach().double()
    scale = ref.abs().max().item() if ref.numel() else 0.0
    diff = (a - ref).abs().max().item() if ref.numel() else 0.0
    return diff / scale if scale else diff


def assert_close(a, ref, tol=TOL, what=""):
    assert a.shape == ref.shape, f"{what}: shape {tuple(a.shape)} != {tuple(ref.shape)}"
    e = rel_err(a, ref)
    assert e <= tol, f"{what}: relative error {e:.3g} > {tol:g}"


def leaf(t: torch.Tensor, dtype=None, grad=True) -> torch.Tensor:
    t = t.detach().clone()
    if dtype is not None:
        t = t.to(dtype)
    return t.requires_grad_(grad)


def grads(out, inputs, dout):
    """Gradients of <out, dout> w.r.t. inputs (None for inputs that do not require grad)."""
    wanted = [x for x in inputs if x is not None and x.requires_grad]
    got = iter(torch.autograd.grad(out, wanted, dout))
    return [next(got) if x is not None and x.requires_grad else None for x in inputs]
