"""Gradient accumulation equals one large batch (loss normalised by the real count of trainable
tokens), and a resumed run continues exactly like an uninterrupted one."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainerCallback

from velotune.train.runner import add_adapters, load_model, make_trainer, run_training

from train_setup import make_config, toy_slice

# (length, trainable tokens at the end): very unequal counts, so that any split into two micro-batches
# gives a per-micro-batch mean that differs from the mean over all tokens.
ROWS = [(14, 11), (7, 1), (12, 2), (6, 5)]


class GrabGrads(TrainerCallback):
    """Gradients just before the optimizer step (after all micro-batches were accumulated)."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def rows_dataset():
    from datasets import Dataset
    from mini import VOCAB

    g = torch.Generator().manual_seed(3)
    rows = []
    for n, k in ROWS:
        ids = torch.randint(7, VOCAB, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * (n - k) + ids[n - k :]})
    return Dataset.from_list(rows)


def config(mini_llama, tmp_path, batch_size=4, accumulation=1):
    return make_config(
        mini_llama,
        toy_slice("sft.jsonl", 1, tmp_path),
        tmp_path / f"out{batch_size}",
        lora={"random_state": 1},
        training={
            "max_steps": 1,
            "batch_size": batch_size,
            "gradient_accumulation_steps": accumulation,
            "optimizer": "sgd",
            "max_grad_norm": 0.0,
            "learning_rate": 0.5,
        },
    )


def adapted_model(cfg):
    model, tok = load_model(cfg)
    model = add_adapters(model, cfg)
    with torch.no_grad():  # non-zero B so that every LoRA matrix gets a gradient
        for i, (n, p) in enumerate(model.named_parameters()):
            if "lora_B" in n:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(i))
    return model, tok


def train_one_step(mini_llama, tmp_path, batch_size, accumulation):
    cfg = config(mini_llama, tmp_path, batch_size, accumulation)
    model, tok = adapted_model(cfg)
    grab = GrabGrads()
    trainer = make_trainer(cfg, model, tok, rows_dataset(), None, callbacks=[grab])
    trainer.train()
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    loss = next(e["loss"] for e in trainer.state.log_history if "loss" in e)
    return loss, grab.grads, weights


def per_row_sums(model):
    """Per row: (sum of its token losses, its trainable-token count, gradient of that sum), one row at a time."""
    out = []
    for row in rows_dataset():
        model.zero_grad()
        logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[:, :-1]
        target = torch.tensor([row["labels"]])[:, 1:]
        total = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=-100, reduction="sum"
        )
        total.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        out.append((total.item(), int((target != -100).sum()), grads))
    return out


def rel_diff(a: dict, b: dict) -> float:
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp(min=1e-30)).item() for k in b)


def combine(rows, weights):
    return {k: sum(w * g[k] for w, (_, _, g) in zip(weights, rows)) for k in rows[0][2]}


def test_gradient_accumulation_equals_one_big_batch(mini_llama, tmp_path):
    loss_big, grads_big, w_big = train_one_step(mini_llama, tmp_path, 4, 1)
    loss_acc, grads_acc, w_acc = train_one_step(mini_llama, tmp_path, 2, 2)
    assert set(grads_big) == set(grads_acc) and len(grads_big) > 0
    assert rel_diff(grads_acc, grads_big) < 1e-5
    assert rel_diff(w_acc, w_big) < 1e-5
    assert abs(loss_acc - loss_big) < 1e-5 * loss_big

    # Hand reference: sum over all trainable tokens / their count, row by row.
    model, _ = adapted_model(config(mini_llama, tmp_path))
    model.train()
    rows = per_row_sums(model)
    total_tokens = sum(n for _, n, _ in rows)
    exact = combine(rows, [1 / total_tokens] * 4)
    assert rel_diff(grads_acc, exact) < 1e-5
    assert abs(loss_acc - sum(s for s, _, _ in rows) / total_tokens) < 1e-5 * loss_acc
    # The test can fail: averaging per micro-batch means (naive accumulation) is far off for every 2+2 split.
    for pair in ((0, 1), (0, 2), (0, 3)):
        rest = tuple(i for i in range(4) if i not in pair)
        weights = [0.0] * 4
        for part in (pair, rest):
            for i in part:
                weights[i] = 0.5 / sum(rows[j][1] for j in part)
        assert rel_diff(combine(rows, weights), exact) > 0.05


@pytest.mark.parametrize("optimizer", ["adamw_torch", "adamw_offload"])
def test_resume_gives_the_same_next_steps(mini_llama, tmp_path, optimizer):
    """adamw_offload: its moments saved with the checkpoint and loaded back into host memory."""
    data = toy_slice("sft.jsonl", 10, tmp_path)
    training = {
        "max_steps": 4,
        "batch_size": 2,
        "gradient_accumulation_steps": 2,
        "save_steps": 2,
        "learning_rate": 5e-3,
        "lr_scheduler": "linear",
        "save_total_limit": None,
        "optimizer": optimizer,
    }
    full = run_training(make_config(mini_llama, data, tmp_path / "full", training=training), progress=False)
    assert (tmp_path / "full" / "checkpoint-2").is_dir()

    resumed_cfg = make_config(
        mini_llama,
        data,
        tmp_path / "resumed",
        training={**training, "resume_from_checkpoint": str(tmp_path / "full" / "checkpoint-2")},
    )
    resumed = run_training(resumed_cfg, progress=False)
    # The resumed run restores the history of steps 1-2 and recomputes steps 3-4 (which cross an epoch:
    # 10 rows / (2 x 2) per step), data order, RNG and optimizer state included.
    assert resumed.steps == full.steps == [1, 2, 3, 4]
    assert resumed.losses[:2] == full.losses[:2]
    torch.testing.assert_close(torch.tensor(resumed.losses[2:]), torch.tensor(full.losses[2:]), rtol=1e-6, atol=0)
    assert resumed.summary["resumed_from"].endswith("checkpoint-2")
