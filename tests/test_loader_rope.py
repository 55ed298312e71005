"""from_pretrained never changes a model's RoPE unless asked: max_seq_length defaults to the native
context, a longer one only warns, rope_scaling="linear" (or a linear dict) scales and says so on
stderr, and requests velotune cannot honour fail before any weight is loaded."""

from __future__ import annotations

import pytest
import torch
from mini import fixed_batch, save_mini_model
from transformers import AutoModelForCausalLM

from velotune import FastLanguageModel, unpatch
from velotune.errors import ConfigError


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    return save_mini_model("mistral", tmp_path_factory.mktemp("rope"))  # 256 native positions, default RoPE


def test_default_max_seq_length_is_the_native_context(mistral, caplog):
    with caplog.at_level("INFO", logger="velotune"):
        model, _ = FastLanguageModel.from_pretrained(mistral, dtype=torch.float32)
    assert model.max_seq_length == 256
    assert model.config.max_position_embeddings == 256 and model.config.rope_parameters["rope_type"] == "default"
    assert "RoPE" not in caplog.text


def test_longer_max_seq_length_warns_and_keeps_rope_as_trained(mistral, caplog):
    with caplog.at_level("INFO", logger="velotune"):
        model, _ = FastLanguageModel.from_pretrained(mistral, dtype=torch.float32, max_seq_length=1024)
    warned = [r for r in caplog.records if r.levelname == "WARNING" and "max_seq_length 1024" in r.getMessage()]
    assert len(warned) == 1 and "rope_scaling='linear'" in warned[0].getMessage()
    assert model.max_seq_length == 1024
    assert model.config.max_position_embeddings == 256 and model.config.rope_parameters["rope_type"] == "default"
    stock = AutoModelForCausalLM.from_pretrained(mistral, dtype=torch.float32)
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, stock.model.rotary_emb.inv_freq, rtol=0, atol=0)
    batch = fixed_batch()
    mask = batch["attention_mask"].bool()
    ours, want = _logits(model, batch)[mask], _logits(stock, batch)[mask]
    assert ((ours - want).abs().max() / want.abs().max()).item() <= 1e-5


@pytest.mark.parametrize("fast", [True, False])
def test_linear_scaling_when_asked_is_applied_and_printed(mistral, capsys, fast):
    model, _ = FastLanguageModel.from_pretrained(
        mistral, dtype=torch.float32, max_seq_length=1024, rope_scaling="linear", fast=fast
    )
    err = capsys.readouterr().err
    assert "RoPE scaled linearly x4 as asked: 1024 positions (the model was trained on 256)" in err
    rp = model.config.rope_parameters
    assert rp["rope_type"] == "linear" and rp["factor"] == pytest.approx(4.0)
    stock = AutoModelForCausalLM.from_pretrained(mistral, dtype=torch.float32)
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, stock.model.rotary_emb.inv_freq / 4)
    unpatch(model)
    assert model.config.max_position_embeddings == 256 and model.config.rope_parameters["rope_type"] == "default"


def test_linear_dict_gives_the_factor(mistral):
    model, _ = FastLanguageModel.from_pretrained(
        mistral, dtype=torch.float32, rope_scaling={"type": "linear", "factor": 2.0}
    )
    assert model.config.rope_parameters["factor"] == pytest.approx(2.0)
    assert model.config.max_position_embeddings == 512 and model.max_seq_length == 256


def test_requests_that_cannot_be_honoured_fail_before_loading(mistral, tmp_path):
    with pytest.raises(ConfigError, match="give a max_seq_length above the model's native context"):
        FastLanguageModel.from_pretrained(mistral, dtype=torch.float32, rope_scaling="linear")
    with pytest.raises(ConfigError, match="velotune scales RoPE linearly"):
        FastLanguageModel.from_pretrained(mistral, dtype=torch.float32, rope_scaling={"type": "yarn", "factor": 4.0})
    with pytest.raises(ConfigError, match="use None"):
        FastLanguageModel.from_pretrained(mistral, dtype=torch.float32, rope_scaling=True)
    llama3 = save_mini_model("llama", tmp_path)  # llama3-type RoPE: not rescaled
    with pytest.raises(ConfigError, match="already uses 'llama3' RoPE scaling"):
        FastLanguageModel.from_pretrained(llama3, dtype=torch.float32, max_seq_length=1024, rope_scaling="linear")
    with pytest.raises(ConfigError, match="max_seq_length=0"):
        FastLanguageModel.from_pretrained(mistral, dtype=torch.float32, max_seq_length=0)
