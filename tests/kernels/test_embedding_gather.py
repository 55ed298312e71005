"""Row gather kernel (interpreter here; the pinned-table GPU path in tests/train/test_embedding_offload.py)."""

import pytest
import torch

from velotune.kernels import embedding_gather
from velotune.kernels.embedding_gather import gather_rows, gather_rows_reference


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("ids_dtype", [torch.int64, torch.int32])
def test_kernel_copies_the_reference_rows_bit_for_bit(dtype, ids_dtype, monkeypatch):
    monkeypatch.setattr(embedding_gather, "BLOCK", 64)  # rows of 150 = 64 + 64 + 22: a masked tail
    g = torch.Generator().manual_seed(0)
    table = torch.randn(40, 150, generator=g).to(dtype)
    ids = torch.randint(0, 40, (3, 5), generator=g, dtype=torch.int64).to(ids_dtype)
    ids[0, 0], ids[2, 4] = 0, 39  # both ends of the table
    out = gather_rows(table, ids)
    ref = gather_rows_reference(table, ids.long())
    assert out.shape == (3, 5, 150) and out.dtype == dtype
    assert torch.equal(out, ref)
    assert torch.equal(out, torch.nn.functional.embedding(ids.long(), table))


def test_row_stride_of_a_wider_table_and_empty_ids():
    base = torch.randn(10, 96)
    table = base[:, :80]  # rows 96 apart, 80 wide
    ids = torch.tensor([9, 0, 4])
    assert torch.equal(gather_rows(table, ids), base[ids, :80])
    assert gather_rows(table, torch.zeros((2, 0), dtype=torch.long)).shape == (2, 0, 80)


def test_bad_layouts_and_id_types_are_refused():
    with pytest.raises(ValueError, match="contiguous rows"):
        gather_rows(torch.randn(8, 4).t(), torch.tensor([0]))
    with pytest.raises(TypeError, match="int32 or int64"):
        gather_rows(torch.randn(8, 4), torch.tensor([0.0]))
