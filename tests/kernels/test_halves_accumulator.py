"""kernels/halves_accumulator.py: an fp32 accumulator in two row halves whose 16-bit result is
written in place over the top half's storage."""

import pytest
import torch

from velotune.kernels import force_triton, halves_accumulator
from velotune.kernels.halves_accumulator import accumulate_, finalize_, finalize_reference, new_accumulator


def _filled(v, h, seed=0):
    g = torch.Generator().manual_seed(seed)
    top, bottom = new_accumulator(v, h, "cpu")
    full = torch.randn(v, h, generator=g) * torch.logspace(-20, 20, h)
    top.copy_(full[: top.shape[0]])
    bottom.copy_(full[top.shape[0] :])
    return (top, bottom), full


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("v,h,prefix", [(1, 5, 4), (2, 3, 1), (3, 7, 2), (37, 70, 8), (64, 33, 1 << 16), (5, 1, 1)])
def test_finalize_in_place_equals_the_out_of_place_cast(monkeypatch, dtype, v, h, prefix):
    """Every phase of the in-place cast (a small PREFIX forces many) gives the bits of
    `(fp32 * scale).to(dtype)`, as one contiguous [V, H] tensor in the top half's own storage."""
    monkeypatch.setattr(halves_accumulator, "PREFIX", prefix)
    if dtype == torch.float16:
        monkeypatch.setattr(halves_accumulator, "BLOCK", 16)  # several programs per phase
    acc, full = _filled(v, h, seed=v * h)
    if dtype == torch.float16:
        full.clamp_(-6e4, 6e4)
        acc[0].clamp_(-6e4, 6e4), acc[1].clamp_(-6e4, 6e4)
    scale = torch.tensor(0.6)
    want = (full * 0.6).to(dtype)
    storage = acc[0].data_ptr()
    with force_triton():
        got = finalize_(acc, scale, dtype)
    assert got.shape == (v, h) and got.dtype == dtype and got.is_contiguous()
    assert got.data_ptr() == storage
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


def test_bf16_cast_rounds_to_nearest_even():
    """Ties and near-ties of the fp32 -> bf16 rounding, through the kernel's bit arithmetic."""
    bits = torch.tensor([0x3F808000, 0x3F818000, 0x3F808001, 0x3F807FFF, 0xBF808000, 0x00000000], dtype=torch.int64).to(
        torch.int32
    )
    vals = bits.view(torch.float32).reshape(3, 2)
    top, bottom = new_accumulator(3, 2, "cpu")
    top.copy_(vals[:2]), bottom.copy_(vals[2:])
    with force_triton():
        got = finalize_((top, bottom), torch.tensor(1.0), torch.bfloat16)
    assert torch.equal(got.view(torch.int16), vals.to(torch.bfloat16).view(torch.int16))


@pytest.mark.parametrize("v", [1, 6, 7])
def test_accumulate_sums_in_fp32_into_both_halves(v):
    """first=True overwrites (the buffers start as NaN), later calls add; integer-valued bf16
    operands make every fp32 sum exact, so the result must equal the product bit for bit."""
    g = torch.Generator().manual_seed(v)
    K, H = 5, 4
    a = [torch.randint(-8, 9, (K, v), generator=g).to(torch.bfloat16) for _ in range(3)]
    b = [torch.randint(-8, 9, (K, H), generator=g).to(torch.bfloat16) for _ in range(3)]
    acc = new_accumulator(v, H, "cpu")
    for t in acc:
        t.fill_(float("nan"))
    for i in range(3):
        accumulate_(acc, a[i], b[i], first=i == 0)
    want = sum(x.t().double() @ y.double() for x, y in zip(a, b))
    assert torch.equal(torch.cat(acc).double(), want)
    assert torch.equal(finalize_reference(acc, torch.tensor(1.0), torch.float32).double(), want)


@pytest.mark.parametrize("n,prefix", [(1, 1), (10, 1), (1000, 7), (2**20 + 3, 2**16), (5, 8)])
def test_in_place_phases_never_write_what_they_or_later_phases_read(n, prefix):
    """The race-freedom argument of `finalize_`, checked on the plan itself: the phases cover
    [prefix, n) in order, and each one's output (over fp32 elements [a // 2, (b - 1) // 2]) lies
    in what the prefix copy or earlier phases already read, below its own input."""
    p = min(prefix, n)
    plan = halves_accumulator.phases(n, p)
    covered = p
    for a, b in plan:
        assert a == covered and b > a
        assert (b - 1) // 2 < a  # written fp32 elements all below this phase's input
        covered = b
    assert covered == n
    assert len(plan) <= max(0, (n // max(p, 1)).bit_length())


@pytest.mark.parametrize("n", [0, 1, 5, 1046, 1047, 14746, 16384, 99991])
def test_chunk_rows_fits_the_budget_with_the_fewest_even_chunks(n):
    from velotune.kernels.fused_linear_ce import chunk_rows

    V, budget = 128256, 256 * 2**20
    cap = budget // (V * 2)  # 1046 rows of bf16 logits
    step = chunk_rows(n, V, 2, budget)
    assert 1 <= step <= max(cap, 1)
    n_chunks = -(-n // step)
    assert n_chunks == -(-n // cap)  # no more chunks than the budget needs
    assert n == 0 or n - (n_chunks - 1) * step >= step - n_chunks  # the last chunk is not a sliver
