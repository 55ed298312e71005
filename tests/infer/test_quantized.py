"""4-bit (bitsandbytes NF4, CPU) models on the decode path: against the dequantised stock model."""

import pytest
import torch

from mini import save_mini_model
from test_generate import GREEDY, add_lora, left_padded, stock_generate
from velotune.infer import _STATE, for_inference

pytest.importorskip("bitsandbytes")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def dequantised_copy(q_model, path):
    """A stock float32 model whose linear weights are the NF4 model's dequantised weights."""
    import bitsandbytes.functional as bnbF
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ref_modules = dict(ref.named_modules())
    n = 0
    with torch.no_grad():
        for name, m in q_model.named_modules():
            w = getattr(m, "weight", None)
            if getattr(w, "quant_state", None) is not None:
                ref_modules[name].weight.copy_(bnbF.dequantize_4bit(w.data, w.quant_state).float())
                n += 1
    assert n > 0, "the model was not quantised"
    return ref


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_nf4_greedy_equals_dequantised_stock(tmp_path, family):
    from velotune import FastLanguageModel

    path = save_mini_model(family, tmp_path)
    model, _ = FastLanguageModel.from_pretrained(path, dtype=torch.float32, load_in_4bit=True)
    ref = dequantised_copy(model, path)
    ids, mask = left_padded()
    expected = stock_generate(ref, input_ids=ids, attention_mask=mask, **GREEDY)
    FastLanguageModel.for_inference(model)
    assert model.__dict__[_STATE]["engine"] is not None
    got = model.generate(input_ids=ids, attention_mask=mask, **GREEDY)
    assert torch.equal(got, expected)


def test_qlora_greedy_equals_stock_peft(tmp_path):
    """NF4 base + unmerged LoRA adapters (PEFT's bnb layers) against stock PEFT generate."""
    from velotune import FastLanguageModel

    path = save_mini_model("qwen2", tmp_path)
    model, _ = FastLanguageModel.from_pretrained(path, dtype=torch.float32, load_in_4bit=True, fast=False)
    model = add_lora(model)
    ids, mask = left_padded()
    # Stock in training mode (no dropout: same arithmetic): in eval mode bitsandbytes' CPU forward repacks
    # the weights for AVX512-BF16 and fails at these toy shapes.
    model.train()
    expected = stock_generate(model, input_ids=ids, attention_mask=mask, **GREEDY)
    for_inference(model)
    assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, **GREEDY), expected)


def test_velotune_loader_with_fast_training_patches(tmp_path):
    """FastLanguageModel (fused training forwards bound) + get_peft_model: decode path unaffected."""
    from velotune import FastLanguageModel

    path = save_mini_model("llama", tmp_path)
    model, _ = FastLanguageModel.from_pretrained(path, dtype=torch.float32)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    stock = add_lora(__import__("mini").mini_model("llama"))  # same seed: same base weights
    stock.load_state_dict(model.state_dict())
    ids, mask = left_padded()
    expected = stock_generate(stock, input_ids=ids, attention_mask=mask, **GREEDY)
    FastLanguageModel.for_inference(model)
    assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, **GREEDY), expected)
    FastLanguageModel.for_training(model)
    assert model.training


@pytest.mark.parametrize("modules", [["lm_head"], ["embed_tokens"], ["embed_tokens", "lm_head"]])
def test_modules_to_save_cast_to_bf16_decode_in_their_dtype(tmp_path, modules):
    """A float32 4-bit model with LoRA and fully trained copies (`modules_to_save`), every trainable
    tensor cast to bf16 as TRL's SFTTrainer does for quantised models: the decode path runs each bf16
    copy on a bf16 input and casts its output back to float32 (activations and KV cache stay float32).
    Reference: stock PEFT generate with exactly those casts around each copy (hooks on the stock run)."""
    from peft import LoraConfig, get_peft_model
    from peft.utils.other import ModulesToSaveWrapper

    from velotune import FastLanguageModel

    path = save_mini_model("qwen2", tmp_path)
    model, _ = FastLanguageModel.from_pretrained(path, dtype=torch.float32, load_in_4bit=True, fast=False)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, modules_to_save=modules))
    g = torch.Generator().manual_seed(5)
    copies = [m.modules_to_save["default"] for m in model.modules() if isinstance(m, ModulesToSaveWrapper)]
    assert len(copies) == len(modules)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:  # trained: not the initial values
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    for p in model.parameters():  # trl SFTTrainer.__init__, for quantised models
        if p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    assert all(c.weight.dtype == torch.bfloat16 for c in copies)
    ids, mask = left_padded()
    model.train()  # no dropout; bitsandbytes' CPU eval forward would repack the NF4 weights
    if "lm_head" in modules:  # stock itself cannot run it: a float32 hidden state meets a bf16 head
        with pytest.raises(RuntimeError, match="dtype"):
            stock_generate(model, input_ids=ids, attention_mask=mask, **GREEDY)
    hooks = []
    for c in copies:
        hooks.append(
            c.register_forward_pre_hook(lambda m, a: (a[0].to(torch.bfloat16),) if a[0].is_floating_point() else a)
        )
        hooks.append(c.register_forward_hook(lambda m, a, out: out.float()))
    expected = stock_generate(model, input_ids=ids, attention_mask=mask, **GREEDY)
    with torch.no_grad():
        ref_logits = model(input_ids=ids, attention_mask=mask).logits[:, -1]
    for h in hooks:
        h.remove()
    FastLanguageModel.for_inference(model)
    engine = model.__dict__[_STATE]["engine"]
    assert engine is not None and engine.spec.dtype == torch.float32
    assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, **GREEDY), expected)
    logits = engine.prefill(ids, mask)
    assert logits.dtype == torch.float32
    assert (logits - ref_logits).norm() / ref_logits.norm() < 1e-5  # fp32 reordering only (as test_generate)
