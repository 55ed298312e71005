"""4-bit NF4 quantisation (bitsandbytes format) and the weight accessor the fused LoRA paths use.

    get_base_weight(layer)            -> [out, in] compute-dtype weight (4-bit: velotune's NF4 kernel
                                         into a reused buffer; plain: the weight itself)
    dequantize_weight(layer, dtype)   -> fresh copy (for merging in fp32)
    dequantize_model_weights(model)   -> {name: weight} for every 4-bit layer
    quantization_config_for(...)      -> from_pretrained kwargs for load_in_4bit=True
    quantization_config_8bit(config)  -> from_pretrained kwargs for load_in_8bit=True (bitsandbytes int8)

Files: `nf4_code.py` (the code book), `nf4.py` (format, quantise, reference dequantise, dispatch),
`dequant_kernel.py` (Triton), `weights.py` (accessors, buffers), `loading.py` (transformers/bitsandbytes
loading config).
"""

from __future__ import annotations

from velotune.quant.loading import checkpoint_bits, quantization_config_8bit, quantization_config_for
from velotune.quant.nf4 import NF4Weight, dequantize_nf4, dequantize_nf4_reference, quantize_nf4
from velotune.quant.weights import (
    base_layer,
    dequantize_model_weights,
    dequantize_weight,
    get_base_weight,
    is_4bit,
    iter_dequantized_weights,
    nf4_weight,
)

__all__ = [
    "NF4Weight",
    "base_layer",
    "dequantize_model_weights",
    "dequantize_nf4",
    "dequantize_nf4_reference",
    "dequantize_weight",
    "get_base_weight",
    "is_4bit",
    "iter_dequantized_weights",
    "nf4_weight",
    "checkpoint_bits",
    "quantization_config_8bit",
    "quantization_config_for",
    "quantize_nf4",
]
