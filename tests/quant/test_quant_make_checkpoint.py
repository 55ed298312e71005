"""bench/make_checkpoint.py: a random-weight pre-quantised (bitsandbytes NF4) checkpoint written tensor
by tensor loads with stock transformers + bitsandbytes and with FastLanguageModel, every tensor used
(no missing or unexpected keys), the stored codes as written, and both give the same logits."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("bitsandbytes")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from make_checkpoint import make_checkpoint  # noqa: E402

from velotune import FastLanguageModel  # noqa: E402
from velotune.quant import dequantize_weight, is_4bit  # noqa: E402


@pytest.mark.parametrize("shape", ["tiny-llama", "tiny-gemma2"])
def test_checkpoint_loads_in_stock_and_velotune(tmp_path, shape):
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    out = tmp_path / shape
    r = make_checkpoint(shape, out, device="cpu", shard_gib=20e3 / 2**30, log=lambda *a: None)
    assert r["shards"] >= 2 and len(list(out.glob("*.safetensors"))) == r["shards"]
    config = AutoConfig.from_pretrained(out)
    assert config.quantization_config["bnb_4bit_compute_dtype"] == "bfloat16"
    config.quantization_config["bnb_4bit_compute_dtype"] = "float32"  # as velotune's fp32 load sets it
    stock, info = AutoModelForCausalLM.from_pretrained(
        out, config=config, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    # fast=False: the same stock forward on velotune's load (the fused path's parity with stock is
    # tests/quant/test_quant_qlora.py's); embeddings, norms and lm_head stay bf16 as stored
    ours, tok = FastLanguageModel.from_pretrained(out, dtype=torch.float32, load_in_4bit=True, fast=False)
    down = "model.layers.1.mlp.down_proj"
    shard = next(p for p in out.glob("*.safetensors") if f"{down}.weight" in safe_open(str(p), "pt").keys())
    stored = safe_open(str(shard), "pt").get_tensor(f"{down}.weight")
    for model in (stock, ours):
        layer = model.get_submodule(down)
        assert is_4bit(layer) and torch.equal(layer.weight.data.view(torch.uint8).reshape(-1), stored.reshape(-1))
        w = dequantize_weight(layer)
        assert 0.01 < w.std().item() < 0.03  # N(0, 0.02^2) through NF4
    assert torch.equal(dequantize_weight(stock.get_submodule(down)), dequantize_weight(ours.get_submodule(down)))
    ids = tok("The quick brown fox", return_tensors="pt")["input_ids"]
    # train mode with autograd on: bitsandbytes' CPU eval path repacks 4-bit weights into its own
    # layout (bf16 absmax), a different computation from the training one compared here
    stock.train(), ours.train()
    a, b = stock(input_ids=ids).logits.detach(), ours(input_ids=ids).logits.detach()
    assert torch.isfinite(a).all() and a.abs().max() > 0
    assert torch.equal(a, b)
