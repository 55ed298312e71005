"""Shared builders for the export tests: a mini model with non-trivial LoRA adapters."""

from __future__ import annotations

import torch

from mini import mini_model, mini_tokenizer


def lora_model(family: str = "llama", r: int = 4, seed: int = 0, **overrides):
    """A stock transformers mini model wrapped by velotune's get_peft_model, lora_B randomised
    (PEFT initialises B to zero, which would make every merge test pass trivially)."""
    from velotune import FastLanguageModel

    model = mini_model(family, seed=seed, **overrides)
    peft_model = FastLanguageModel.get_peft_model(
        model, r=r, lora_alpha=8, use_gradient_checkpointing=False, random_state=seed
    )
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    peft_model.eval()
    return peft_model, mini_tokenizer()


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()
