"""kernels/split_accumulator.py: an fp32 accumulator held as (bf16 top half, int16 bottom half)."""
import pytest
import torch

from velotune.kernels import force_triton
from velotune.kernels.split_accumulator import (accumulate_, combine_reference, finalize_, new_accumulator,
                                                split_reference_)


def _planes(val):
    hi, lo = new_accumulator(*val.shape, "cpu")
    split_reference_(val, hi, lo)
    return hi, lo


def test_planes_hold_fp32_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    val = torch.randn(50, 33, generator=g) * torch.logspace(-30, 30, 33)
    val[0, :6] = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-42, -3.5e-39])
    hi, lo = _planes(val)
    assert torch.equal(combine_reference(hi, lo).view(torch.int32), val.view(torch.int32))
    # the hi plane is the fp32 value truncated to bf16
    assert torch.equal(hi.view(torch.int16), (val.view(torch.int32) >> 16).to(torch.int16))


@pytest.mark.parametrize("config,shape", [((128, 128, 64, 4, 3), (37, 70, 45)),       # plain loads
                                          ((32, 32, 16, 4, 2, "tma"), (37, 72, 48)),   # descriptors
                                          ((32, 32, 16, 4, 2, "tma"), (37, 70, 45)),   # -> plain (strides)
                                          ((32, 32, 16, 4, 2, "tma-planes"), (37, 72, 48)),  # planes via TMA
                                          ((32, 32, 16, 4, 2, "tma-planes"), (37, 70, 45))])  # -> plain
@pytest.mark.parametrize("first", [False, True])
def test_triton_accumulate_is_exact_fp32_addition(config, shape, first):
    """Integer-valued operands: every partial sum is exact in fp32, so the kernel (any summation
    order) must reproduce the reference bit for bit, across several accumulations. first=True: the
    first accumulation overwrites planes that hold garbage (NaN bit patterns) without reading them."""
    g = torch.Generator().manual_seed(1)
    K, M, N = shape                                        # not multiples of the tiles
    hi, lo = _planes(torch.randint(-2**20, 2**20, (M, N), generator=g).float())
    if first:
        hi.view(torch.int16).fill_(-1), lo.fill_(-1)       # 0xFFFFFFFF: a NaN, if it were read
    want = torch.zeros(M, N) if first else combine_reference(hi, lo).clone()
    for i in range(3):
        a = torch.randint(-64, 64, (K, M), generator=g).to(torch.bfloat16)
        b = torch.randint(-64, 64, (K, N), generator=g).to(torch.bfloat16)
        with force_triton():
            accumulate_(hi, lo, a, b, config=config, first=first and i == 0)
        want += a.float().t() @ b.float()
        assert torch.equal(combine_reference(hi, lo), want)


def test_triton_accumulate_and_finalize_match_reference():
    g = torch.Generator().manual_seed(2)
    K, M, N = 29, 40, 24
    a0 = torch.randn(K, M, generator=g).to(torch.bfloat16)[:, :M]
    b0 = torch.randn(K, N + 3, generator=g).to(torch.bfloat16)[:, :N]       # non-contiguous rows
    ours, ref = new_accumulator(M, N, "cpu"), new_accumulator(M, N, "cpu")
    exact = torch.zeros(M, N, dtype=torch.float64)
    for _ in range(4):
        with force_triton():
            accumulate_(*ours, a0, b0)
        accumulate_(*ref, a0, b0)                          # CPU: the torch reference
        exact += a0.double().t() @ b0.double()
    torch.testing.assert_close(combine_reference(*ours).double(), exact, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(combine_reference(*ours), combine_reference(*ref), rtol=1e-6, atol=1e-5)
    scale = torch.tensor(0.37)
    same = (ours[0].clone(), ours[1].clone())
    with force_triton():
        got = finalize_(*ours, scale)
    want = finalize_(*same, scale)                          # reference on the same planes
    assert got.dtype == torch.bfloat16 and got.data_ptr() == ours[0].data_ptr()
    assert torch.equal(got, want)                          # fp32 multiply, then one round to nearest even
