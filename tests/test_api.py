"""The public API end to end on a random mini Llama: load -> LoRA -> train -> save -> reload with stock PEFT.

Also: dtypes are honoured, bad model paths give clear errors, `velotune --help` lists the commands.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
from importlib.metadata import entry_points

import pytest
import torch
from mini import fixed_batch, save_mini_model

from velotune import FastLanguageModel, is_bfloat16_supported
from velotune.errors import ModelLoadError


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_round_trip_train_save_reload_with_stock_peft(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    path = save_mini_model("llama", tmp_path)
    model, tokenizer = FastLanguageModel.from_pretrained(path, max_seq_length=64, dtype=torch.float32)
    assert tokenizer.pad_token is not None
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=0)
    assert isinstance(model, PeftModel)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n, p in model.named_parameters() if p.requires_grad)

    batch = fixed_batch()
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    model.train()
    losses = []
    for _ in range(4):  # 3 updates, then the loss after them
        loss = model(**batch).loss
        losses.append(loss.item())
        if len(losses) == 4:
            break
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[3] < losses[0] - 1e-3, losses

    ours = _logits(model, batch)
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert not list((tmp_path / "adapter").glob("*.bin"))

    stock = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    stock = PeftModel.from_pretrained(stock, tmp_path / "adapter")
    theirs = _logits(stock, batch)
    mask = batch["attention_mask"].bool()  # padded positions are not compared
    # The adapter changed the model (B is no longer zero), and stock PEFT reproduces it.
    base = _logits(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), batch)
    assert (ours[mask] - base[mask]).abs().max() > 1e-3
    err = (ours[mask] - theirs[mask]).abs().max() / theirs[mask].abs().max()
    assert err <= 1e-5, f"relative error {err:.2e}"


def test_float32_honoured_everywhere(tmp_path):
    path = save_mini_model("llama", tmp_path)
    model, _ = FastLanguageModel.from_pretrained(path, dtype=torch.float32)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=False)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    batch = fixed_batch()
    assert model(**batch).loss.dtype == torch.float32
    assert _logits(model, batch).dtype == torch.float32  # (with labels, the fused loss may skip the logits)


def test_bfloat16_honoured(tmp_path):
    path = save_mini_model("llama", tmp_path)
    model, _ = FastLanguageModel.from_pretrained(path, dtype="bfloat16")
    model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=False)
    # Base weights and compute in bf16; the LoRA A/B master weights stay float32 (as in stock PEFT).
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert _logits(model, fixed_batch()).dtype == torch.bfloat16


@pytest.mark.skipif(torch.cuda.is_available(), reason="dtype=None means float32 only on CPU")
def test_default_dtype_is_float32_on_cpu(tmp_path):
    assert not is_bfloat16_supported()
    model, _ = FastLanguageModel.from_pretrained(save_mini_model("llama", tmp_path), dtype=None)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        FastLanguageModel.from_pretrained(str(tmp_path / "no-such-model"))


class _Tripwire:
    """Unpickling this object creates a file: proof that something unpickled it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickled_weights_are_refused_and_never_unpickled(tmp_path):
    folder = save_mini_model("llama", tmp_path)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    marker = tmp_path / "unpickled.txt"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Tripwire(marker)))
    with pytest.raises(ModelLoadError, match=r"safetensors.*pytorch_model\.bin|pytorch_model\.bin.*safetensors"):
        FastLanguageModel.from_pretrained(folder)
    assert not marker.exists()


def test_offline_hub_id_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="local model folder"):
        FastLanguageModel.from_pretrained("velotune-tests/no-such-model")


def test_cli_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "velotune.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for command in ("demo", "train", "export", "chat"):
        assert command in out.stdout
    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("velotune") == "velotune.cli:main"
