"""get_peft_model: `embed_tokens` / `lm_head` in target_modules are trained in full (PEFT
modules_to_save), as Unsloth does, with the same loss and gradients as stock PEFT set up that way;
Unsloth's FastModel finetune_* switches pick the LoRA targets."""

from __future__ import annotations

import pytest
import torch
from mini import fixed_batch, same_trainables, save_mini_model

from velotune import FastLanguageModel, FastModel
from velotune.errors import ConfigError

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lora_leaves(model) -> set[str]:
    return {name.split(".lora_A.")[0].rsplit(".", 1)[-1] for name, _ in model.named_parameters() if ".lora_A." in name}


def test_embeddings_and_head_in_target_modules_train_in_full_like_stock_modules_to_save(tmp_path, caplog):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    path = save_mini_model("llama", tmp_path)  # untied embeddings and head
    model, _ = FastLanguageModel.from_pretrained(path, dtype=torch.float32)
    with caplog.at_level("INFO", logger="velotune"):
        ours = FastLanguageModel.get_peft_model(model, r=4, target_modules=PROJ + ["embed_tokens", "lm_head"])
    assert "embed_tokens, lm_head in target_modules: trained in full" in caplog.text
    assert set(ours.peft_config["default"].modules_to_save) == {"embed_tokens", "lm_head"}
    assert _lora_leaves(ours) == set(PROJ)  # no LoRA on the embeddings or the head
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert any("embed_tokens.modules_to_save" in n for n in trainable)
    assert any("lm_head.modules_to_save" in n for n in trainable)

    stock = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    stock = get_peft_model(
        stock,
        LoraConfig(
            r=4,
            lora_alpha=16,
            target_modules=PROJ,
            modules_to_save=["embed_tokens", "lm_head"],
            task_type="CAUSAL_LM",
        ),
    )
    same_trainables(ours, stock)
    batch = fixed_batch()
    ours.train()
    stock.train()
    loss, want = ours(**batch).loss, stock(**batch).loss
    loss.backward()
    want.backward()
    assert torch.allclose(loss, want, rtol=1e-5, atol=0), (loss.item(), want.item())
    grads = {n: p.grad for n, p in stock.named_parameters() if p.requires_grad}
    checked = 0
    for name, p in ours.named_parameters():
        if p.requires_grad:
            g, w = p.grad, grads[name]
            err = ((g - w).abs().max() / w.abs().max().clamp_min(1e-30)).item()
            assert err <= 1e-5, (name, err)
            checked += "modules_to_save" in name
    assert checked == 2


def test_only_embeddings_in_target_modules_is_a_clear_error(tmp_path):
    model, _ = FastLanguageModel.from_pretrained(save_mini_model("llama", tmp_path), dtype=torch.float32)
    with pytest.raises(ValueError, match="leaves no layer for LoRA"):
        FastLanguageModel.get_peft_model(model, r=4, target_modules=["embed_tokens", "lm_head"])


def test_fast_model_finetune_switches_pick_the_targets(tmp_path):
    path = save_mini_model("llama", tmp_path)
    model, _ = FastModel.from_pretrained(path, dtype=torch.float32)
    peft = FastModel.get_peft_model(
        model, r=4, finetune_vision_layers=False, finetune_attention_modules=False, finetune_mlp_modules=True
    )
    assert _lora_leaves(peft) == {"gate_proj", "up_proj", "down_proj"}
    model, _ = FastModel.from_pretrained(path, dtype=torch.float32)
    peft = FastModel.get_peft_model(model, r=4, finetune_language_layers=True, finetune_attention_modules=True)
    assert _lora_leaves(peft) == set(PROJ)  # the MLP switch defaults to on, as in Unsloth
    model, _ = FastModel.from_pretrained(path, dtype=torch.float32)
    with pytest.raises(ConfigError, match="finetune_language_layers=False"):
        FastModel.get_peft_model(model, r=4, finetune_language_layers=False)
    with pytest.raises(ConfigError, match="nothing would be trained"):
        FastModel.get_peft_model(model, r=4, finetune_attention_modules=False, finetune_mlp_modules=False)
