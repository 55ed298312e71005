"""Device and dtype choices, stated once."""

from __future__ import annotations

import torch


def is_bfloat16_supported() -> bool:
    """True on a CUDA device that computes in bf16 natively (Ampere or newer)."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def default_dtype() -> torch.dtype:
    """`dtype=None` means: bf16 where supported, fp16 on older GPUs, float32 on CPU."""
    if not torch.cuda.is_available():
        return torch.float32
    return torch.bfloat16 if is_bfloat16_supported() else torch.float16


def resolve_dtype(dtype) -> torch.dtype:
    """Accept None, a torch.dtype or its name ("bfloat16", "bf16", "float32", ...)."""
    if dtype is None or dtype == "auto":
        return default_dtype()
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp16": torch.float16,
        "float16": torch.float16,
        "half": torch.float16,
        "fp32": torch.float32,
        "float32": torch.float32,
        "float": torch.float32,
    }
    try:
        return names[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(names)} or a torch.dtype") from None
