"""SFT off the GPU: velotune's PyTorch loss equals TRL's own (fused LM head) loss and gradients, and a CPU
run never reaches TRL's Triton kernel (TRL 1.15 runs it whatever the device: "0 active drivers")."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from trl import SFTTrainer

from velotune.train.runner import add_adapters, load_model, make_trainer
from velotune.train.trl_glue import _needs_torch_sft_loss, sft_loss_in_torch

from train_setup import make_config, toy_slice

pytestmark = pytest.mark.usefixtures("one_thread")


def _trainer(mini_llama, tmp_path):
    cfg = make_config(
        mini_llama, toy_slice("sft.jsonl", 3, tmp_path), tmp_path / "out", training={"max_steps": 1, "batch_size": 3}
    )
    model, tok = load_model(cfg)
    model = add_adapters(model, cfg)
    with torch.no_grad():  # non-zero B so that every LoRA matrix gets a gradient
        for i, (n, p) in enumerate(model.named_parameters()):
            if "lora_B" in n:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(i))
    from velotune.train.datasets import prepare_datasets

    train_ds, _, _, _ = prepare_datasets(cfg, tok, progress=False)
    trainer = make_trainer(cfg, model, tok, train_ds, None)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    return trainer, model, batch


def _loss_and_grads(fn, model):
    model.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("num_items", [None, 37])
def test_torch_sft_loss_equals_trls_fused_loss(mini_llama, tmp_path, num_items):
    """TRL's path runs here through the Triton interpreter (TRL 1.15) or TRL's PyTorch fallback (1.16)."""
    trainer, model, batch = _trainer(mini_llama, tmp_path)
    assert _needs_torch_sft_loss(trainer, model)
    ours, g_ours = _loss_and_grads(lambda: sft_loss_in_torch(trainer, model, dict(batch), False, num_items), model)
    theirs, g_theirs = _loss_and_grads(
        lambda: SFTTrainer.compute_loss(trainer, model, dict(batch), num_items_in_batch=num_items), model
    )
    assert torch.isfinite(ours) and ours.item() > 0
    assert abs(ours.item() - theirs.item()) <= 1e-5 * abs(theirs.item())
    assert g_ours.keys() == g_theirs.keys() and len(g_ours) > 0
    for n in g_ours:
        err = (g_ours[n] - g_theirs[n]).abs().max() / g_theirs[n].abs().max().clamp(min=1e-30)
        assert err <= 1e-5, n
    metrics = trainer._metrics["train"]
    assert metrics["entropy"] and 0 <= metrics["mean_token_accuracy"][0] <= 1 and metrics["num_tokens"][0] > 0


def test_cpu_training_never_reaches_a_triton_kernel(mini_llama, tmp_path):
    """Without TRITON_INTERPRET (a user's CPU): one SFT step trains; a Triton launch would fail here."""
    cfg = tmp_path / "cfg.yaml"
    data = toy_slice("sft.jsonl", 2, tmp_path)
    cfg.write_text(
        f"model: {{name: {mini_llama}, dtype: float32, max_seq_length: 96}}\n"
        f"data: {{path: {data}}}\n"
        "lora: {r: 4, alpha: 8, gradient_checkpointing: false}\n"
        "training: {max_steps: 1, batch_size: 2, gradient_accumulation_steps: 1, use_cpu: true}\n"
        f"output_dir: {tmp_path / 'run'}\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run(
        [sys.executable, "-m", "velotune.cli", "train", str(cfg), "--no-progress"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "active drivers" not in r.stderr and (tmp_path / "run" / "adapter_model.safetensors").is_file()


def test_token_count_is_real_tokens_for_padded_and_padding_free_batches():
    """tokens_per_second counts real tokens: the mask sums of a padded batch (which velotune then runs
    padding-free inside the model), the row of a batch TRL made padding-free, both halves of DPO's."""
    import torch

    from velotune.train.trl_glue import _count_tokens

    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert _count_tokens({"input_ids": torch.zeros(2, 4, dtype=torch.long), "attention_mask": mask}) == 5
    packed = {"input_ids": torch.zeros(1, 5, dtype=torch.long), "position_ids": torch.tensor([[0, 1, 2, 0, 1]])}
    assert _count_tokens(packed) == 5
    dpo = {
        "chosen_input_ids": torch.zeros(2, 4),
        "chosen_attention_mask": mask,
        "rejected_input_ids": torch.zeros(2, 4),
        "rejected_attention_mask": mask[:, [1, 0, 2, 3]],
    }
    assert _count_tokens(dpo) == 10
