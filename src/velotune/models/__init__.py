"""Model families and the fast decoder path.

`prepare_model` is called by `FastLanguageModel.from_pretrained`; `prepare_peft_model` by
`get_peft_model`. Until the fast path lands they leave the stock transformers forward in place.
"""
from __future__ import annotations


def prepare_model(model, *, max_seq_length: int, full_finetuning: bool = False) -> None:
    """Bind velotune's fused forwards onto a freshly loaded transformers model (per instance)."""


def prepare_peft_model(peft_model) -> None:
    """Bind fused LoRA forwards onto the LoRA layers of a PeftModel (per instance)."""
