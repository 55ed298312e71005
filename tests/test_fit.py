"""velotune.fit: the training-memory estimate from a config, and from_pretrained's refusal before
anything is loaded when it exceeds the card (here an explicit `memory_cap`, as CPU has no card)."""

from __future__ import annotations

import json

import pytest
import torch

from mini import mini_config, save_mini_model
from velotune import FastLanguageModel
from velotune.errors import ModelLoadError
from velotune.fit import GiB, check_fit, estimate_memory, nf4_bytes, parse_bytes

LLAMA_70B = dict(
    hidden_size=8192,
    intermediate_size=28672,
    num_hidden_layers=80,
    num_attention_heads=64,
    num_key_value_heads=8,
    vocab_size=128256,
    tie_word_embeddings=False,
)


def _state_bytes(model) -> int:
    """Bytes the loaded model really holds: parameters, buffers (not rotary tables), 4-bit states."""
    total = 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if "rotary_emb" in name:
            continue
        total += t.numel() * t.element_size()
        qs = getattr(t, "quant_state", None)
        if qs is not None:
            s2 = qs.state2
            total += sum(x.numel() * x.element_size() for x in (qs.absmax, qs.code, qs.offset, s2.absmax, s2.code))
    return total


@pytest.mark.parametrize("load_in_4bit", [False, True])
def test_weights_estimate_is_what_loading_holds(tmp_path, load_in_4bit):
    if load_in_4bit:
        pytest.importorskip("bitsandbytes")
    path = save_mini_model("llama", tmp_path, intermediate_size=128)
    model, _ = FastLanguageModel.from_pretrained(path, dtype=torch.bfloat16, load_in_4bit=load_in_4bit, fast=False)
    est = model.velotune_memory_estimate
    assert est.quantised == load_in_4bit
    assert est.weights == _state_bytes(model)
    assert est.n_params == sum(p.numel() for p in model.parameters()) or load_in_4bit


def test_70b_shape_numbers():
    from transformers import LlamaConfig

    config = LlamaConfig(**LLAMA_70B)
    q = estimate_memory(config, torch.bfloat16, load_in_4bit=True, seq_len=8192)
    assert 70.5e9 < q.n_params < 70.6e9
    linears = 80 * (2 * 8192 * 8192 + 2 * 8192 * 1024 + 3 * 8192 * 28672)
    assert (
        q.weights
        == 80 * (2 * nf4_bytes(8192 * 8192) + 2 * nf4_bytes(8192 * 1024) + 3 * nf4_bytes(8192 * 28672))
        + (q.n_params - linears) * 2
    )
    assert 36 * GiB < q.weights < 38 * GiB
    assert q.dequant_buffers == 2 * 28672 * 8192 * 2
    assert q.per_token_host == 80 * 8192 * 2 and q.host_offload == 8192 * q.per_token_host
    half = estimate_memory(config, torch.bfloat16, load_in_4bit=True, seq_len=8192, offload_every=2)
    assert half.per_token_host * 2 == q.per_token_host and half.per_token_gpu == q.per_token_gpu + 8192 * 2
    b16 = estimate_memory(config, torch.bfloat16, load_in_4bit=False, seq_len=8192)
    assert b16.weights == q.n_params * 2
    with pytest.raises(ModelLoadError, match=r"does not fit.*load_in_4bit=True \(~"):
        check_fit(config, 78 * GiB, torch.bfloat16, False, 8192)
    assert check_fit(config, 78 * GiB, torch.bfloat16, True, 8192).gpu_bytes < 78 * GiB
    with pytest.raises(ModelLoadError, match="max_seq_length <= ") as e:
        check_fit(config, 78 * GiB, torch.bfloat16, True, 10**6)
    fit = int(str(e.value).split("max_seq_length <= ")[1].split(";")[0].split(")")[0])
    assert check_fit(config, 78 * GiB, torch.bfloat16, True, fit).gpu_bytes <= 78 * GiB
    with pytest.raises(ModelLoadError):
        check_fit(config, 78 * GiB, torch.bfloat16, True, fit + 1)


def _weights_replaced(path):
    """The folder's weights replaced by one unrelated tensor (valid safetensors): any step that reads the
    model's weights fails, with a different error."""
    from safetensors.torch import save_file

    for f in path.glob("*.safetensors"):
        save_file({"unrelated": torch.zeros(1)}, str(f))


def test_refused_before_loading(tmp_path):
    """A refusal that came after loading began would be a different error (the weights are missing)."""
    path = save_mini_model("llama", tmp_path)
    _weights_replaced(path)
    est = estimate_memory(mini_config("llama"), torch.float32, seq_len=2048)
    with pytest.raises(ModelLoadError, match=r"does not fit: it needs ~.* GiB .* What would fit: .*max_seq_length <="):
        FastLanguageModel.from_pretrained(path, dtype=torch.float32, max_seq_length=2048, memory_cap=est.gpu_bytes - 1)
    with pytest.raises(ModelLoadError, match="memory_cap"):
        FastLanguageModel.from_pretrained(path, dtype=torch.float32, max_seq_length=2048, memory_cap="lots")
    with pytest.raises(ModelLoadError, match="lack") as e:  # under the cap: on to the weights (missing here)
        FastLanguageModel.from_pretrained(path, dtype=torch.float32, max_seq_length=2048, memory_cap=est.gpu_bytes)
    assert "does not fit" not in str(e.value)


def test_prequantised_config_counts_as_4bit(tmp_path):
    path = save_mini_model("llama", tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    config16 = mini_config("llama")
    est16 = estimate_memory(config16, torch.bfloat16)
    est4 = estimate_memory(config16, torch.bfloat16, load_in_4bit=True)
    assert est4.weights < est16.weights
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    (path / "config.json").write_text(json.dumps(cfg))
    _weights_replaced(path)
    with pytest.raises(ModelLoadError, match="NF4"):  # described as the 4-bit model it is
        FastLanguageModel.from_pretrained(
            path, dtype=torch.bfloat16, max_seq_length=2048, memory_cap=est4.gpu_bytes - 1
        )


def test_parse_bytes():
    assert parse_bytes(123) == 123 and parse_bytes("16GiB") == 16 * 2**30 and parse_bytes("1.5 GB") == 1.5e9
    assert parse_bytes("512mib") == 512 * 2**20
    for bad in ("", "GiB", "-1GiB", 0, True, "16 apples"):
        with pytest.raises(ValueError):
            parse_bytes(bad)
