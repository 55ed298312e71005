"""velotune.export: LoRA adapters, merged safetensors, GGUF (llama.cpp) and Ollama Modelfiles.

`attach_export_methods(model)` (called by the loader on every model it returns) binds:

    model.save_pretrained_merged(dir, tokenizer, save_method="lora" | "merged_16bit" | "merged_4bit")
    model.save_pretrained_gguf(dir, tokenizer, quantization_method="q8_0")
    model.push_to_hub_merged(repo_id, tokenizer, save_method=..., token=...)
    model.push_to_hub_gguf(repo_id, tokenizer, quantization_method=..., token=...)

PEFT's own `model.save_pretrained(dir)` stays as it is (adapters in PEFT's format).
"""

from __future__ import annotations

import types

from velotune.export.atomic import ExportError

__all__ = [
    "attach_export_methods",
    "ExportError",
    "save_pretrained_merged",
    "save_pretrained_gguf",
    "push_to_hub_merged",
    "push_to_hub_gguf",
    "export_demo",
]


def save_pretrained_merged(model, *args, **kwargs):
    """See `velotune.export.merged.save_pretrained_merged`."""
    from velotune.export.merged import save_pretrained_merged as impl

    return impl(model, *args, **kwargs)


def save_pretrained_gguf(model, *args, **kwargs):
    """See `velotune.export.gguf_export.save_pretrained_gguf`."""
    from velotune.export.gguf_export import save_pretrained_gguf as impl

    return impl(model, *args, **kwargs)


def push_to_hub_merged(model, *args, **kwargs):
    """See `velotune.export.hub.push_to_hub_merged`."""
    from velotune.export.hub import push_to_hub_merged as impl

    return impl(model, *args, **kwargs)


def push_to_hub_gguf(model, *args, **kwargs):
    """See `velotune.export.hub.push_to_hub_gguf`."""
    from velotune.export.hub import push_to_hub_gguf as impl

    return impl(model, *args, **kwargs)


def export_demo(model, tokenizer, out_dir, **kwargs):
    """See `velotune.export.demo.export_demo`."""
    from velotune.export.demo import export_demo as impl

    return impl(model, tokenizer, out_dir, **kwargs)


_METHODS = {
    "save_pretrained_merged": save_pretrained_merged,
    "save_pretrained_gguf": save_pretrained_gguf,
    "push_to_hub_merged": push_to_hub_merged,
    "push_to_hub_gguf": push_to_hub_gguf,
}


def attach_export_methods(model):
    """Bind the four export methods onto this model instance (not its class); returns the model."""
    for name, fn in _METHODS.items():
        setattr(model, name, types.MethodType(fn, model))
    return model
