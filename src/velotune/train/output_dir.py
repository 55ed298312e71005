"""The output folder of a training run: claimed by one run, never mixed with another's, and its final
save committed in one step.

    claim(out, resume=..., overwrite=...)   # OutputError for another run's folder (unless overwrite)
    commit_final(out, write)                 # write(stage) fills a new folder; one exchange makes it `out`

A folder belongs to this run when it is empty (velotune's lock file and temp leftovers aside) or the
run resumes from a checkpoint in it. Another run's folder is refused; `overwrite=True` moves it aside
to `<out>.old-<time>` first (never deleted, never mixed).

The final save (adapter or full model, tokenizer, loss curve, summary) is written into a stage folder
beside `out`; everything else already in `out` (checkpoints, logs, the lock file) is hard-linked into
the stage (copied where links are not allowed), and the stage and `out` swap names in one atomic
`renameat2(RENAME_EXCHANGE)` (two renames where the OS has no exchange). A kill at any point leaves
`out` as it was before the save or as it is after it, never a mix of the two; a killed save's stage is
a hidden `.NAME.save-<pid>-...` folder that the next run removes.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Callable

from velotune.errors import OutputError, describe_os_error
from velotune.fsio import TEMP_NAME, exchange_dirs, honour_umask_tree, make_temp_dir, remove_stale_temps
from velotune.train.run_lock import LOCK_NAME


def resumes_here(out: Path, resume) -> bool:
    """Whether a run resuming from `resume` (True: output_dir's newest checkpoint, or a checkpoint path)
    continues the run in `out`: a checkpoint of another folder does not make `out` this run's own."""
    if resume is True:
        return True
    if not resume:
        return False
    try:
        return Path(resume).resolve().is_relative_to(out.resolve())
    except OSError:
        return False


def foreign_entries(out: Path) -> list[str]:
    """Names in `out` besides velotune's lock file and temp leftovers."""
    if not out.is_dir():
        return []
    return sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME and not TEMP_NAME.match(p.name))


def moved_aside_name(out: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target, n = out.with_name(f"{out.name}.old-{stamp}"), 1
    while target.exists():
        n += 1
        target = out.with_name(f"{out.name}.old-{stamp}-{n}")
    return target


def _refuse_foreign(out: Path, entries: list[str]) -> None:
    shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
    raise OutputError(
        f"output_dir {out} already holds another run ({shown}): choose another output_dir, "
        "pass --resume to continue that run, or --overwrite to move it aside to "
        f"{out.name}.old-<time>"
    )


def check_early(out: Path, *, resuming: bool, overwrite: bool) -> None:
    """The output-folder refusals without changing anything (writable, not another run's, not locked):
    `velotune train` calls this before it imports torch, so a refusal comes in a second."""
    from velotune.fsio import check_writable_folder
    from velotune.train.run_lock import RunLock

    check_writable_folder(out, f"output_dir {out}")
    entries = foreign_entries(out)
    if entries and not resuming and not overwrite:
        _refuse_foreign(out, entries)
    if (out / LOCK_NAME).exists():
        RunLock(out).acquire().release()


def claim(out: Path, *, resuming: bool, overwrite: bool) -> Path | None:
    """Check that `out` may receive this run; with `overwrite`, move another run's folder aside.
    Returns where it was moved (or None)."""
    remove_stale_temps(out.parent)
    remove_stale_temps(out)
    entries = foreign_entries(out)
    if not entries or resuming:
        return None
    if not overwrite:
        _refuse_foreign(out, entries)
    aside = moved_aside_name(out)
    try:
        os.rename(out, aside)
    except OSError as e:
        raise OutputError(f"--overwrite: moving {out} aside to {aside.name} failed ({describe_os_error(e)})") from e
    print(f"velotune: --overwrite: the previous run in {out} was moved to {aside}", flush=True)
    return aside


def _link_tree(src: Path, dst: Path, skip: set[str]) -> None:
    """Hard-link (else copy) every entry of `src` not named in `skip` into `dst` (recursively)."""
    for p in src.iterdir():
        if p.name in skip or TEMP_NAME.match(p.name):
            continue
        q = dst / p.name
        if p.is_dir() and not p.is_symlink():
            q.mkdir()
            shutil.copystat(p, q)
            _link_tree(p, q, set())
        elif p.is_symlink():
            os.symlink(os.readlink(p), q)
        else:
            try:
                os.link(p, q)
            except OSError:
                shutil.copy2(p, q)


def commit_final(out: Path, write: Callable[[Path], None]) -> Path:
    """Run `write(stage)` into a fresh stage folder, carry `out`'s other entries over, swap it into place."""
    out = out.absolute()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(out.parent)
        stage = make_temp_dir(out.parent, out.name, "save")
    except OSError as e:
        raise OutputError(f"output_dir: cannot write in {out.parent} ({describe_os_error(e)})") from e
    try:
        write(stage)
        honour_umask_tree(stage)
        if out.is_dir():
            _link_tree(out, stage, {p.name for p in stage.iterdir()})
            if exchange_dirs(stage, out):
                shutil.rmtree(stage, ignore_errors=True)  # the previous `out` now
                return out
            old = make_temp_dir(out.parent, out.name, "old")
            os.rmdir(old)
            os.rename(out, old)
            os.rename(stage, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return out
