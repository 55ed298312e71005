"""One training run per output folder: an OS lock on `<output_dir>/.velotune.lock`.

    with RunLock(out):            # OutputError at once if another process holds it
        train_and_save()

The lock is `fcntl.flock` on an open file: the kernel drops it when the process ends however it ends
(kill -9 included), so a killed run never leaves a stale lock; the file stays (deleting it would let
two processes lock two different files of one name). It holds the owner's pid for the message.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from velotune.errors import OutputError, describe_os_error

LOCK_NAME = ".velotune.lock"


class RunLock:
    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise OutputError(
                f"output_dir: cannot create {self.path} ({describe_os_error(e)}); choose a writable output folder"
            ) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            who = f" (pid {owner})" if owner.isdigit() else ""
            raise OutputError(
                f"output_dir {self.folder} is in use by another velotune train run{who}: wait for it "
                "to finish, or choose another output_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
