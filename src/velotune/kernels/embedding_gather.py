"""Row gather from a table the GPU reads in place: an embedding lookup whose table lives in pinned
host memory (memory/embedding_offload.py), with no host round trip.

    out = gather_rows(table, ids)     # table [V, H] (pinned host memory or any device), ids [...] int
                                      # -> [..., H] on ids' device: out[i] = table[ids[i]]

Why a kernel: a lookup that gathers on the host must first copy the ids to the host, which waits
for every GPU kernel queued before them (the whole previous training step), then gathers on the CPU
and copies the rows up while the GPU sits idle. Pinned host memory is mapped into the GPU's address
space (unified virtual addressing), so a kernel can read the batch's rows itself over the host link:
4096 rows x 8 KiB for Llama-3-8B, 32 MiB, about the same link time as copying the gathered rows,
but queued on the compute stream like any other kernel: nothing waits on the host.

Exact: a gather copies bits (the reference is `index_select`). Ids outside [0, V) trip a device
assertion (as `nn.Embedding` on CUDA does); the loads are masked so that such a row reads nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024  # elements of a row per program (bf16: 2 KiB, 16-byte loads per thread)


def gather_rows_reference(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch: table [V, H], ids [...] -> [..., H] (on the table's device)."""
    return torch.index_select(table, 0, ids.reshape(-1).to(table.device)).view(*ids.shape, table.shape[1])


def gather_rows(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """table [V, H] with unit stride along H, readable by the device of `ids` (pinned host memory or
    that device's memory); ids [...] integer on a CUDA device (or CPU under the Triton interpreter)
    -> [..., H] in table.dtype on ids' device."""
    if table.dim() != 2 or table.stride(1) != 1:
        raise ValueError(
            f"gather_rows: table must be [V, H] with contiguous rows, got {tuple(table.shape)} strides {table.stride()}"
        )
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"gather_rows: ids must be int32 or int64, got {ids.dtype}")
    flat = ids.reshape(-1)
    n, (vocab, h) = flat.numel(), table.shape
    out = torch.empty((n, h), dtype=table.dtype, device=ids.device)
    if n:
        grid = (n, triton.cdiv(h, BLOCK))
        _gather_rows_kernel[grid](table, flat, out, vocab, h, table.stride(0), BLOCK=BLOCK)
    return out.view(*ids.shape, h)


@triton.jit(debug=True)  # debug: the bounds assertion below is compiled in (it is otherwise dropped)
def _gather_rows_kernel(TABLE, IDS, OUT, V, H, stride_t, BLOCK: tl.constexpr):
    """Program (row, block): OUT[row, block*BLOCK : +BLOCK] = TABLE[IDS[row], same columns]."""
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    idx = tl.load(IDS + row).to(tl.int64)
    valid = (idx >= 0) & (idx < V)
    tl.device_assert(valid, "gather_rows: id out of range of the embedding table")
    mask = (cols < H) & valid
    vals = tl.load(TABLE + idx * stride_t + cols, mask=mask)
    tl.store(OUT + row.to(tl.int64) * H + cols, vals, mask=cols < H)
