"""Padding-free packing: several samples per row, each attending only to itself.

    packed = pack_dataset(tokenized, max_seq_length=4096)          # rows of <= 4096 tokens, several samples each
    collator = PaddingFreeCollator()
    batch = collator([packed[0], packed[1]])
    # batch: input_ids [1, total], labels [1, total], position_ids [1, total], use_cache=False; no attention_mask

The convention is transformers' padding-free one: `position_ids` restart at 0 at every sample and
`attention_mask` is None, so transformers (masking_utils.find_packed_sequence_indices) builds a
block-diagonal causal mask for SDPA/eager/flex, and flash-attention kernels get cu_seqlens. The label
of each sample's first token is -100, so no sample is predicted from the previous one's last token.
Together: the loss and gradients of a packed batch equal those of the same samples padded
(tests/data/test_packing.py checks it, stock and velotune models).

The collator reuses transformers' DataCollatorWithFlattening; this module adds the dataset-level
packing (first-fit decreasing) and the splitting of pre-packed rows back into their samples.
"""

from __future__ import annotations

import bisect
from typing import Any

from velotune.errors import DataError


def pack_indices(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing bin packing: lists of sample indices whose lengths sum to <= capacity."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining capacity, bin index), sorted
    for i in order:
        k = bisect.bisect_left(free, (lengths[i], -1))
        if k == len(free):
            bins.append([i])
            bisect.insort(free, (capacity - lengths[i], len(bins) - 1))
        else:
            room, b = free.pop(k)
            bins[b].append(i)
            bisect.insort(free, (room - lengths[i], b))
    return bins


def pack_dataset(dataset, max_seq_length: int):
    """Tokenized rows (input_ids, optional labels) -> packed rows of at most max_seq_length tokens.

    Output columns: input_ids [T], labels [T] (each sample's own labels; input_ids where absent),
    position_ids [T] restarting at 0 per sample, seq_lengths [n_samples] (TRL's packed format).
    Rows longer than max_seq_length raise DataError (truncate them first, e.g. tokenize_conversations).
    """
    import datasets

    if "input_ids" not in dataset.column_names:
        raise DataError(f"pack_dataset needs tokenized rows (input_ids); columns: {dataset.column_names}")
    ids = dataset["input_ids"]
    labels = dataset["labels"] if "labels" in dataset.column_names else ids
    lengths = [len(x) for x in ids]
    too_long = [i for i, n in enumerate(lengths) if n > max_seq_length]
    if too_long:
        raise DataError(
            f"{len(too_long)} rows are longer than max_seq_length={max_seq_length} (rows "
            f"{too_long[:5]}{', ...' if len(too_long) > 5 else ''}); truncate them before packing"
        )
    empty = [i for i, n in enumerate(lengths) if n == 0]
    if empty:
        raise DataError(f"{len(empty)} rows have no tokens (rows {empty[:5]}); remove them before packing")
    out: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": [], "seq_lengths": []}
    for members in pack_indices(lengths, max_seq_length):
        members.sort()  # keep the data set's order inside a row
        out["input_ids"].append([t for i in members for t in ids[i]])
        out["labels"].append([t for i in members for t in labels[i]])
        out["position_ids"].append([p for i in members for p in range(lengths[i])])
        out["seq_lengths"].append([lengths[i] for i in members])
    return datasets.Dataset.from_dict(out)


def _split_row(feature: dict[str, Any]) -> list[dict[str, list[int]]]:
    """A (possibly pre-packed) row -> its samples, using seq_lengths or position_ids resets."""

    def as_list(x):
        return x.tolist() if hasattr(x, "tolist") else list(x)

    ids = as_list(feature["input_ids"])
    labels = as_list(feature["labels"]) if feature.get("labels") is not None else None
    if feature.get("seq_lengths") is not None:
        lengths = [int(n) for n in as_list(feature["seq_lengths"])]
    elif feature.get("position_ids") is not None:
        pos = as_list(feature["position_ids"])
        starts = [i for i, p in enumerate(pos) if p == 0 or i == 0] + [len(pos)]
        lengths = [b - a for a, b in zip(starts, starts[1:])]
    else:
        lengths = [len(ids)]
    if sum(lengths) != len(ids):
        raise DataError(f"packed row: seq_lengths sum to {sum(lengths)} but the row has {len(ids)} tokens")
    samples, start = [], 0
    for n in lengths:
        sample = {"input_ids": ids[start : start + n]}
        if labels is not None:
            sample["labels"] = labels[start : start + n]
        samples.append(sample)
        start += n
    return samples


class PaddingFreeCollator:
    """Features (single samples or pre-packed rows) -> a padding-free batch.

    Default: everything in one row. input_ids [1, total], labels [1, total] (-100 at each sample's first
    token), position_ids [1, total] (0 at each sample's start), use_cache=False (with a KV cache
    transformers does not detect packed sequences and would let samples attend to each other); with
    return_flash_attn_kwargs also cu_seq_lens_q/k [n+1] int32 and max_length_q/k (flash-attention varlen).

    keep_rows=True: each feature stays one row, [R, T_max]; a shorter row is filled with pad_token_id as
    one more segment (its own position_ids from 0, labels -100), so it never attends to real tokens.
    With SDPA/eager, whose packed mask is dense [T, T], R rows of length T cost R*T^2 attention instead of
    (R*T)^2 for one long row.
    """

    def __init__(self, return_flash_attn_kwargs: bool = False, *, keep_rows: bool = False, pad_token_id: int = 0):
        from transformers import DataCollatorWithFlattening

        if keep_rows and return_flash_attn_kwargs:
            raise ValueError("keep_rows=True gives a [R, T] batch; flash-attention kwargs need one row")
        self.keep_rows = keep_rows
        self.pad_token_id = pad_token_id
        self.flatten = DataCollatorWithFlattening(
            return_position_ids=True, separator_id=-100, return_flash_attn_kwargs=return_flash_attn_kwargs
        )

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        rows = [_split_row(f) for f in features]
        samples = [s for r in rows for s in r]
        if not samples or any(len(s["input_ids"]) == 0 for s in samples):
            raise DataError("PaddingFreeCollator got an empty sample; remove empty rows before training")
        if any("labels" in s for s in samples) and not all("labels" in s for s in samples):
            raise DataError("PaddingFreeCollator: some rows have labels and some do not")
        if self.keep_rows:
            return self._rows(rows)
        batch = self.flatten(samples)
        batch["use_cache"] = False
        return batch

    def _rows(self, rows: list[list[dict[str, list[int]]]]) -> dict[str, Any]:
        import torch

        flat = [self.flatten(r) for r in rows]  # each: [1, T_r]
        width = max(b["input_ids"].shape[1] for b in flat)
        out = {
            k: torch.full((len(flat), width), fill, dtype=torch.long)
            for k, fill in (("input_ids", self.pad_token_id), ("labels", -100), ("position_ids", 0))
        }
        for i, b in enumerate(flat):
            n = b["input_ids"].shape[1]
            for k in out:
                out[k][i, :n] = b[k][0]
            out["position_ids"][i, n:] = torch.arange(width - n)  # the fill is a segment of its own
        out["use_cache"] = False
        return out
