"""Attention over a packed row (models/varlen_attention.py) against the dense definition: one
[N, N] score matrix per head, masked block-diagonally (causal inside each sample, optional sliding
window kv > q - W), optional softcap. CPU: the per-sample path; GPU: torch's flash varlen kernel."""

import pytest
import torch

from velotune.models.padding_free import _varlen
from velotune.models.varlen_attention import flash_capabilities, flash_varlen, per_sample, varlen_attention

LENGTHS = [7, 1, 12, 5, 9]


def dense_reference(q, k, v, lengths, *, scaling, n_rep, softcap=None, window=None):
    """q [N, Hq, D], k/v [N, Hk, D]: the textbook computation in float64."""
    q, k, v = (x.double() for x in (q, k, v))
    k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    n, device = q.shape[0], q.device
    seg = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))
    i = torch.arange(n, device=device)
    allowed = (seg[:, None] == seg[None, :]) & (i[None, :] <= i[:, None])
    if window is not None:
        allowed &= i[None, :] > i[:, None] - window
    s = torch.einsum("qhd,khd->hqk", q, k) * scaling
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)
    return torch.einsum("hqk,khd->qhd", p, v)


def _inputs(device, dtype, hq=4, hk=2, d=16, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    n = sum(LENGTHS)
    return [torch.randn(n, h, d, device=device, dtype=dtype, generator=g).requires_grad_() for h in (hq, hk, hk)]


@pytest.mark.parametrize("softcap,window", [(None, None), (None, 4), (30.0, None), (30.0, 4), (None, 64)])
def test_per_sample_matches_dense_definition(softcap, window):
    q, k, v = _inputs("cpu", torch.float32)
    varlen = _varlen(LENGTHS, "cpu")
    out = varlen_attention(q, k, v, varlen, scaling=0.3, n_rep=2, softcap=softcap, window=window)
    ref = dense_reference(q, k, v, LENGTHS, scaling=0.3, n_rep=2, softcap=softcap, window=window)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-6
    do = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), do)
    want = torch.autograd.grad(ref, (q, k, v), do.double())
    for a, b in zip(got, want):
        assert ((a.double() - b).norm() / b.norm()).item() < 1e-6


def _err(x, ref) -> float:
    return ((x.double() - ref).norm() / ref.norm()).item()


@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 4])
def test_flash_varlen_matches_per_sample_on_gpu(window):
    fn, params = flash_capabilities()
    if fn is None:
        pytest.skip("this torch has no torch.nn.attention.varlen")
    if window is not None and "window_size" not in params:
        pytest.skip("this torch's varlen_attn takes no window_size (per_sample runs instead)")
    q, k, v = _inputs("cuda", torch.bfloat16, hq=8, hk=2, d=64)
    varlen = _varlen(LENGTHS, "cuda")
    scaling = 64**-0.5
    flash = flash_varlen(q, k, v, varlen, scaling=scaling, n_rep=4, window=window)
    ref = dense_reference(q, k, v, LENGTHS, scaling=scaling, n_rep=4, window=window)
    mine = per_sample(q, k, v, varlen, scaling=scaling, n_rep=4, window=window)
    assert _err(flash, ref) <= max(2 * _err(mine, ref), 1e-2)  # bf16: as close to float64 as the SDPA path
    do = torch.randn_like(flash)
    gf = torch.autograd.grad(flash, (q, k, v), do)
    gr = torch.autograd.grad(ref, (q, k, v), do.double())
    gm = torch.autograd.grad(mine, (q, k, v), do)
    for a, b, m in zip(gf, gr, gm):
        assert _err(a, b) <= max(2 * _err(m, b), 1e-2)
    assert varlen_attention(q, k, v, varlen, scaling=scaling, n_rep=4, window=window).shape == q.shape
