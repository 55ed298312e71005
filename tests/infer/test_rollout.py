"""`enable_fast_generate`: model.generate on the decode engine while the model stays in training mode (what
TRL's GRPO samples with), against stock generate on the same model; what goes to stock; undo."""

import pytest
import torch

from mini import save_mini_model
from test_generate import GREEDY, left_padded
from velotune import FastLanguageModel
from velotune.infer.rollout import disable_fast_generate, enable_fast_generate, fast_generate_calls

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _lora_model(tmp_path, dropout=0.0):
    model, _ = FastLanguageModel.from_pretrained(save_mini_model("qwen3", tmp_path), dtype=torch.float32)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, lora_dropout=dropout)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    return model.train()


def test_training_mode_generate_on_the_engine_equals_stock(tmp_path):
    model = _lora_model(tmp_path)
    ids, mask = (t.to(model.device) for t in left_padded())
    stock = type(model).generate.__get__(model)
    expected = stock(input_ids=ids, attention_mask=mask, **GREEDY)
    torch.manual_seed(5)
    sampled = stock(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=True, top_k=20, pad_token_id=0)
    assert enable_fast_generate(model) and enable_fast_generate(model)  # idempotent
    assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, **GREEDY), expected)
    torch.manual_seed(5)
    got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=True, top_k=20, pad_token_id=0)
    assert torch.equal(got, sampled)
    assert fast_generate_calls(model) == 2 and model.training  # the engine ran; the mode was left alone
    with torch.no_grad():  # the adapters change in place (an optimizer step): the next call reads them
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(-2.0)
    assert torch.equal(
        model.generate(input_ids=ids, attention_mask=mask, **GREEDY),
        stock(input_ids=ids, attention_mask=mask, **GREEDY),
    )
    # what the engine does not take goes to stock
    model.generate(input_ids=ids, attention_mask=mask, num_beams=2, **GREEDY)
    assert fast_generate_calls(model) == 3
    assert disable_fast_generate(model) and "generate" not in model.__dict__ and not disable_fast_generate(model)


def test_dropout_in_training_mode_goes_to_stock_and_for_inference_composes(tmp_path):
    model = _lora_model(tmp_path, dropout=0.1)
    ids, mask = (t.to(model.device) for t in left_padded())
    enable_fast_generate(model)
    model.generate(input_ids=ids, attention_mask=mask, **GREEDY)
    assert fast_generate_calls(model) == 0  # stock would drop activations, the engine never does
    FastLanguageModel.for_inference(model)  # eval mode: for_inference's own engine
    model.generate(input_ids=ids, attention_mask=mask, **GREEDY)
    FastLanguageModel.for_training(model)
    assert model.training and model.__dict__["generate"].func.__name__ == "_generate"  # ours again
    model.eval()
    model.generate(input_ids=ids, attention_mask=mask, **GREEDY)
    assert fast_generate_calls(model) == 1  # eval mode: no dropout active


def test_bound_before_get_peft_model_reads_the_injected_lora_layers(tmp_path):
    """Bound on the loaded model, then LoRA injected: PEFT's generate reaches the base model's bound generate,
    whose engine is rebuilt on the LoRA layers (greedy tokens equal stock PEFT generate with non-zero B)."""
    model, _ = FastLanguageModel.from_pretrained(save_mini_model("llama", tmp_path), dtype=torch.float32)
    ids, mask = (t.to(model.device) for t in left_padded())
    assert enable_fast_generate(model)
    base_out = model.generate(input_ids=ids, attention_mask=mask, **GREEDY)
    peft_model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    expected = type(model).generate(model, input_ids=ids, attention_mask=mask, **GREEDY)  # stock, through PEFT's layers
    got = peft_model.generate(input_ids=ids, attention_mask=mask, **GREEDY)
    assert fast_generate_calls(model) == 2 and torch.equal(got, expected) and not torch.equal(got, base_out)
