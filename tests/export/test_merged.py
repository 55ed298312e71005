"""save_pretrained_merged: adapters load in stock PEFT, merged weights load in stock transformers,
both reproduce the training model's logits; saves are atomic."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import logits, lora_model, rel_err
from mini import VOCAB

IDS = torch.randint(7, VOCAB, (2, 10), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize(
    "family", ["llama", "phi3", "gemma2", "qwen3", "gemma3_text", "granite", "smollm3", "olmo2", "ministral3", "olmo3"]
)
def test_merged_matches_unmerged_in_stock_transformers(family, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = lora_model(family)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    expected = logits(model, IDS)
    out = model.save_pretrained_merged(tmp_path / "merged", tok, save_method="merged_16bit", quiet=True)
    for n, p in model.named_parameters():  # the training model is untouched
        assert torch.equal(p, before[n]), n
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["dtype"] == "float32"
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    got = logits(merged, IDS)
    assert rel_err(got, expected) <= 1e-5
    # LoRA really changed the model (the test would be vacuous otherwise)
    with model.disable_adapter():
        assert rel_err(logits(model, IDS), expected) > 1e-3
    tok2 = AutoTokenizer.from_pretrained(out)
    assert tok2.chat_template == tok.chat_template and tok2.eos_token == tok.eos_token
    assert (out / "generation_config.json").exists()


def test_lora_loaded_by_stock_peft_identical_logits(tmp_path):
    from peft import PeftModel

    from mini import mini_model

    model, tok = lora_model("qwen2")
    expected = logits(model, IDS)
    out = model.save_pretrained_merged(tmp_path / "lora", tok, save_method="lora", quiet=True)
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    stock = PeftModel.from_pretrained(mini_model("qwen2"), out).eval()
    assert torch.equal(logits(stock, IDS), expected)
    base_only = logits(mini_model("qwen2"), IDS)
    assert rel_err(base_only, expected) > 1e-3  # adapters are not a no-op


def test_sharded_and_bf16(tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok = lora_model("mistral")
    out = model.save_pretrained_merged(tmp_path / "m", tok, dtype="bfloat16", max_shard_size="40KB", quiet=True)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and all((out / s).exists() for s in shards)
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.dtype == torch.bfloat16
    expected = logits(model, IDS)
    assert rel_err(logits(merged.float(), IDS), expected) < 2e-2  # bf16 rounding of the weights only


def test_failed_save_leaves_previous_output_intact(tmp_path, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    from velotune.export import ExportError

    model, tok = lora_model("llama")
    out = model.save_pretrained_merged(tmp_path / "m", tok, max_shard_size="40KB", quiet=True)
    snapshot = {p.name: p.read_bytes() for p in out.iterdir()}
    real, calls = safetensors.torch.save_file, []

    def failing_save(tensors, filename, metadata=None):  # the disk fills up on the 3rd shard
        calls.append(filename)
        if len(calls) == 3:  # what safetensors' Rust writer raises on ENOSPC (a real full disk: tests/reliability)
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    with torch.no_grad():
        model.base_model.model.lm_head.weight.add_(1.0)  # a different model, so a new save would differ
    with pytest.raises(ExportError, match="disk is full.*previous output.*intact"):
        model.save_pretrained_merged(tmp_path / "m", tok, max_shard_size="40KB", quiet=True)
    assert len(calls) == 3
    assert {p.name: p.read_bytes() for p in out.iterdir()} == snapshot
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary folders left behind


@pytest.fixture(scope="module")
def qlora_model(tmp_path_factory):
    """A QLoRA model: NF4 (bitsandbytes, CPU) base + LoRA. intermediate 128: bitsandbytes' CPU kernels
    need in_features divisible by the 64-value block."""
    from mini import mini_tokenizer, save_mini_model

    from velotune import FastLanguageModel

    base = save_mini_model("llama", tmp_path_factory.mktemp("qlora"), intermediate_size=128)
    model, _ = FastLanguageModel.from_pretrained(base, dtype=torch.float32, load_in_4bit=True, fast=False)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    model.train()  # dropout is 0; bitsandbytes' CPU eval path would repack the NF4 weights in place
    return model, mini_tokenizer(), logits(model, IDS)


def test_4bit_base_is_dequantised_before_merging(qlora_model, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok, expected = qlora_model
    out = model.save_pretrained_merged(tmp_path / "m", tok, quiet=True)
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["dtype"] == "float32"
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert rel_err(logits(merged, IDS), expected) <= 1e-5


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], None])
def test_4bit_layers_without_lora_merge(targets, tmp_path, caplog):
    """Any mix of LoRA and plain 4-bit layers merges (each 4-bit weight a fresh dequantised copy, not
    a shared buffer); a 4-bit model with no LoRA at all saves its dequantised base, with a warning."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from mini import mini_tokenizer, save_mini_model

    from velotune import FastLanguageModel

    base = save_mini_model("llama", tmp_path / "base", intermediate_size=128)
    model, _ = FastLanguageModel.from_pretrained(base, dtype=torch.float32, load_in_4bit=True, fast=False)
    if targets is not None:
        model = FastLanguageModel.get_peft_model(
            model, r=4, lora_alpha=8, target_modules=targets, use_gradient_checkpointing=False
        )
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)
    model.train()  # dropout is 0; bitsandbytes' CPU eval path would repack the NF4 weights in place
    expected = logits(model, IDS)
    with caplog.at_level("WARNING", logger="velotune"):
        out = model.save_pretrained_merged(tmp_path / "m", mini_tokenizer(), quiet=True)
    assert ("no LoRA adapters" in caplog.text) == (targets is None)
    saved = load_file(out / "model.safetensors")
    root = model.get_base_model() if targets else model
    plain = {  # 4-bit layers no LoRA wraps (a wrapped one is named ...base_layer)
        n: m.weight for n, m in root.named_modules() if isinstance(m, bnb.nn.Linear4bit) and "base_layer" not in n
    }
    assert len(plain) == (2 * 5 if targets else 2 * 7)
    for name, w in plain.items():  # each is the weight bitsandbytes itself dequantises
        assert torch.equal(saved[f"{name}.weight"], bnbF.dequantize_4bit(w.data, w.quant_state).float()), name
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert rel_err(logits(merged, IDS), expected) <= 1e-5


@pytest.mark.parametrize("method", ["merged_4bit", "merged_4bit_forced"])  # (the second: Unsloth's name)
def test_merged_4bit_loads_as_nf4(qlora_model, tmp_path, method):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    model, tok, expected = qlora_model
    out = model.save_pretrained_merged(tmp_path / "m4", tok, save_method=method, quiet=True)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    m4 = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(m4.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    assert rel_err(logits(m4, IDS), expected) <= 0.35  # NF4 re-quantisation of random weights [~0.2]


def test_qlora_to_gguf_dequantises_the_base(qlora_model, tmp_path):
    np = pytest.importorskip("numpy")
    pytest.importorskip("llama_cpp")
    from velotune.export.llama_cpp_io import open_gguf

    model, tok, expected = qlora_model
    (path,) = model.save_pretrained_gguf(tmp_path, tok, "f32", quiet=True, modelfile=False)
    llm = open_gguf(path, n_ctx=32, logits_all=True, f32_kv_cache=True)
    ids = IDS[0].tolist()
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)])
    llm.close()
    ref = expected[0].numpy()
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()
