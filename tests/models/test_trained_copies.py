"""modules_to_save copies keep the model's dtype at their boundary (velotune/models/trained_copies.py).

The case: a float32 4-bit model with embed_tokens / lm_head trained in full, whose copies TRL casts to bf16 when it
builds a trainer. Stock PEFT then fails in the first forward; velotune's copies compute in bf16 and hand float32 on.
"""

from __future__ import annotations

import pytest
import torch
from mini import VOCAB, fixed_batch, mini_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _peft(model, velotune: bool):
    from peft import LoraConfig, get_peft_model

    if velotune:
        from velotune import FastLanguageModel

        return FastLanguageModel.get_peft_model(
            model, r=4, lora_alpha=8, modules_to_save=["embed_tokens", "lm_head"], use_gradient_checkpointing=False
        )
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"])
    return get_peft_model(model, config)


def _cast_trainable_like_trl(model) -> None:
    """What TRL's trainers do to a quantized model's trainable parameters in __init__."""
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(torch.bfloat16)


def _copies(model):
    embed = model.get_input_embeddings().modules_to_save["default"]
    head = model.get_output_embeddings().modules_to_save["default"]
    return embed, head


def test_bf16_copies_on_a_float32_model_train(tmp_path):
    batch = fixed_batch(seq=10)
    stock = _peft(mini_model("llama"), velotune=False)
    _cast_trainable_like_trl(stock)
    with pytest.raises(RuntimeError, match="dtype"):  # what the copies do without velotune
        stock(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

    model = _peft(mini_model("llama"), velotune=True)
    embed, head = _copies(model)
    _cast_trainable_like_trl(model)
    assert embed.weight.dtype == head.weight.dtype == torch.bfloat16

    ids = batch["input_ids"]
    h = torch.randn(2, 10, 64)
    assert torch.equal(embed(ids), torch.nn.functional.embedding(ids, embed.weight).float())
    assert torch.equal(head(h), torch.nn.functional.linear(h.bfloat16(), head.weight).float())

    model.train()
    logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits  # the head as a module
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    loss = model(**batch).loss  # velotune's fused loss reads the copy's weight (mixed dtypes promoted)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert embed.weight.grad.dtype == head.weight.grad.dtype == torch.bfloat16
    assert embed.weight.grad.abs().sum() > 0 and head.weight.grad.abs().sum() > 0


def test_copies_in_the_model_dtype_are_the_stock_forward():
    model = _peft(mini_model("llama"), velotune=True)
    embed, head = _copies(model)
    assert "forward" in vars(embed) and "forward" in vars(head)  # bound per instance
    ids = torch.randint(0, VOCAB, (2, 7))
    h = torch.randn(2, 7, 64)
    assert torch.equal(embed(ids), torch.nn.Embedding.forward(embed, ids))
    assert torch.equal(head(h), torch.nn.Linear.forward(head, h))
    del embed.forward, head.forward  # revertible: the class's forward again
    assert "forward" not in vars(embed) and "forward" not in vars(head)
