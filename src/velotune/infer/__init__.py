"""Generation: `for_inference` / `for_training`."""
from __future__ import annotations


def for_inference(model):
    """Eval mode with the KV cache on. (The fast decoding path replaces this.)"""
    model.eval()
    base = getattr(model, "base_model", model)
    if hasattr(base, "config"):
        base.config.use_cache = True
    return model


def for_training(model, use_gradient_checkpointing=True):
    model.train()
    base = getattr(model, "base_model", model)
    if hasattr(base, "config"):
        base.config.use_cache = False
    return model
