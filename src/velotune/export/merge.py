"""Merged weights: W' = W + scaling * B @ A for every LoRA layer, computed in float32.

`iter_merged_tensors(model)` walks the model once and yields `(name, tensor)` with the names a stock
transformers model of the same class uses (`model.layers.0.self_attn.q_proj.weight`, ...), so the
result loads with `AutoModelForCausalLM.from_pretrained` and maps onto GGUF names. The training
model is never modified: every merged weight is a fresh float32 tensor.

    base weight W   [out, in]   (bitsandbytes 4-bit: a fresh copy from velotune.quant.dequantize_weight,
                                 never get_base_weight's reused buffer)
    lora_A          [r, in]
    lora_B          [out, r]
    scaling         lora_alpha / r   (or lora_alpha / sqrt(r) with rsLoRA; PEFT stores it per adapter)
"""

from __future__ import annotations

from typing import Iterator

import torch

from velotune.export.atomic import ExportError


def base_model_of(model) -> torch.nn.Module:
    """The transformers model inside a PeftModel (or the model itself)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def is_peft_model(model) -> bool:
    return hasattr(model, "peft_config") and callable(getattr(model, "get_base_model", None))


def has_adapters(model) -> bool:
    """Whether the model has anything for a merge to fold in: a PEFT LoRA layer or a trained copy
    (`modules_to_save`)."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import ModulesToSaveWrapper

    return any(isinstance(m, (LoraLayer, ModulesToSaveWrapper)) for m in model.modules())


def _merged_lora_weight(layer) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp32 (weight, bias) of one PEFT LoRA layer with its active adapters folded in (fresh tensors)."""
    from velotune.quant import dequantize_weight

    base = layer.get_base_layer()
    weight = dequantize_weight(base, torch.float32)  # a copy; 4-bit: dequantised exactly
    bias = getattr(base, "bias", None)
    bias = None if bias is None else bias.detach().to(torch.float32, copy=True)
    for adapter in layer.active_adapters:
        if getattr(layer, "use_dora", {}).get(adapter, False):
            raise ExportError("merging DoRA adapters is not supported yet; export with save_method='lora'")
        scale = layer.scaling[adapter]
        if adapter in getattr(layer, "lora_A", {}):
            a = layer.lora_A[adapter].weight.detach().float()
            b = layer.lora_B[adapter].weight.detach().float()
            delta = b @ a  # [out, in]
            if getattr(layer, "fan_in_fan_out", False):
                delta = delta.T
            weight += scale * delta.to(weight.device)
            b_bias = getattr(layer.lora_B[adapter], "bias", None)
            if b_bias is not None:  # PEFT's lora_bias=True
                bias = torch.zeros(weight.shape[0], device=weight.device) if bias is None else bias
                bias += scale * b_bias.detach().float()
        elif adapter in getattr(layer, "lora_embedding_A", {}):
            a = layer.lora_embedding_A[adapter].detach().float()  # [r, num_embeddings]
            b = layer.lora_embedding_B[adapter].detach().float()  # [embedding_dim, r]
            weight += scale * (b @ a).T.to(weight.device)  # [num_embeddings, embedding_dim]
    return weight, bias


def iter_merged_tensors(model, dtype: torch.dtype | None = torch.float32) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(transformers name, CPU tensor in dtype)` of the merged model, one tensor at a time.

    dtype None keeps each tensor's float32 merge result (non-float buffers keep their dtype).
    Weights tied to one already yielded (e.g. lm_head tied to embed_tokens) are skipped, as
    transformers does when it saves.
    """
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import ModulesToSaveWrapper

    from velotune.quant import dequantize_weight

    base = base_model_of(model)
    seen: set[int] = set()
    done_prefixes: list[str] = []

    def emit(name: str, t: torch.Tensor) -> tuple[str, torch.Tensor]:
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return name, t.detach().to("cpu").contiguous()

    for mod_name, module in base.named_modules():
        if done_prefixes and mod_name.startswith(tuple(done_prefixes)):
            continue
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(module, LoraLayer):
            done_prefixes.append(prefix)
            weight, bias = _merged_lora_weight(module)
            seen.add(id(module.get_base_layer().weight))
            yield emit(prefix + "weight", weight)
            if bias is not None:
                yield emit(prefix + "bias", bias)
            continue
        if isinstance(module, ModulesToSaveWrapper):
            done_prefixes.append(prefix)
            active = module.active_adapters[0] if module.active_adapters else None
            inner = module.modules_to_save[active] if active in module.modules_to_save else module.original_module
            for key, t in inner.state_dict().items():
                yield emit(prefix + key, t.float() if t.is_floating_point() else t)
            continue
        for key, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue  # tied weight
            seen.add(id(p))
            if key == "weight" and getattr(p, "quant_state", None) is not None:  # a 4-bit layer without LoRA
                yield emit(prefix + key, dequantize_weight(p, torch.float32))
            else:
                yield emit(prefix + key, p.float() if p.is_floating_point() else p)
        for key, b in module.named_buffers(recurse=False):
            if key in module._non_persistent_buffers_set:
                continue
            yield emit(prefix + key, b)
