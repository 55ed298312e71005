"""Whole-or-nothing training checkpoints.

transformers' `Trainer._save_checkpoint` writes `checkpoint-N/` in place, file by file: a kill or a
full disk in the middle leaves a torn folder under the final name. Here the same method writes into a
hidden staging folder beside it (`<output_dir>/.checkpoint.tmp-<pid>/checkpoint-N`, a name
`velotune.fsio.TEMP_NAME` knows, so a killed run's leftover is removed as stale), and the finished
folder, its files given the user's umask modes (safetensors writes 0600), is renamed into place in one
step; then the oldest `checkpoint-*` folders beyond `save_total_limit` are removed (by step number).

Runs where transformers' own bookkeeping needs the final path while it writes keep the stock
in-place save (`save_in_place`): distributed runs (every rank writes its part), best-model tracking
(`load_best_model_at_end` / `metric_for_best_model`) and hub pushes from checkpoints.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from velotune.fsio import honour_umask_tree


def stages_atomically(trainer) -> bool:
    """Whether `save` below applies to this trainer's run (see the module docstring)."""
    a = trainer.args
    return (
        a.world_size <= 1
        and not a.load_best_model_at_end
        and a.metric_for_best_model is None
        and not a.push_to_hub
        and getattr(trainer, "hp_search_backend", None) is None
    )


def save(trainer, stock_save, model, trial) -> None:
    """`stock_save(model, trial)` (the trainer's own `_save_checkpoint`) into a staging folder, then
    renamed to `checkpoint-<global_step>`; older checkpoints rotated to `save_total_limit`."""
    run_dir = Path(trainer._get_output_dir(trial=trial))
    stage_root = run_dir / f".checkpoint.tmp-{os.getpid()}"
    shutil.rmtree(stage_root, ignore_errors=True)
    stage_root.mkdir(parents=True)
    trainer._get_output_dir = lambda trial=None: str(stage_root)  # this call only (instance attribute)
    try:
        stock_save(model, trial)
    finally:
        del trainer._get_output_dir
    name = f"checkpoint-{trainer.state.global_step}"
    final = run_dir / name
    if final.exists():  # the same step saved again (transformers overwrites in place)
        shutil.rmtree(final)
    honour_umask_tree(stage_root / name)
    os.replace(stage_root / name, final)
    shutil.rmtree(stage_root, ignore_errors=True)
    rotate(run_dir, trainer.args.save_total_limit)


def save_in_place(trainer, stock_save, model, trial) -> None:
    """transformers' own in-place save, then the umask modes on the new checkpoint (main process)."""
    stock_save(model, trial)
    final = Path(trainer._get_output_dir(trial=trial)) / f"checkpoint-{trainer.state.global_step}"
    if trainer.args.should_save and final.is_dir():
        honour_umask_tree(final)


def rotate(run_dir: Path, limit: int | None) -> list[Path]:
    """Remove the oldest `checkpoint-<N>` folders of `run_dir` beyond `limit` (by N); returns them."""
    if not limit:
        return []
    found = sorted(
        (int(p.name.split("-", 1)[1]), p)
        for p in run_dir.glob("checkpoint-*")
        if p.is_dir() and p.name.split("-", 1)[1].isdigit()
    )
    removed = [p for _, p in found[:-limit]]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed
