"""Check safetensors files without loading them: header parsed, every tensor's bytes inside the file.

    check_weight_files(folder)            # ModelLoadError naming the file and what to do, or None
    tensor_names(folder)                  # {tensor name: file name} over all shards

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON
({name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}), then the data;
the file must be exactly 8 + N + max(end) bytes long. A truncated download, an empty file or a
file of other bytes fails one of these checks (what safetensors itself would report as a
SafetensorError deep inside transformers, or not at all until a tensor is read).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from velotune.errors import ModelLoadError

MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header


def read_header(path: Path) -> dict:
    """The parsed header of one safetensors file (ModelLoadError if it is torn or not safetensors)."""
    what = "re-download or re-export the model (the file is truncated, empty or not safetensors)"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            (n,) = struct.unpack("<Q", head) if len(head) == 8 else (None,)
            raw = f.read(n) if n is not None and n <= MAX_HEADER and 8 + n <= size else None
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read it ({e.strerror or e}); check the file's permissions") from None
    if n is None:
        raise ModelLoadError(f"{path}: {size} bytes, too short for a safetensors header; {what}")
    if raw is None:
        raise ModelLoadError(f"{path}: bad safetensors header length ({n} for a {size}-byte file); {what}")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise ModelLoadError(f"{path}: the safetensors header is not valid JSON; {what}") from None
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path}: the safetensors header is not a JSON object; {what}")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise ModelLoadError(f"{path}: tensor {name!r} has no valid data_offsets in the header; {what}")
        end = max(end, offsets[1])
    if 8 + n + end != size:
        raise ModelLoadError(f"{path}: the header describes {8 + n + end} bytes but the file has {size}; {what}")
    return header


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a model folder: the shards its index names, else every *.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
            raise ModelLoadError(
                f"{index} is not a valid safetensors index (no weight_map); re-download or re-export the model"
            ) from None
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise ModelLoadError(
                f"{folder}: shard(s) {', '.join(missing)} named in {index.name} are missing; "
                "re-download the model (all shards)"
            )
        return [folder / s for s in shards]
    return sorted(p for p in folder.glob("*.safetensors") if p.is_file())


def check_weight_files(folder: Path, names: list[str] | None = None) -> None:
    """Parse every weight file's header (`names`: only these files of `folder`)."""
    for path in [folder / n for n in names] if names else weight_files(folder):
        read_header(path)


def tensor_names(folder: Path) -> dict[str, str]:
    """{tensor name: file name} over the folder's weight files (headers only)."""
    names: dict[str, str] = {}
    for path in weight_files(folder):
        names.update({k: path.name for k in read_header(path) if k != "__metadata__"})
    return names


def missing_weights(folder: Path, config) -> list[str]:
    """Weights the model built from `config` needs that no file of `folder` holds (tied weights count
    as present when any of their names is stored). Empty when the files use another naming scheme:
    fewer than half the names match, or the files hold tensors under names the model does not have
    (transformers renames those at load: GPT-NeoX's `embed_out`, Mixtral's per-expert
    `block_sparse_moe.experts.N.w1`, ...); its conversion then decides, and the loader checks what it
    reports missing after loading."""
    import torch
    from transformers import AutoModelForCausalLM

    stored = tensor_names(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    groups: dict[int, list[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(t), []).append(name)
    names = [n for g in groups.values() for n in g]
    if sum(n in stored for n in names) * 2 < len(names) or not set(stored) <= set(names):
        return []
    return sorted(g[0] for g in groups.values() if not any(n in stored for n in g))
