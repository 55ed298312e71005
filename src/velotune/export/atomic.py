"""Atomic output folders: write everything into a temporary folder beside the target, then rename.

    with atomic_dir("out/merged") as tmp:
        write_files(tmp)          # any exception here leaves "out/merged" exactly as it was

The temporary folder lives in the same parent folder as the target, so the final `os.rename` never
crosses a file system. An existing target is first renamed aside (`.NAME.old-PID`), the new folder
renamed into place, and only then the old one deleted: at no point is a half-written folder at the
target path, and a failure before the swap leaves the previous output untouched.
"""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from velotune.errors import VelotuneError


class ExportError(VelotuneError, OSError):
    """An export that could not be written (disk full, unsupported model, bad method)."""


def _describe(e: OSError) -> str:
    if e.errno == errno.ENOSPC:
        return "the disk is full (ENOSPC)"
    if e.errno == errno.EACCES:
        return "permission denied"
    return f"{type(e).__name__}: {e}"


@contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder that replaces `target` when the block succeeds."""
    target = Path(target).expanduser().resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not target.is_dir():
        raise ExportError(f"{target} exists and is not a folder; choose another output path")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = "the previous output there is intact" if target.exists() else "nothing was written there"
        raise ExportError(f"saving to {target} failed: {_describe(e)}; {previous} "
                          f"(partial files were removed)") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _swap_into_place(tmp, target)


def _swap_into_place(tmp: Path, target: Path) -> None:
    if not target.exists():
        os.rename(tmp, target)
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
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        state = "the previous file is intact" if path.exists() else "no file was written"
        raise ExportError(f"writing {path} failed: {_describe(e)}; {state} (the partial file was removed)") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
