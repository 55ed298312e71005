"""Padding-free batches inside the model (velotune.models.padding_free): a padded batch (right or left
padding, rows of different lengths) runs on its real tokens only and gives stock's loss, every LoRA
gradient and the logits at real positions, to 1e-5 in float32, on all five families; the same as
velotune with padding_free=False; and under TRL's SFTTrainer and DPOTrainer."""

import pytest
import torch
from mini import FAMILIES, VOCAB, save_mini_model
from test_parity import TOL, _assert_same_training, _load_pair, _rel, _train_pair

from velotune import FastLanguageModel
from velotune.models.padding_free import padding_free_stats, set_padding_free

LENGTHS = (14, 9, 5, 11)  # longer than the mini sliding windows (8): windows are exercised


def ragged(side: str = "right", seed: int = 5, lengths=LENGTHS, prompt: int = 2):
    """input_ids/attention_mask/labels [B, max(lengths)], padding on `side`, the first `prompt`
    tokens of each row ignored, padding labels -100 (what every collator produces)."""
    g = torch.Generator().manual_seed(seed)
    B, T = len(lengths), max(lengths)
    ids = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    labels = torch.full((B, T), -100)
    for i, n in enumerate(lengths):
        sl = slice(0, n) if side == "right" else slice(T - n, T)
        row = torch.randint(7, VOCAB, (n,), generator=g)
        ids[i, sl], mask[i, sl] = row, 1
        lab = row.clone()
        lab[:prompt] = -100
        labels[i, sl] = lab
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _ref_dtype(family: str) -> torch.dtype:
    """The stock reference's dtype. Gemma 2's stock eager attention in float64 turns a padding query row
    that its sliding window masks whole (the 5-token row) into NaN, which reaches the real rows through
    the next layer: for it the float32 reference is the sound one."""
    return torch.float32 if family == "gemma2" else torch.float64


def _grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("family", FAMILIES)
def test_padded_batch_runs_padding_free_and_matches_stock(family, side, tmp_path):
    fast, stock = _load_pair(family, tmp_path, ref_dtype=_ref_dtype(family))
    batch = ragged(side)
    _assert_same_training(_train_pair(fast, stock, 2, [batch]))
    stats = padding_free_stats(fast)
    assert stats["forwards"] == 2 and stats["real_tokens"] == 2 * sum(LENGTHS)
    assert stats["batch_tokens"] == 2 * len(LENGTHS) * max(LENGTHS)


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_free_equals_padding_free_off(family, tmp_path):
    """velotune with padding-free (default) vs padding_free=False on the same weights: loss and every
    LoRA gradient to 1e-5, with num_items_in_batch too."""
    on, _ = _load_pair(family, tmp_path / "on")
    off, _ = _load_pair(family, tmp_path / "off")
    set_padding_free(off, False)
    batch = ragged("right", seed=9)
    for kw in ({}, {"num_items_in_batch": torch.tensor(40)}):
        (l_on, g_on), (l_off, g_off) = _grads(on, {**batch, **kw}), _grads(off, {**batch, **kw})
        assert abs(l_on - l_off) <= TOL * abs(l_off)
        assert g_on.keys() == g_off.keys()
        for n in g_off:
            assert _rel(g_on[n], g_off[n]) <= TOL, n
    assert padding_free_stats(on)["forwards"] == 2 and not padding_free_stats(off)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_logits_at_real_positions_match_stock(family, tmp_path):
    """Logits requested (no labels, or return_logits): [B, T, V] in the padded layout, stock's values at
    every real position, zeros' projection at padding; in training mode and in eval without a cache."""
    fast, stock = _load_pair(family, tmp_path, ref_dtype=_ref_dtype(family))
    batch = ragged("left", seed=2)
    real = batch["attention_mask"].bool()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        want = stock(**inputs).logits
        fast.train()
        got = fast(**inputs).logits
        assert got.shape == want.shape
        assert _rel(got[real].double(), want[real]) <= TOL
        fast.eval()
        n = padding_free_stats(fast)["forwards"]
        got = fast(**inputs, use_cache=False).logits
        assert padding_free_stats(fast)["forwards"] == n + 1
        assert _rel(got[real].double(), want[real]) <= TOL
        out = fast(**batch, use_cache=False, return_logits=True)
        ref = stock(**batch)
        assert _rel(out.logits[real].double(), ref.logits[real]) <= TOL
        assert abs(out.loss.item() - ref.loss.item()) <= TOL * abs(ref.loss.item())
        n = padding_free_stats(fast)["forwards"]
        fast(**inputs)  # eval, use_cache from the config (True): a cache is built, stock path
        assert padding_free_stats(fast)["forwards"] == n


def test_label_on_a_padding_predictor_runs_padded(tmp_path):
    """Left padding where the first real token is a target: stock's loss reads the logits of the last
    padding position, so that call runs padded (exactly stock), not padding-free."""
    fast, stock = _load_pair("llama", tmp_path)
    batch = ragged("left", prompt=0)
    _assert_same_training(_train_pair(fast, stock, 1, [batch]))
    assert not padding_free_stats(fast)


def test_dropout_in_training_runs_padded(tmp_path):
    """A dropout mask over [1, N] would draw other random numbers than the padded batch's: with LoRA
    dropout, training runs padded (same seed, same bits as stock); evaluation runs padding-free."""
    fast, stock = _load_pair("llama", tmp_path, lora_dropout=0.1, ref_dtype=torch.float32)
    fast.train(), stock.train()
    batch = ragged("right")
    _assert_same_training(_train_pair(fast, stock, 1, [batch], seed=5))
    assert not padding_free_stats(fast)
    fast.eval()
    with torch.no_grad():
        fast(**batch)
    assert padding_free_stats(fast)["forwards"] == 1


