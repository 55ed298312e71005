"""The embedded default: a small model and an instruction data set that ship inside the package.

    velotune demo                      # fine-tune the shipped model on the shipped data, on CPU or GPU

`assets_dir()` is a transformers model folder (Llama architecture, ~2.7M parameters, safetensors,
byte-level BPE tokenizer with a chat template), pretrained by scripts/build_demo_model.py on plain
sentences about a small world of facts. `dataset_path()` is the training data (messages JSONL,
scripts/build_demo_data.py); `heldout_path()` holds questions about facts that the training data
never asks about, which the demo uses to show what fine-tuning changed.
"""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent


def assets_dir() -> Path:
    """Folder of the shipped model: config.json, model.safetensors, tokenizer files."""
    return _HERE / "assets"


def dataset_path() -> Path:
    """The shipped instruction data: one `{"messages": [...]}` conversation per line."""
    return _HERE / "data" / "train.jsonl"


def heldout_path() -> Path:
    """Held-out questions (messages plus `target`, the word a correct answer contains)."""
    return _HERE / "data" / "heldout.jsonl"
