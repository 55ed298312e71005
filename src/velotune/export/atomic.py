"""Atomic output folders: write everything into a temporary folder beside the target, then rename.

    with atomic_dir("out/merged") as tmp:
        write_files(tmp)          # any exception here leaves "out/merged" exactly as it was

The temporary folder (`.NAME.tmp-<pid>-XXXX`, mode 0777 minus the umask) lives in the same parent
folder as the target, so the final `os.rename` never crosses a file system; leftovers of killed
exports (their process gone) are removed when the next export starts there. An existing target is
first renamed aside (`.NAME.old-PID`), the new folder
renamed into place, and only then the old one deleted: at no point is a half-written folder at the
target path, and a failure before the swap leaves the previous output untouched.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from velotune.errors import OutputError, describe_os_error, is_disk_full
from velotune.fsio import (
    SHORT_WRITE,
    exchange_dirs,
    honour_umask,
    honour_umask_tree,
    is_disk_full_at,
    make_temp_dir,
    make_temp_file,
    remove_stale_temps,
)


class ExportError(OutputError):
    """An export that could not be written (disk full, unsupported model, bad method)."""


_describe = describe_os_error


def is_write_failure(e: BaseException) -> bool:
    """An OSError, or a writer's wrapped one (safetensors' SafetensorError, torch.save's RuntimeError)."""
    from safetensors import SafetensorError

    return (
        isinstance(e, (OSError, SafetensorError))
        or is_disk_full(e)
        or (isinstance(e, RuntimeError) and bool(SHORT_WRITE.search(str(e))))
    )


@contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder that replaces `target` when the block succeeds."""
    target = Path(target).expanduser().resolve()
    if target.exists() and not target.is_dir():
        raise ExportError(f"{target} exists and is not a folder; choose another output path")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(target.parent)
        tmp = make_temp_dir(target.parent, target.name)
    except OSError as e:
        raise ExportError(f"cannot write in {target.parent}: {_describe(e)}; choose a writable output folder") from e
    try:
        yield tmp
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OutputError) or not is_write_failure(e):
            raise
        previous = "the previous output there is intact" if target.exists() else "nothing was written there"
        why = _describe(e, is_disk_full_at(e, target.parent))
        raise ExportError(f"saving to {target} failed: {why}; {previous} (partial files were removed)") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        honour_umask_tree(tmp)
        _swap_into_place(tmp, target)
    except OSError as e:
        raise ExportError(
            f"moving the new output into {target} failed: {_describe(e)}; the previous output there is intact"
        ) from e


def _swap_into_place(tmp: Path, target: Path) -> None:
    """tmp becomes target; the previous target (if any) is deleted. One atomic exchange where the OS
    has one (renameat2), else two renames with the old output kept aside until the new one is in place."""
    if not target.exists():
        os.rename(tmp, target)
        return
    if exchange_dirs(tmp, target):
        shutil.rmtree(tmp, ignore_errors=True)  # now the previous output
        return
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except OSError:
        os.rename(old, target)  # put the previous output back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """A temporary file beside `path`, renamed onto it when the block succeeds."""
    tmp = make_temp_file(path.parent, path.name)
    try:
        yield tmp
        honour_umask(tmp, False)
        os.replace(tmp, path)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OutputError) or not is_write_failure(e):
            raise
        state = "the previous file is intact" if path.exists() else "no file was written"
        raise ExportError(
            f"writing {path} failed: {_describe(e, is_disk_full_at(e, path.parent))}; {state} "
            "(the partial file was removed)"
        ) from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
