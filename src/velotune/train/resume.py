"""Which checkpoint `--resume` continues from: the newest COMPLETE `checkpoint-N` of an output folder.

transformers' Trainer writes a checkpoint in place: the weights, then optimizer.pt, scheduler.pt,
rng_state*.pth, and trainer_state.json last. A run killed (or out of disk) inside that sequence
leaves a torn folder under the final name. A checkpoint counts as complete when

    trainer_state.json parses and names a global_step,
    its weights (adapter_model.safetensors or model*.safetensors) have whole safetensors files,
    optimizer.pt, scheduler.pt and rng_state*.pth (those present) are whole zip archives
    (torch.save's format; a torn one lacks the end-of-archive record).

`newest_complete(out)` returns it and the torn ones newer than it; `resume_checkpoint` removes those
(a later save of the same step would otherwise write over their leftovers) with a line saying so.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import zipfile
from pathlib import Path

from velotune.errors import ModelLoadError

_CKPT = re.compile(r"^checkpoint-(\d+)$")
_TORCH_FILES = ("optimizer.pt", "scheduler.pt")


def checkpoints(out: Path) -> list[Path]:
    """checkpoint-N folders of `out`, oldest step first."""
    found = (
        [(int(m.group(1)), p) for p in out.iterdir() if p.is_dir() and (m := _CKPT.match(p.name))]
        if out.is_dir()
        else []
    )
    return [p for _, p in sorted(found)]


def why_incomplete(ckpt: Path) -> str | None:
    """None for a complete checkpoint, else what is torn or missing."""
    from velotune.safetensors_check import read_header, weight_files

    try:
        state = json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))
        if not isinstance(state.get("global_step"), int):
            return "trainer_state.json names no global_step"
    except (OSError, ValueError, UnicodeDecodeError, AttributeError):
        return "no readable trainer_state.json"
    weights = (
        [ckpt / "adapter_model.safetensors"]
        if (ckpt / "adapter_model.safetensors").exists()
        else weight_files(ckpt)
        if any(ckpt.glob("*.safetensors*"))
        else []
    )
    if not weights:
        return "no weights (adapter_model.safetensors / model.safetensors)"
    for w in weights:
        try:
            read_header(w)
        except ModelLoadError:
            return f"{w.name} is torn"
    for p in [*(ckpt / n for n in _TORCH_FILES if (ckpt / n).exists()), *ckpt.glob("rng_state*.pth")]:
        if not zipfile.is_zipfile(p):
            return f"{p.name} is torn"
    return None


def newest_complete(out: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(newest complete checkpoint or None, [(torn checkpoint newer than it, why)])."""
    torn: list[tuple[Path, str]] = []
    for ckpt in reversed(checkpoints(out)):
        why = why_incomplete(ckpt)
        if why is None:
            return ckpt, torn
        torn.append((ckpt, why))
    return None, torn


def remove_torn(torn: list[tuple[Path, str]], chosen: Path | None) -> None:
    for ckpt, why in torn:
        then = f"resuming from {chosen.name}" if chosen else "no complete checkpoint before it"
        print(
            f"velotune: {ckpt.name} is incomplete ({why}; its save was interrupted): removed, {then}",
            file=sys.stderr,
            flush=True,
        )
        shutil.rmtree(ckpt, ignore_errors=True)
