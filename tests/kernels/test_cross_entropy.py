"""Cross-entropy and fused linear cross-entropy Triton paths (interpreter) vs torch and float64."""

import math

import pytest
import torch

import velotune.kernels.cross_entropy as ce_mod
from kernel_checks import assert_close, grads, leaf
from velotune.kernels import force_triton
from velotune.kernels.cross_entropy import cross_entropy, cross_entropy_reference
from velotune.kernels.fused_linear_ce import fused_linear_cross_entropy, fused_linear_cross_entropy_reference

V = 37  # odd; MAX_BLOCK is patched to 16 so every row spans 3 vocab chunks


@pytest.fixture(autouse=True)
def _small_vocab_chunks(monkeypatch):
    monkeypatch.setattr(ce_mod, "MAX_BLOCK", 16)


def _labels(n, ignored):
    labels = torch.randint(0, V, (n,))
    labels[list(ignored)] = -100
    return labels


def _check_all(got, ref, ref64, names):
    for name, a, r, r64 in zip(names, got, ref, ref64):
        if r is None:
            assert a is None, f"{name}: gradient computed for a frozen tensor"
            continue
        if r.isnan().any():
            assert torch.equal(a.isnan(), r.isnan()), f"{name}: NaN pattern differs"
            continue
        assert_close(a, r, what=f"{name} vs torch")
        assert_close(a, r64.float(), what=f"{name} vs float64")


CE_CASES = [  # (rows, ignored rows, kwargs, non-contiguous)
    (1, [], {}, False),  # batch 1
    (5, [1, 3], {"softcap": 3.0}, True),  # Gemma 2 softcap, strided rows
    (4, [0], {"logit_scale": 0.25, "softcap": 2.0, "reduction": "sum"}, False),
    (4, [2], {"num_items_in_batch": 9}, False),  # gradient-accumulation count
    (3, [0, 1, 2], {}, False),  # all ignored, mean: NaN loss
    (3, [0, 1, 2], {"num_items_in_batch": 4}, False),  # all ignored, sum: zero loss
]


@pytest.mark.parametrize("n,ignored,kw,noncontig", CE_CASES)
def test_cross_entropy_kernel(n, ignored, kw, noncontig):
    base = torch.randn(n, V + 5 if noncontig else V) * 4
    labels = _labels(n, ignored)
    dloss = torch.tensor(1.7)

    def run(fn, dtype):
        x = leaf(base, dtype)
        logits = x[:, :V]
        loss = fn(logits, labels, **kw)
        (g,) = grads(loss, [x], dloss.to(loss.dtype))
        return loss, g

    with force_triton():
        got = run(cross_entropy, torch.float32)
    assert got[0].dtype == torch.float32
    _check_all(
        got,
        run(cross_entropy_reference, torch.float32),
        run(cross_entropy_reference, torch.float64),
        ("loss", "dlogits"),
    )


FLCE_CASES = [  # (rows, ignored, kwargs, weight trainable, bias)
    (9, [0, 4], {}, True, False),
    (7, [6], {"softcap": 2.5, "logit_scale": 1.5, "num_items_in_batch": 10}, False, True),
    (1, [], {"reduction": "sum"}, True, True),
    (5, [0, 1, 2, 3, 4], {"num_items_in_batch": 3}, True, False),  # all rows ignored
    (5, [0, 1, 2, 3, 4], {}, False, False),  # all ignored, mean: NaN like torch
]


@pytest.mark.parametrize("n,ignored,kw,train_w,with_bias", FLCE_CASES)
def test_fused_linear_cross_entropy(n, ignored, kw, train_w, with_bias):
    H = 8
    h0, w0, b0 = torch.randn(n, H), torch.randn(V, H) * 0.5, torch.randn(V)
    labels = _labels(n, ignored)
    dloss = torch.tensor(0.6)

    def run(fn, dtype, **extra):
        h, w = leaf(h0, dtype), leaf(w0, dtype, grad=train_w)
        b = leaf(b0, dtype) if with_bias else None
        loss = fn(h, w, labels, bias=b, **kw, **extra)
        return (loss, *grads(loss, [h, w, b], dloss.to(loss.dtype)))

    # budget of 2 rows of logits: chunks of 2 rows, last one partial
    budget = 2 * V * 4
    with force_triton():
        got = run(fused_linear_cross_entropy, torch.float32, memory_budget_bytes=budget)
    cpu = run(fused_linear_cross_entropy, torch.float32, memory_budget_bytes=budget)
    dropped = run(fused_linear_cross_entropy, torch.float32, memory_budget_bytes=budget, drop_ignored=True)
    ref = run(fused_linear_cross_entropy_reference, torch.float32)
    ref64 = run(fused_linear_cross_entropy_reference, torch.float64)
    names = ("loss", "dhidden", "dweight", "dbias")
    _check_all(got, ref, ref64, names)
    _check_all(cpu, ref, ref64, names)  # the CPU chunked path too
    _check_all(dropped, ref, ref64, names)  # ignored rows gathered out before the matmuls


