"""Errors users see. Each says what was wrong and what to do, in one line.

The CLI prints any `VelotuneError` as `velotune COMMAND: error: MESSAGE` and exits with code 2
(`velotune --traceback ...` shows the traceback as well); any other exception is an internal bug
and keeps its traceback. Library calls raise the same types with the same messages.

    ConfigError      a bad YAML key, CLI argument or option value
    DataError        a data set that cannot be used as given (rows, reasons)
    ModelLoadError   a model / adapter / checkpoint folder that cannot be loaded
    OutputError      an output folder that cannot be written: not writable, not a folder, another
                     run's folder, locked by another run, too little disk, disk full during a save
"""

from __future__ import annotations

import errno


class VelotuneError(Exception):
    """Base class: anything velotune raises on purpose."""


class ConfigError(VelotuneError, ValueError):
    """A bad YAML/CLI configuration (names the bad key)."""


class DataError(VelotuneError, ValueError):
    """A data set that cannot be used as given (names the rows and the reason)."""


class ModelLoadError(VelotuneError, OSError):
    """A model that cannot be loaded (missing folder, offline hub id, unsafe weights)."""


class OutputError(VelotuneError, OSError):
    """An output that cannot be written (permissions, not a folder, another run's, locked, disk full)."""


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc` (or an exception it was raised from) is a full disk / quota.

    Covers OSError(ENOSPC / EDQUOT) from Python writes and safetensors' SafetensorError (its Rust
    writer reports "No space left on device (os error 28)"). Short writes reported without an errno
    (numpy, torch.save) are judged with the disk's free space: `velotune.fsio.is_disk_full_at`.
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(exc)
        if any(
            m in text
            for m in (
                "No space left on device",
                "os error 28)",
                "code: 28,",
                "StorageFull",
                "Disk quota exceeded",
                "os error 122)",
            )
        ):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def describe_os_error(e: BaseException, disk_full: bool = False) -> str:
    """A short phrase for an OSError (or a write error wrapping one) in a one-line message;
    `disk_full`: the caller found the disk full (a short write without errno)."""
    if disk_full or is_disk_full(e):
        return "the disk is full (ENOSPC)"
    if isinstance(e, OSError):
        if e.errno in (errno.EACCES, errno.EPERM):
            return "permission denied"
        if e.errno == errno.EROFS:
            return "read-only file system"
        if e.errno == errno.ENOTDIR:
            return "a part of the path is a file, not a folder"
        return f"{e.strerror or type(e).__name__}"
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
