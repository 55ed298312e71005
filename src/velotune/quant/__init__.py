"""4-bit NF4 quantisation (bitsandbytes format) and the weight accessor the fused LoRA paths use."""
from __future__ import annotations

import torch


def get_base_weight(linear: torch.nn.Module) -> torch.Tensor:
    """The base layer's weight `[out_features, in_features]` in its compute dtype.

    Plain `nn.Linear`: the weight itself (no copy). 4-bit layers: dequantised (the memory issue
    replaces this with velotune's NF4 kernel writing into a reusable per-device buffer).
    """
    weight = linear.weight
    if getattr(weight, "quant_state", None) is not None:  # bitsandbytes Params4bit
        import bitsandbytes.functional as bnbF

        return bnbF.dequantize_4bit(weight.data, weight.quant_state)
    return weight


def quantization_config_for(compute_dtype: torch.dtype, config) -> dict:
    """`from_pretrained` kwargs that load `config`'s model in NF4 with double quantisation."""
    from transformers import BitsAndBytesConfig

    return {"quantization_config": BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype)}
