"""`model.save_pretrained_merged(dir, tokenizer, save_method=...)`.

"lora"          the adapters only, in PEFT's own format (adapter_config.json + adapter_model.safetensors)
"merged_16bit"  LoRA folded into the base weights (fp32 math), saved in the model's dtype
                (bf16/fp16 for 16-bit models; an fp32 model stays fp32) as sharded safetensors
"merged_4bit"   the merged model re-quantised to bitsandbytes NF4 (for transformers/vLLM 4-bit
                inference; not a format to fine-tune further from). "merged_4bit_forced", the name
                Unsloth asks for, is the same method.

Any mix of LoRA and plain layers merges: a layer without LoRA (4-bit or not) is saved as its base
weight (4-bit: dequantised). A model with no adapters at all (no LoRA, no modules_to_save) is
saved that way too, with a warning (nothing was merged), as Unsloth does.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import torch

from velotune.errors import ConfigError
from velotune.export.atomic import ExportError, atomic_dir
from velotune.export.merge import base_model_of, has_adapters, is_peft_model, iter_merged_tensors
from velotune.export.safetensors_io import parse_size, write_model_folder

log = logging.getLogger("velotune")

ALIASES = {"merged_4bit_forced": "merged_4bit"}  # Unsloth's spelling -> velotune's method
SAVE_METHODS = {
    "lora": "adapters only (small; load with peft on top of the same base model)",
    "merged_16bit": "LoRA merged into the base weights, 16-bit safetensors (transformers, vLLM, TGI)",
    "merged_4bit": "merged, then re-quantised to bitsandbytes NF4 (4-bit inference only)",
}


def export_dtype(model, dtype: torch.dtype | str | None = None) -> torch.dtype:
    """The dtype merged weights are saved in: explicit, else the model's compute/weight dtype."""
    if isinstance(dtype, str):
        dtype = {
            "float32": torch.float32,
            "fp32": torch.float32,
            "float16": torch.float16,
            "fp16": torch.float16,
            "bfloat16": torch.bfloat16,
            "bf16": torch.bfloat16,
        }.get(dtype)
        if dtype is None:
            raise ConfigError("dtype must be one of float32, float16, bfloat16")
    if dtype is not None:
        return dtype
    base = base_model_of(model)
    compute = getattr(base, "velotune_compute_dtype", None) or getattr(model, "velotune_compute_dtype", None)
    if getattr(base, "is_loaded_in_4bit", False) and compute is None:
        compute = getattr(getattr(base.config, "quantization_config", None), "bnb_4bit_compute_dtype", None)
    if compute is not None and compute.is_floating_point:
        return compute
    for p in base.parameters():
        if p.is_floating_point() and p.dtype in (torch.float32, torch.float16, torch.bfloat16):
            return p.dtype
    return torch.float16


def save_pretrained_merged(
    model,
    save_directory: str | os.PathLike,
    tokenizer=None,
    save_method: str = "merged_16bit",
    *,
    dtype: torch.dtype | str | None = None,
    max_shard_size: int | str = "5GB",
    quiet: bool = False,
) -> Path:
    """Save adapters or the merged model to `save_directory` (atomically) and return its path."""
    save_method = ALIASES.get(save_method, save_method)
    if save_method not in SAVE_METHODS:
        raise ConfigError(f"save_method={save_method!r}: choose one of {', '.join(SAVE_METHODS)}")
    max_shard_size = parse_size(max_shard_size)  # a bad size is refused before any work
    if tokenizer is None:
        log.warning("save_pretrained_merged: no tokenizer given; the folder will have no tokenizer files")
    target = Path(save_directory)
    with atomic_dir(target) as tmp:
        if save_method == "lora":
            if not is_peft_model(model):
                raise ExportError(
                    "save_method='lora' needs a PEFT model (FastLanguageModel.get_peft_model); "
                    "this model has no adapters: use 'merged_16bit'"
                )
            model.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        else:
            if not has_adapters(model):
                log.warning(
                    "save_pretrained_merged: the model has no LoRA adapters (nor modules_to_save), so there "
                    "is nothing to merge; saving the base model as %s",
                    save_method,
                )
            write = _write_merged if save_method == "merged_16bit" else _write_merged_4bit
            write(model, tmp, tokenizer, export_dtype(model, dtype), max_shard_size, quiet)
    if not quiet:
        size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
        print(f"velotune: saved {save_method} to {target} ({size / 2**20:.1f} MiB)")
    return target


def _write_merged(model, folder: Path, tokenizer, dtype, max_shard_size, quiet: bool) -> None:
    from tqdm.auto import tqdm

    base = base_model_of(model)
    with torch.no_grad():
        tensors = tqdm(iter_merged_tensors(model, dtype), desc="merging", unit="tensor", disable=quiet, leave=False)
        write_model_folder(base, tensors, folder, dtype, tokenizer, max_shard_size)


def _write_merged_4bit(model, folder: Path, tokenizer, dtype, max_shard_size, quiet: bool) -> None:
    """Merge to a 16-bit folder, reload it through transformers' bitsandbytes NF4 path, save that."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if dtype == torch.float32:
        dtype = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float16
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".merge16-{os.getpid()}-") as tmp16:
        _write_merged(model, Path(tmp16), None, dtype, max_shard_size, quiet)
        q = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
        m4 = AutoModelForCausalLM.from_pretrained(
            tmp16, quantization_config=q, dtype=dtype, device_map="cuda" if torch.cuda.is_available() else "cpu"
        )
        m4.generation_config = base_model_of(model).generation_config
        m4.save_pretrained(folder, max_shard_size=max_shard_size)
        del m4
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