def test_fused_linear_ce_never_builds_full_logits(monkeypatch):
    """Every matmul output the fused path creates is at most one budget-sized chunk."""
    import velotune.kernels.fused_linear_ce as fl

    seen = []
    real = fl._chunk_loss_and_grad

    def spy(logits, *a, **k):
        seen.append(tuple(logits.shape))
        return real(logits, *a, **k)

    monkeypatch.setattr(fl, "_chunk_loss_and_grad", spy)
    h, w = torch.randn(10, 4, requires_grad=True), torch.randn(V, 4)
    loss = fused_linear_cross_entropy(h, w, torch.randint(0, V, (10,)), memory_budget_bytes=3 * V * 4)
    loss.backward()
    assert seen == [(3, V), (3, V), (3, V), (1, V)]
    assert w.grad is None and h.grad is not None and not math.isnan(loss.item())


def test_fused_linear_ce_drop_ignored_skips_rows(monkeypatch):
    """drop_ignored=True feeds only the non-ignored rows to the chunk matmuls."""
    import velotune.kernels.fused_linear_ce as fl

    seen = []
    real = fl._chunk_loss_and_grad
    monkeypatch.setattr(
        fl, "_chunk_loss_and_grad", lambda logits, *a, **k: seen.append(len(logits)) or real(logits, *a, **k)
    )
    labels = torch.randint(0, V, (10,))
    labels[::2] = -100
    h = torch.randn(10, 4, requires_grad=True)
    fused_linear_cross_entropy(h, torch.randn(V, 4), labels, drop_ignored=True).backward()
    assert sum(seen) == 5
    assert torch.all(h.grad[::2] == 0) and torch.all(h.grad[1::2].abs().sum(1) > 0)


def test_kept_rows_drop_ignored_rows_like_drop_ignored(monkeypatch):
    """KeptRows (the training forward's sync-free path) finds the same rows, in order, and the loss
    and gradients equal drop_ignored=True and the all-rows default."""
    import velotune.kernels.fused_linear_ce as fl
    from velotune.kernels.fused_linear_ce import KeptRows

    g = torch.Generator().manual_seed(4)
    labels = torch.randint(0, V, (11,), generator=g)
    labels[[0, 3, 4, 10]] = -100
    kept = KeptRows(labels)
    assert kept.rows().tolist() == [1, 2, 5, 6, 7, 8, 9]
    assert KeptRows(torch.randint(0, V, (5,))).rows() is None  # nothing to drop
    assert KeptRows(torch.full((3,), -100)).rows().numel() == 0
    h0, w0 = torch.randn(11, 6, generator=g), torch.randn(V, 6, generator=g)
    seen = []
    real = fl._chunk_loss_and_grad
    monkeypatch.setattr(
        fl, "_chunk_loss_and_grad", lambda logits, *a, **k: seen.append(len(logits)) or real(logits, *a, **k)
    )

    def run(**kw):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        loss = fused_linear_cross_entropy(h, w, labels, memory_budget_bytes=3 * V * 4, **kw)
        loss.backward()
        return loss, h.grad, w.grad

    got = run(kept_rows=kept.rows())
    assert sum(seen) == 7
    for a, b in zip(got, run(drop_ignored=True)):
        assert torch.equal(a, b)
    for a, b in zip(got, run()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="kept_rows"):
        fused_linear_cross_entropy(h0, w0, labels, kept_rows=torch.arange(12))


def test_fused_linear_ce_backward_runs_once():
    h = torch.randn(3, 4, requires_grad=True)
    loss = fused_linear_cross_entropy(h, torch.randn(V, 4), torch.randint(0, V, (3,)))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        loss.backward()


