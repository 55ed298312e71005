"""Unsloth's loader surface on velotune: FastModel / FastVisionModel, from_pretrained's Unsloth
keywords (honoured, accepted and reported, or refused in one line), load_in_8bit through
bitsandbytes, resize_model_vocab, and vision-language models refused in one line."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from mini import fixed_batch, same_trainables, save_mini_model

from velotune import FastLanguageModel, FastModel, FastVisionModel
from velotune.errors import ConfigError, ModelLoadError


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return save_mini_model("llama", tmp_path_factory.mktemp("unsloth"))


def test_fast_model_is_the_same_loader(llama):
    ref, _ = FastLanguageModel.from_pretrained(llama, dtype=torch.float32)
    model, tok = FastModel.from_pretrained(llama, dtype=torch.float32)
    assert model.velotune_fast and type(model) is type(ref)
    batch = fixed_batch()
    assert torch.equal(_logits(model, batch), _logits(ref, batch))
    peft = FastModel.get_peft_model(model, r=4)
    FastModel.for_inference(peft)
    out = peft.generate(input_ids=batch["input_ids"][:1, :5], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 8)
    FastModel.for_training(peft)
    assert peft.training
    text, _ = FastVisionModel.from_pretrained(llama, dtype=torch.float32)  # a text model loads, as in Unsloth
    assert torch.equal(_logits(text, batch), _logits(ref, batch))


def test_vision_language_models_are_refused_in_one_line(llama, tmp_path):
    from transformers import Gemma3Config

    folder = tmp_path / "vlm"
    folder.mkdir()
    for f in llama.iterdir():  # real safetensors and tokenizer files; the config is an image-text one
        (folder / f.name).write_bytes(f.read_bytes())
    cfg = Gemma3Config(
        text_config=dict(vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
    )
    (folder / "config.json").write_text(json.dumps(cfg.to_dict()))
    for cls in (FastModel, FastVisionModel, FastLanguageModel):
        with pytest.raises(ModelLoadError) as err:
            cls.from_pretrained(folder)
        text = str(err.value)
        assert "\n" not in text and "vision" in text and "text-only" in text, text


def test_unsloth_keywords_are_accepted_and_reported_in_one_line_each(llama, caplog):
    ref, _ = FastLanguageModel.from_pretrained(llama, dtype=torch.float32)
    with caplog.at_level("INFO", logger="velotune"):
        model, _ = FastLanguageModel.from_pretrained(
            model_name=llama,
            max_seq_length=128,
            dtype=torch.float32,
            load_in_4bit=False,
            load_in_8bit=False,
            load_in_16bit=True,
            full_finetuning=False,
            token=None,
            device_map="cpu",
            fast_inference=True,
            gpu_memory_utilization=0.6,
            max_lora_rank=32,
            float8_kv_cache=False,
            disable_log_stats=True,
            random_state=3407,
            use_exact_model_name=True,
            fix_tokenizer=True,
            use_gradient_checkpointing="unsloth",
        )
    lines = [r.getMessage() for r in caplog.records]
    vllm = [m for m in lines if "vLLM engine settings" in m]
    assert vllm == [
        "velotune: vLLM engine settings accepted without effect (velotune decodes without vLLM): "
        "gpu_memory_utilization=0.6, max_lora_rank=32, float8_kv_cache=False, disable_log_stats=True"
    ]
    internals = [m for m in lines if "Unsloth options accepted without effect" in m]
    assert len(internals) == 1 and "fix_tokenizer=True" in internals[0] and "random_state=3407" in internals[0]
    assert sum("fast_inference=True" in m and "vLLM is not used" in m for m in lines) == 1
    batch = fixed_batch()
    assert torch.equal(_logits(model, batch), _logits(ref, batch))


def test_other_keywords_still_go_to_transformers(llama):
    with pytest.raises(TypeError, match="not_a_transformers_keyword"):
        FastLanguageModel.from_pretrained(llama, dtype=torch.float32, not_a_transformers_keyword=1)


def test_features_velotune_lacks_are_one_line_errors(llama):
    with pytest.raises(ConfigError, match="load_in_fp8=True: velotune has no FP8 training"):
        FastLanguageModel.from_pretrained(llama, load_in_fp8=True)
    with pytest.raises(ConfigError, match="qat_scheme='int4'"):
        FastModel.from_pretrained(llama, qat_scheme="int4")
    with pytest.raises(ConfigError, match="choose one"):
        FastLanguageModel.from_pretrained(llama, load_in_4bit=True, load_in_8bit=True)
    with pytest.raises(ConfigError, match="load_in_16bit=True"):
        FastLanguageModel.from_pretrained(llama, load_in_16bit=True, load_in_8bit=True)


def test_load_in_8bit_is_bitsandbytes_int8_and_trains_like_stock_peft(llama):
    from bitsandbytes.nn import Linear8bitLt
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model, _ = FastLanguageModel.from_pretrained(llama, dtype=torch.float32, load_in_8bit=True)
    assert isinstance(model.model.layers[0].self_attn.q_proj, Linear8bitLt)
    assert model.velotune_fast is False  # bitsandbytes' own 8-bit forward
    stock = AutoModelForCausalLM.from_pretrained(
        llama, dtype=torch.float32, quantization_config=BitsAndBytesConfig(load_in_8bit=True)
    )
    batch = fixed_batch()
    assert torch.equal(_logits(model, batch), _logits(stock, batch))

    targets = ["q_proj", "v_proj", "down_proj"]
    ours = FastLanguageModel.get_peft_model(model, r=4, target_modules=targets)
    stock = get_peft_model(stock, LoraConfig(r=4, lora_alpha=16, target_modules=targets, task_type="CAUSAL_LM"))
    same_trainables(ours, stock)
    ours.train()
    stock.train()
    loss, want = ours(**batch).loss, stock(**batch).loss
    loss.backward()
    want.backward()
    assert torch.equal(loss, want)
    grads = {n: p.grad for n, p in stock.named_parameters() if p.requires_grad}
    for name, p in ours.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.grad, grads[name]), name


def test_load_in_8bit_without_bitsandbytes_is_a_clear_error(llama, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what `import bitsandbytes` does when absent
    with pytest.raises(ModelLoadError, match=r"load_in_8bit=True needs bitsandbytes"):
        FastLanguageModel.from_pretrained(llama, load_in_8bit=True)


def test_resize_model_vocab_and_full_finetuning_over_4bit(llama, caplog):
    model, _ = FastLanguageModel.from_pretrained(llama, dtype=torch.float32, resize_model_vocab=400)
    assert model.get_input_embeddings().weight.shape[0] == 400
    assert model.get_output_embeddings().weight.shape[0] == 400
    with caplog.at_level("WARNING", logger="velotune"):
        model, _ = FastLanguageModel.from_pretrained(
            llama, dtype=torch.float32, load_in_4bit=True, full_finetuning=True
        )
    assert "loading unquantised instead" in caplog.text
    assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    assert all(p.requires_grad and p.dtype == torch.float32 for p in model.parameters())


def test_loading_installs_the_trl_compat_layer_and_fast_inference_binds_generate(llama):
    """from_pretrained is the entry point that installs velotune.trl_compat (Unsloth code passes
    SFTTrainer(tokenizer=..., max_seq_length=...)); fast_inference=True puts model.generate on the decode
    engine in training mode too (GRPO rollouts), greedy tokens equal to stock generate's."""
    import trl

    from velotune import trl_compat

    trl_compat.uninstall()
    try:
        model, _ = FastLanguageModel.from_pretrained(llama, dtype=torch.float32, fast_inference=True)
        assert hasattr(trl, "ORPOTrainer")  # only the layer puts it there on TRL 1.x
        assert "generate" in model.__dict__  # bound on this instance
        ids = fixed_batch()["input_ids"][:1, :5]
        model.train()
        got = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
        want = type(model).generate(model, input_ids=ids, max_new_tokens=4, do_sample=False)
        assert torch.equal(got, want)
    finally:
        trl_compat.uninstall()
    assert not hasattr(trl, "ORPOTrainer")
