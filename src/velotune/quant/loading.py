"""`load_in_4bit=True`: the transformers/bitsandbytes settings that load a model in NF4.

Quantisation on load is bitsandbytes' (through transformers' `BitsAndBytesConfig`), so the model
is a stock transformers 4-bit model: PEFT, TRL, `save_pretrained` and pre-quantised `*-bnb-4bit`
checkpoints all work as they do without velotune. NF4 with double quantisation, blocks of 64;
only the decoder's linear layers are quantised: embeddings, norms and `lm_head` stay in the
compute dtype (transformers skips the output embedding), and no full-precision copy of the
quantised weights is kept.

Memory while loading: transformers (5.x) reads the safetensors shards memory-mapped, one tensor at
a time; quantising on the fly, it materialises each 16-bit tensor on the target device and quantises
it there before the next (no loader threads in that case), so neither the host nor the card ever
holds the 16-bit model; a pre-quantised checkpoint's tensors go to the device as stored. Measured
by bench/load_memory.py (tests/quant/test_quant_load_memory.py on CPU). velotune adds nothing to
this path but the device placement below and the fit check before it (velotune.fit).
"""

from __future__ import annotations

import torch

from velotune.errors import ModelLoadError

_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def _require_bitsandbytes(option: str = "load_in_4bit") -> None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ModelLoadError(
            f"{option}=True needs bitsandbytes: pip install 'velotune[bnb]' (or pip install bitsandbytes)"
        ) from None


def _existing_quantization(config) -> dict | None:
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    return qc if isinstance(qc, dict) else qc.to_dict()


def quantization_config_for(compute_dtype: torch.dtype, config) -> dict:
    """`from_pretrained` kwargs that load `config`'s model in NF4 with double quantisation.

    A checkpoint that is already bitsandbytes-4-bit (e.g. `*-bnb-4bit`) loads as saved: no new
    config is passed (transformers would ignore it), but its compute dtype is set to
    `compute_dtype` on `config` (the object then passed to from_pretrained). A checkpoint
    quantised by another method raises ModelLoadError. On CUDA the model is placed on the
    current device (`device_map`), which the caller may override.
    """
    _require_bitsandbytes()
    kwargs: dict = {}
    if torch.cuda.is_available():
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    existing = _existing_quantization(config)
    if existing is not None:
        method = existing.get("quant_method")
        if method != "bitsandbytes" or not existing.get("load_in_4bit"):
            raise ModelLoadError(
                f"this checkpoint is already quantised ({method}, "
                f"{'4' if existing.get('load_in_4bit') else '8' if existing.get('load_in_8bit') else '?'}-bit); "
                "velotune's load_in_4bit loads bitsandbytes 4-bit checkpoints or quantises 16-bit ones"
            )
        if existing.get("bnb_4bit_quant_type", "nf4") != "nf4":
            raise ModelLoadError(
                f"4-bit checkpoint uses {existing.get('bnb_4bit_quant_type')!r}; velotune trains NF4 checkpoints"
            )
        qc = config.quantization_config
        name = _DTYPE_NAMES[compute_dtype]
        if isinstance(qc, dict):
            qc["bnb_4bit_compute_dtype"] = name
        else:
            qc.bnb_4bit_compute_dtype = compute_dtype
        return kwargs
    from transformers import BitsAndBytesConfig

    kwargs["quantization_config"] = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=torch.uint8,
    )
    return kwargs


def quantization_config_8bit(config) -> dict:
    """`from_pretrained` kwargs for load_in_8bit=True: bitsandbytes' LLM.int8() through transformers'
    `BitsAndBytesConfig(load_in_8bit=True)` (decoder linear layers in int8, `lm_head` kept).

    A bitsandbytes 8-bit checkpoint loads as saved (no new config); one quantised otherwise raises
    ModelLoadError. On CUDA the model is placed on the current device (`device_map`), which the
    caller may override. The 8-bit layers run bitsandbytes' own forward.
    """
    _require_bitsandbytes("load_in_8bit")
    kwargs: dict = {}
    if torch.cuda.is_available():
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    existing = _existing_quantization(config)
    if existing is not None:
        if existing.get("quant_method") != "bitsandbytes" or not existing.get("load_in_8bit"):
            raise ModelLoadError(
                f"this checkpoint is already quantised ({existing.get('quant_method')}, "
                f"{'4' if existing.get('load_in_4bit') else '8' if existing.get('load_in_8bit') else '?'}-bit); "
                "load_in_8bit loads bitsandbytes 8-bit checkpoints or quantises 16-bit ones"
            )
        return kwargs
    from transformers import BitsAndBytesConfig

    kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    return kwargs


def checkpoint_bits(config) -> int | None:
    """4 or 8 for a bitsandbytes-quantised checkpoint (config.quantization_config), else None."""
    existing = _existing_quantization(config)
    if not existing or existing.get("quant_method") != "bitsandbytes":
        return None
    return 4 if existing.get("load_in_4bit") else 8 if existing.get("load_in_8bit") else None