def test_fused_linear_ce_rejects_bad_input():
    h, w = torch.randn(3, 4), torch.randn(V, 4)
    with pytest.raises(ValueError, match="labels"):
        fused_linear_cross_entropy(h, w, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="reduction"):
        fused_linear_cross_entropy(h, w, torch.zeros(3, dtype=torch.long), reduction="none")
    with pytest.raises(ValueError, match="hidden"):
        fused_linear_cross_entropy(h, torch.randn(V, 5), torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_linear_ce_16bit_trainable_weight_in_place_fp32_accumulator(monkeypatch, dtype):
    """16-bit lm_head through Triton: dW is summed over 12 row chunks in an fp32 accumulator whose
    result is written in place (kernels/halves_accumulator.py) and rounded once, scaled by
    grad_output on the way.
    Same as the plain fp32-accumulator path (cast out of place) up to the chunk GEMMs' summation
    order, and no further from float64 than stock in that dtype (one GEMM over all rows)."""
    import velotune.kernels.fused_linear_ce as fl

    torch.manual_seed(5)
    n, H = 48, 32
    h0, w0 = torch.randn(n, H), torch.randn(V, H) * 0.5
    labels = _labels(n, [3, 7, 30])
    dloss = torch.tensor(0.6)

    def dw(fn, dtype, **extra):
        h, w = h0.to(dtype).requires_grad_(), w0.to(dtype).requires_grad_()
        loss = fn(h, w, labels, **extra)
        (gw,) = torch.autograd.grad(loss, [w], dloss.to(loss.dtype))
        return gw

    budget = 4 * V * 2  # 4 rows of 16-bit logits: 12 chunks
    seen = []
    real = fl._dw_in_place
    monkeypatch.setattr(fl, "_dw_in_place", lambda *a: seen.append(real(*a)) or seen[-1])
    with force_triton():
        ours = dw(fused_linear_cross_entropy, dtype, memory_budget_bytes=budget)
        monkeypatch.setattr(fl, "_dw_in_place", lambda *a: False)  # same chunk gradients, plain fp32 sum
        fp32acc = dw(fused_linear_cross_entropy, dtype, memory_budget_bytes=budget)
    assert seen == [True]
    stock = dw(fused_linear_cross_entropy_reference, dtype)
    exact = dw(fused_linear_cross_entropy_reference, torch.float64)
    assert ours.dtype == dtype
    ulp = 2.0 ** (torch.frexp(fp32acc.float())[1].float() - {torch.bfloat16: 8, torch.float16: 11}[dtype])
    assert ((ours.float() - fp32acc.float()).abs() <= ulp).all()
    err = lambda g: ((g.double() - exact).norm() / exact.norm()).item()  # noqa: E731
    assert err(ours) <= 1.5 * err(stock), (err(ours), err(stock))


def test_fused_linear_ce_bf16_in_place_accumulator_without_rows():
    """Every label ignored and dropped: no chunk runs, dW of the bf16 lm_head is exactly zero."""
    h = torch.randn(4, 8, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(V, 8, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.full((4,), -100)
    with force_triton():
        loss = fused_linear_cross_entropy(h, w, labels, reduction="sum", drop_ignored=True)
        loss.backward()
    assert loss.item() == 0.0 and torch.equal(w.grad, torch.zeros_like(w))


def test_fused_linear_ce_mixed_dtypes_promote_like_torch():
    """fp16 hidden states with a bf16 lm_head: the chunks run in the promoted dtype (fp32) and dX comes
    back in the hidden states' dtype, as autograd would give for `F.linear(h.float(), w.float())`."""
    g = torch.Generator().manual_seed(3)
    h0, w0 = torch.randn(6, 8, generator=g), torch.randn(V, 8, generator=g)
    labels = _labels(6, [2])

    def run(fn, **extra):
        h = h0.to(torch.float16).requires_grad_()
        w = w0.to(torch.bfloat16).requires_grad_()
        loss = fn(h, w, labels, **extra)
        loss.backward()
        return loss, h.grad, w.grad

    with force_triton():
        got = run(fused_linear_cross_entropy, memory_budget_bytes=2 * V * 4)
    want = run(lambda h, w, lab: fused_linear_cross_entropy_reference(h.float(), w.float(), lab))
    assert got[1].dtype == torch.float16 and got[2].dtype == torch.bfloat16
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=0, atol=0)
