"""from_pretrained on a LoRA adapter folder loads the base model it names plus the adapter (as
Unsloth does): a trainable PeftModel on velotune's fast path, the same logits as stock
transformers + PEFT, the adapter folder's tokenizer; pickled or orphaned adapters are refused."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from mini import fixed_batch, save_mini_model

from velotune import FastLanguageModel, report
from velotune.errors import ModelLoadError


def _trained_adapter(tmp_path):
    """A mini Llama and an adapter with non-zero LoRA B saved next to it (base named relatively)."""
    base = save_mini_model("llama", tmp_path)
    model, tok = FastLanguageModel.from_pretrained(base, dtype=torch.float32)
    peft = FastLanguageModel.get_peft_model(model, r=4, target_modules=["q_proj", "v_proj", "down_proj"])
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if ".lora_B." in name:
                p.copy_(0.1 * torch.randn_like(p))
    adapter = tmp_path / "adapter"
    peft.save_pretrained(adapter)
    tok.save_pretrained(adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "../llama"  # relative to the adapter folder
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    return base, adapter


def test_adapter_folder_loads_base_plus_adapter_like_stock_peft(tmp_path, caplog):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, adapter = _trained_adapter(tmp_path)
    with caplog.at_level("INFO", logger="velotune"):
        model, tok = FastLanguageModel.from_pretrained(adapter, dtype=torch.float32)
    assert isinstance(model, PeftModel) and "loaded LoRA adapter" in caplog.text
    assert tok.chat_template and tok.pad_token is not None
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)  # ready to train on, as in Unsloth
    assert re.search(r"lora +\d+ layer\(s\) fused, 0 on the stock PEFT path", report(model))  # velotune's path

    stock = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    batch = fixed_batch()
    mask = batch["attention_mask"].bool()
    model.eval()
    stock.eval()
    with torch.no_grad():
        ours = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[mask]
        want = stock(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[mask]
        plain = stock.get_base_model()
        with stock.disable_adapter():
            without = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[mask]
    assert (want - without).abs().max() > 1e-3  # the adapter matters
    assert ((ours - want).abs().max() / want.abs().max()).item() <= 1e-5

    model.train()
    loss = model(**batch).loss
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
    with caplog.at_level("WARNING", logger="velotune"):
        assert FastLanguageModel.get_peft_model(model, r=4) is model  # already has adapters: kept
    assert "already has LoRA adapters" in caplog.text


def test_adapter_folder_takes_the_checkpointing_keyword(tmp_path):
    from velotune.memory.checkpointing import _offloaded_checkpoint

    _, adapter = _trained_adapter(tmp_path)
    model, _ = FastLanguageModel.from_pretrained(adapter, dtype=torch.float32)
    layer = model.get_base_model().model.layers[0]
    assert getattr(layer._gradient_checkpointing_func, "func", None) is _offloaded_checkpoint  # "unsloth"
    model, _ = FastLanguageModel.from_pretrained(adapter, dtype=torch.float32, use_gradient_checkpointing=False)
    assert not getattr(model.get_base_model().model.layers[0], "gradient_checkpointing", False)


def test_pickled_or_orphaned_adapters_are_refused(tmp_path):
    _, adapter = _trained_adapter(tmp_path)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = None
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="names no base model"):
        FastLanguageModel.from_pretrained(adapter)
    cfg["base_model_name_or_path"] = str(tmp_path / "gone")
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="does not exist"):
        FastLanguageModel.from_pretrained(adapter)
    pickled = tmp_path / "pickled"
    shutil.copytree(adapter, pickled)
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    with pytest.raises(ModelLoadError, match="never unpickles"):
        FastLanguageModel.from_pretrained(pickled)
