"""Packed (padding-free) batches give the same loss and gradients as the same samples padded."""

from __future__ import annotations

import pytest
import torch
from mini import FAMILIES, VOCAB, mini_model, save_mini_model

from velotune.data.packing import PaddingFreeCollator, pack_indices, pack_dataset
from velotune.errors import DataError

LENGTHS = (13, 5, 21, 9)  # longer than the mini models' sliding window (8), so windows are exercised


def _samples(seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in LENGTHS:
        ids = torch.randint(7, VOCAB, (n,), generator=g).tolist()
        labels = list(ids)
        labels[: n // 3] = [-100] * (n // 3)  # a masked "prompt" in each sample
        out.append({"input_ids": ids, "labels": labels})
    return out


def _padded(samples, pad_id: int = 0) -> dict:
    T = max(len(s["input_ids"]) for s in samples)
    ids = torch.full((len(samples), T), pad_id)
    labels = torch.full((len(samples), T), -100)
    mask = torch.zeros(len(samples), T, dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[i, :n] = torch.tensor(s["input_ids"])
        labels[i, :n] = torch.tensor(s["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "use_cache": False}  # no cache: as in training


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _assert_same(model, packed, padded):
    loss_p, grads_p = _loss_and_grads(model, packed)
    loss_u, grads_u = _loss_and_grads(model, padded)
    assert torch.isfinite(loss_u)
    torch.testing.assert_close(loss_p, loss_u, rtol=1e-5, atol=0)
    assert grads_p.keys() == grads_u.keys() and grads_p
    for name in grads_u:
        scale = grads_u[name].abs().max().clamp_min(1e-12)
        err = (grads_p[name] - grads_u[name]).abs().max() / scale
        assert err <= 1e-5, f"{name}: relative grad error {err:.2e}"


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_equals_padded_stock_model(family):
    model = mini_model(family)
    samples = _samples()
    packed = PaddingFreeCollator()(samples)
    assert packed["input_ids"].shape == (1, sum(LENGTHS)) and "attention_mask" not in packed
    starts = [0, 13, 18, 39]
    assert packed["position_ids"][0, starts].tolist() == [0, 0, 0, 0]
    assert (packed["labels"][0, starts] == -100).all()
    _assert_same(model, packed, _padded(samples))


def test_packing_is_not_a_no_op():
    """Positions continuing across samples (no restart) must change the loss: the test above can fail."""
    model = mini_model("llama")
    samples = _samples()
    packed = PaddingFreeCollator()(samples)
    leaky = dict(packed, position_ids=torch.arange(packed["input_ids"].shape[1])[None])
    loss_leaky = model(**leaky).loss
    loss_padded = model(**_padded(samples)).loss
    assert not torch.allclose(loss_leaky, loss_padded, rtol=1e-5, atol=0)


# plain, sliding window, softcap + window, q/k head norms + window
@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2", "qwen3", "gemma3_text"])
def test_packed_equals_padded_velotune_model(tmp_path, family):
    """The same check through FastLanguageModel (velotune's patched forward must honour packing)."""
    from velotune import FastLanguageModel

    path = save_mini_model(family, tmp_path)
    model, _ = FastLanguageModel.from_pretrained(path, dtype=torch.float32, max_seq_length=64)
    model.float()
    samples = _samples(seed=3)
    _assert_same(model, PaddingFreeCollator()(samples), _padded(samples))

    peft_model = FastLanguageModel.get_peft_model(
        model, r=4, lora_alpha=8, use_gradient_checkpointing=False, init_lora_weights=False
    )
    peft_model.float()
    _assert_same(peft_model, PaddingFreeCollator()(samples), _padded(samples))


def test_pack_dataset_rows_and_collation():
    import datasets

    samples = _samples()
    ds = datasets.Dataset.from_list(samples * 3)  # 12 samples, 144 tokens
    packed = pack_dataset(ds, max_seq_length=40)
    assert all(len(r) <= 40 for r in packed["input_ids"])
    assert sum(len(r) for r in packed["input_ids"]) == 3 * sum(LENGTHS)
    assert sorted(n for r in packed["seq_lengths"] for n in r) == sorted(LENGTHS * 3)
    for row in packed:
        assert len(row["position_ids"]) == len(row["input_ids"]) == len(row["labels"])
        assert row["position_ids"].count(0) == len(row["seq_lengths"])
    batch = PaddingFreeCollator()([packed[0], packed[1]])
    n0 = len(packed[0]["seq_lengths"]) + len(packed[1]["seq_lengths"])
    assert int((batch["position_ids"] == 0).sum()) == n0
    # the packed rows give the same loss as their samples padded
    model = mini_model("llama")
    members = [s for row in (packed[0], packed[1]) for s in _split(row)]
    torch.testing.assert_close(model(**batch).loss, model(**_padded(members)).loss, rtol=1e-5, atol=0)


def test_keep_rows_equals_padded():
    model = mini_model("mistral")  # sliding window 8: windows must stay inside each segment
    samples = _samples(seed=5)
    rows = [
        {
            "input_ids": samples[0]["input_ids"] + samples[1]["input_ids"],
            "labels": samples[0]["labels"] + samples[1]["labels"],
            "seq_lengths": [13, 5],
        },
        {"input_ids": samples[2]["input_ids"], "labels": samples[2]["labels"]},
    ]
    batch = PaddingFreeCollator(keep_rows=True)(rows)
    assert batch["input_ids"].shape == (2, 21)
    assert batch["position_ids"][0].tolist() == list(range(13)) + list(range(5)) + [0, 1, 2]
    assert (batch["labels"][0, 18:] == -100).all()
    _assert_same(model, batch, _padded(samples[:3]))


def _split(row):
    out, start = [], 0
    for n in row["seq_lengths"]:
        out.append({"input_ids": row["input_ids"][start : start + n], "labels": row["labels"][start : start + n]})
        start += n
    return out


def testpack_indices_fit():
    lengths = [7, 3, 9, 1, 10, 4, 4, 2]
    bins = pack_indices(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert len(bins) == 4  # 40 tokens in bins of 10: best-fit decreasing is optimal here


def test_pack_dataset_rejects_too_long_rows():
    import datasets

    ds = datasets.Dataset.from_list([{"input_ids": [5] * 30}, {"input_ids": [5] * 3}])
    with pytest.raises(DataError, match="longer than max_seq_length=20.*rows \\[0\\]"):
        pack_dataset(ds, max_seq_length=20)


def test_bench_cpu_smoke(capsys):
    """bench/packing.py's whole code path (tiny model, CPU): it must run the first time on the GPU."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "packing.py"
    spec = importlib.util.spec_from_file_location("velotune_bench_packing", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--cpu-smoke", "--samples", "12"]) == 0
    out = capsys.readouterr().out
    assert "| packed-flat |" in out and "pool loss agrees across modes" in out
