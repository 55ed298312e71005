"""velotune's per-token log-prob head (kernels/fused_linear_logprob.py) against the full-logits reference and
TRL's own chunked head: values and gradients (log-probs and entropies), Triton (interpreter) and torch paths."""

import pytest
import torch

from velotune.kernels import force_triton
from velotune.kernels.fused_linear_logprob import fused_linear_logprobs, fused_linear_logprobs_reference

pytestmark = pytest.mark.usefixtures("one_thread")

N, H, V = 29, 16, 300
BUDGET = 4 * V * 8  # 8 rows per chunk: several chunks and a short last one


def _inputs(seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g).requires_grad_()
    w = 0.5 * torch.randn(V, H, generator=g)
    b = 0.1 * torch.randn(V, generator=g) if bias else None
    t = torch.randint(0, V, (N,), generator=g)
    return h, w, b, t


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _grad(h, logp, ent, g_logp, g_ent):
    loss = (logp * g_logp).sum() + (0 if ent is None or g_ent is None else (ent * g_ent).sum())
    (grad,) = torch.autograd.grad(loss, h)
    return grad


@pytest.mark.parametrize("triton", [False, True], ids=["torch", "triton"])
@pytest.mark.parametrize(
    "temperature,softcap,scale,bias,entropy_grad",
    [
        (1.0, None, None, False, False),
        (0.7, None, None, True, True),
        (0.7, 30.0, None, False, False),
        (1.3, 5.0, 0.5, False, True),
    ],
)
def test_values_and_gradients_equal_reference(triton, temperature, softcap, scale, bias, entropy_grad):
    h, w, b, t = _inputs(bias=bias)
    g = torch.Generator().manual_seed(1)
    g_logp, g_ent = torch.randn(N, generator=g), torch.randn(N, generator=g) if entropy_grad else None
    kw = dict(bias=b, temperature=temperature, softcap=softcap, logit_scale=scale)
    with force_triton(triton):
        logp, ent = fused_linear_logprobs(h, w, t, memory_budget_bytes=BUDGET, **kw)
        grad = _grad(h, logp, ent, g_logp, g_ent)
    ref_logp, ref_ent = fused_linear_logprobs_reference(
        h.double(), w.double(), t, **{**kw, "bias": b if b is None else b.double()}
    )
    ref_grad = _grad(h, *fused_linear_logprobs_reference(h, w, t, **kw), g_logp, g_ent)
    assert logp.dtype == ent.dtype == torch.float32 and logp.shape == ent.shape == (N,)
    assert _rel(logp.double(), ref_logp) <= 1e-6 and _rel(ent.double(), ref_ent) <= 1e-5
    assert _rel(grad, ref_grad) <= 1e-5


def test_matches_trls_chunked_head_and_runs_one_gemm_without_grad():
    from trl.kernels import ChunkedLogProbFunction

    h, w, _, t = _inputs(seed=2)
    logp, ent = fused_linear_logprobs(h, w, t, temperature=0.8, memory_budget_bytes=BUDGET)
    trl_logp, trl_ent, *_ = ChunkedLogProbFunction.apply(h, w, None, t, 0.8, 128, None, 1.0, ("log_probs", "entropy"))
    assert _rel(logp, trl_logp) <= 1e-6 and _rel(ent, trl_ent) <= 1e-5
    g = torch.randn(N)
    assert _rel(_grad(h, logp, None, g, None), _grad(h, trl_logp, None, g, None)) <= 1e-5
    with torch.no_grad():  # scoring only: the same values, nothing kept for a backward
        nog, none = fused_linear_logprobs(h, w, t, temperature=0.8, entropy=False, memory_budget_bytes=BUDGET)
    assert none is None and not nog.requires_grad and torch.equal(nog, logp.detach())


def test_no_rows_and_bad_input():
    h, w, _, t = _inputs()
    logp, ent = fused_linear_logprobs(h[:0], w, t[:0])
    assert logp.shape == ent.shape == (0,)
    (logp.sum() + ent.sum()).backward()  # an all-masked micro-batch: a zero gradient, not an error
    assert h.grad is not None and h.grad.abs().sum() == 0
    with pytest.raises(ValueError, match="require grad"):
        fused_linear_logprobs(h, w.requires_grad_(), t)
    w.requires_grad_(False)
    with pytest.raises(ValueError, match="targets"):
        fused_linear_logprobs(h, w, t[:-1])
    with pytest.raises(ValueError, match="temperature"):
        fused_linear_logprobs(h, w, t, temperature=0.0)


@pytest.mark.gpu
def test_gpu_bf16_error_within_trls():
    """bf16 on CUDA (the Triton kernel, fp32 u): log-probs, entropies and the hidden gradient against
    float64, within 1.5x the error of TRL's chunked head on the same inputs (plus a floor)."""
    from trl.kernels import ChunkedLogProbFunction

    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    n, h_dim, vocab = 777, 512, 50000
    h = torch.randn(n, h_dim, device=dev, generator=g)
    w = torch.randn(vocab, h_dim, device=dev, generator=g) / h_dim**0.5
    t = torch.randint(0, vocab, (n,), device=dev, generator=g)
    g_logp, g_ent = torch.randn(n, device=dev, generator=g), torch.randn(n, device=dev, generator=g)

    def run(fn, dtype):
        x = h.to(dtype).requires_grad_()
        logp, ent = fn(x, w.to(dtype))
        (grad,) = torch.autograd.grad((logp * g_logp).sum() + (ent * g_ent).sum(), x)
        return logp.double(), ent.double(), grad.double()

    ref = run(lambda x, W: fused_linear_logprobs_reference(x, W, t, temperature=0.9), torch.float64)
    ours = run(lambda x, W: fused_linear_logprobs(x, W, t, temperature=0.9), torch.bfloat16)
    trl = run(
        lambda x, W: ChunkedLogProbFunction.apply(x, W, None, t, 0.9, 32768, None, 1.0, ("log_probs", "entropy"))[:2],
        torch.bfloat16,
    )
    for a, b, r in zip(ours, trl, ref):
        err = lambda x: ((x - r).norm() / r.norm()).item()  # noqa: E731
        assert err(a) <= 1.5 * err(b) + 1e-4, (err(a), err(b))