@pytest.mark.parametrize("recompute", ["layer", "mlp"])
def test_offloaded_checkpointing_with_padding_free(recompute, tmp_path):
    fast, stock = _load_pair("mistral", tmp_path, use_gradient_checkpointing="unsloth", recompute=recompute)
    fast.train()
    _assert_same_training(_train_pair(fast, stock, 2, [ragged("right", seed=3)]))
    assert padding_free_stats(fast)["forwards"] == 2
    if recompute == "layer":  # (recompute="mlp" offloads tensors of >= 1 MiB only: none at this size)
        assert fast.velotune_offload_stats.packed > 0


def test_opt_out_arguments(tmp_path):
    path = save_mini_model("qwen2", tmp_path)
    model, _ = FastLanguageModel.from_pretrained(path, dtype=torch.float32, padding_free=False)
    assert model.model._velotune_padding_free is False
    peft = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=False)
    assert peft.get_base_model().model._velotune_padding_free is False  # None keeps the loaded choice
    peft = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=False, padding_free=True)
    assert peft.get_base_model().model._velotune_padding_free is True
    with pytest.raises(ValueError, match="padding_free"):
        FastLanguageModel.from_pretrained(path, dtype=torch.float32, padding_free="yes")


# ---------------------------------------------------------------------------------- TRL trainers
def _texts(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    words = ["fox", "dog", "quick", "lazy", "hello", "world", "answer", "four", "model", "fast"]
    return [
        " ".join(words[int(i)] for i in torch.randint(0, len(words), (int(k),), generator=g))
        for k in torch.randint(3, 24, (n,), generator=g)
    ]


# TRL trainer settings of the padded-vs-padding-free runs: fp32 on the CPU, a loss logged every step
CPU_TRAINING = dict(
    learning_rate=1e-2,
    logging_steps=1,
    report_to="none",
    use_cpu=True,
    bf16=False,
    save_strategy="no",
    seed=0,
    gradient_checkpointing=False,
    disable_tqdm=True,
)


def _lora_model(path, padding_free: bool):
    model, tok = FastLanguageModel.from_pretrained(path, dtype=torch.float32, padding_free=padding_free)
    return FastLanguageModel.get_peft_model(model, r=8, use_gradient_checkpointing=False, random_state=1), tok


def _sft_losses(path, padding_free: bool, out):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model, tok = _lora_model(path, padding_free)
    args = SFTConfig(output_dir=str(out), per_device_train_batch_size=4, max_steps=3, **CPU_TRAINING)
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_dict({"text": _texts(12)}), processing_class=tok
    )
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h], padding_free_stats(model)


def test_sft_trainer_losses_match_padding_free_off(tmp_path):
    path = save_mini_model("llama", tmp_path)
    on, stats_on = _sft_losses(path, True, tmp_path / "on")
    off, stats_off = _sft_losses(path, False, tmp_path / "off")
    assert len(on) == 3 and stats_on["forwards"] >= 3 and not stats_off
    assert stats_on["real_tokens"] < stats_on["batch_tokens"]
    for a, b in zip(on, off):
        assert abs(a - b) <= 1e-5 * abs(b), (on, off)


def _dpo_losses(path, padding_free: bool, out):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    model, tok = _lora_model(path, padding_free)
    with torch.no_grad():  # non-zero B: the policy differs from the reference (adapters off) from step 1
        for i, (n, p) in enumerate(model.named_parameters()):
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(i))
    t = _texts(18, seed=4)
    data = Dataset.from_dict({"prompt": t[0::3], "chosen": t[1::3], "rejected": t[2::3]})
    args = DPOConfig(output_dir=str(out), per_device_train_batch_size=3, max_steps=2, beta=0.1, **CPU_TRAINING)
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h], padding_free_stats(model)


def test_dpo_trainer_losses_match_padding_free_off(tmp_path):
    path = save_mini_model("llama", tmp_path)
    on, stats_on = _dpo_losses(path, True, tmp_path / "on")
    off, stats_off = _dpo_losses(path, False, tmp_path / "off")
    assert len(on) == 2 and stats_on["forwards"] >= 2 and not stats_off
    for a, b in zip(on, off):
        assert abs(a - b) <= 1e-5 * max(abs(b), 1e-3), (on, off)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padding_free_on_gpu_equals_padded(dtype, tmp_path):
    """On the GPU: float32 runs the per-sample path (exact to 1e-5), bf16 the flash varlen kernel where
    torch has it (as close to padded as bf16 rounding allows)."""
    on, _ = _load_pair("mistral", tmp_path / "on")
    off, _ = _load_pair("mistral", tmp_path / "off")
    set_padding_free(off, False)
    on, off = on.to("cuda", dtype), off.to("cuda", dtype)
    batch = {k: v.cuda() for k, v in ragged("right", seed=11, lengths=(40, 13, 27, 6)).items()}
    (l_on, g_on), (l_off, g_off) = _grads(on, batch), _grads(off, batch)
    tol = TOL if dtype == torch.float32 else 2e-2
    assert abs(l_on - l_off) <= tol * abs(l_off)
    for n in g_off:
        assert _rel(g_on[n].float(), g_off[n].float()) <= tol, n
    assert padding_free_stats(on)["forwards"] == 1
