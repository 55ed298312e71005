"""Write a transformers model folder: sharded safetensors + index, clean config, generation config.

Shards are written as they fill (at most one shard of tensors is held in memory besides the
model), then renamed to transformers' `model-0000i-of-0000N.safetensors` scheme once N is known.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Iterable

import torch

from velotune.errors import ConfigError

# Config attributes that describe how the *training* model was stored, not the exported one.
_TRAINING_LEFTOVERS = ("quantization_config", "_pre_quantization_dtype", "pretraining_tp")


_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(GIB|MIB|KIB|GB|MB|KB|B)?")
_UNITS = {"GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1, None: 1}
SIZE_FORMS = "a number of bytes or a number with KB, MB, GB, KiB, MiB or GiB (e.g. 5GB, 500MB, 2GiB)"


def parse_size(size: int | str) -> int:
    """'5GB' / '500MB' / '2GiB' / '1.5GB' / 1234 -> bytes (> 0); anything else is a ConfigError listing the forms."""
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise ConfigError(f"max_shard_size {size!r}: use {SIZE_FORMS}")
    if isinstance(size, int):
        value = size
    else:
        m = _SIZE.fullmatch(size.strip().upper())
        if m is None:
            raise ConfigError(f"max_shard_size {size!r} is not a size: use {SIZE_FORMS}")
        value = int(float(m.group(1)) * _UNITS[m.group(2)])
    if value <= 0:
        raise ConfigError(f"max_shard_size {size!r} must be more than 0 bytes: use {SIZE_FORMS}")
    return value


def write_safetensors(
    tensors: Iterable[tuple[str, torch.Tensor]], folder: Path, max_shard_size: int | str = "5GB"
) -> list[Path]:
    """Write `tensors` as one `model.safetensors` or N shards + `model.safetensors.index.json`."""
    from safetensors.torch import save_file

    limit = parse_size(max_shard_size)
    shards: list[list[str]] = []
    current: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush():
        nonlocal current, size
        if current:
            save_file(current, str(folder / f"shard-{len(shards):05d}.tmp"), metadata={"format": "pt"})
            shards.append(list(current))
            current, size = {}, 0

    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > limit:
            flush()
        current[name] = t
        size += nbytes
        total += nbytes
    flush()
    if len(shards) == 1:
        final = [folder / "model.safetensors"]
        (folder / "shard-00000.tmp").rename(final[0])
        return final
    n = len(shards)
    final, weight_map = [], {}
    for i, names in enumerate(shards):
        path = folder / f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        (folder / f"shard-{i:05d}.tmp").rename(path)
        final.append(path)
        weight_map.update({k: path.name for k in names})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return final


def clean_config(config, dtype: torch.dtype):
    """A copy of `config` describing a plain (unquantised, merged) model stored in `dtype`."""
    cfg = copy.deepcopy(config)
    for attr in _TRAINING_LEFTOVERS:
        if attr in cfg.__dict__:
            delattr(cfg, attr)
    cfg.dtype = dtype
    cfg.use_cache = True
    return cfg


def write_model_folder(
    model_base,
    tensors: Iterable[tuple[str, torch.Tensor]],
    folder: Path,
    dtype: torch.dtype,
    tokenizer=None,
    max_shard_size: int | str = "5GB",
) -> list[Path]:
    """Weights + config.json + generation_config.json + tokenizer files into `folder`."""
    files = write_safetensors(tensors, folder, max_shard_size)
    clean_config(model_base.config, dtype).save_pretrained(folder)
    gen = getattr(model_base, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return files
