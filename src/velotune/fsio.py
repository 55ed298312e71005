"""File-system helpers every writer shares: temp names that name their process, the user's umask,
writability checks, stale-temp cleanup and an atomic exchange of two folders.

    tmp = make_temp_dir(parent, "merged")          # parent/.merged.tmp-<pid>-XXXX, mode 0777 & ~umask
    remove_stale_temps(parent)                     # temps of processes that no longer run (kill -9)
    check_writable_folder(path, "output_dir")      # OutputError before any work, not at the first save
    exchange_dirs(a, b)                            # a <-> b in one step (renameat2) where the OS can

Temp names carry the creating process id (`.NAME.tmp-<pid>-...`, `.NAME.old-<pid>`, `.save-<pid>-...`),
so a later run can tell a killed run's leftovers from a live run's work in progress.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import tempfile
from pathlib import Path

from velotune.errors import OutputError, describe_os_error

# A temp entry: hidden, with a pid after one of the markers velotune's writers use.
TEMP_NAME = re.compile(r"^\.(?:.*\.)?(?:tmp|old|save|intermediate|merge16)-(\d+)(?:[-.]|$)")


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (else set and restored)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: str | os.PathLike, is_dir: bool) -> None:
    """Give `path` the mode a plain open()/mkdir() would have (mkstemp/mkdtemp make 0600/0700)."""
    os.chmod(path, (0o777 if is_dir else 0o666) & ~current_umask())


def honour_umask_tree(folder: Path) -> None:
    """`honour_umask` for `folder` and everything under it (writers such as safetensors create 0600 files)."""
    mask = current_umask()
    os.chmod(folder, 0o777 & ~mask)
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~mask)
        for f in files:
            p = os.path.join(root, f)
            if not os.path.islink(p):
                os.chmod(p, 0o666 & ~mask)


def make_temp_dir(parent: Path, name: str, kind: str = "tmp") -> Path:
    """An empty folder `parent/.NAME.KIND-<pid>-XXXX` with the umask's mode."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.{kind}-{os.getpid()}-", dir=parent))
    honour_umask(tmp, True)
    return tmp


def make_temp_file(parent: Path, name: str) -> Path:
    """An empty file `parent/.NAME.tmp-<pid>-XXXX` with the umask's mode."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.tmp-{os.getpid()}-", dir=parent)
    os.close(fd)
    honour_umask(tmp, False)
    return Path(tmp)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(folder: Path) -> list[str]:
    """Delete velotune temp files/folders in `folder` whose process is gone; returns their names."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for p in entries:
        m = TEMP_NAME.match(p.name)
        if not m or _alive(int(m.group(1))):
            continue
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p.name)
        except OSError:
            pass
    return removed


def nearest_existing(path: Path) -> Path:
    for p in [path, *path.parents]:
        if p.exists():
            return p
    return Path("/")


def check_writable_folder(path: str | os.PathLike, what: str) -> None:
    """OutputError unless `path` is (or can be created as) a folder this process can write files in.
    Nothing is created: a temp file is written and removed in the nearest existing folder."""
    path = Path(path).expanduser().absolute()
    anc = nearest_existing(path)
    if not anc.is_dir():
        raise OutputError(f"{what}: {anc} is a file, not a folder; choose another path")
    try:
        fd, probe = tempfile.mkstemp(prefix=".velotune-write-test-", dir=anc)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(
            f"{what}: cannot write in {anc} ({describe_os_error(e)}); choose a writable folder or fix its permissions"
        ) from e


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(nearest_existing(Path(path).absolute())).free


# Writers that report a short write without an errno: numpy's tofile ("N requested and M written"),
# torch.save ("file write failed"). They count as a full disk when the disk is (nearly) full.
SHORT_WRITE = re.compile(r"requested and \d+ written|file write failed|failed writing file")
NEARLY_FULL = 64 * 2**20


def is_disk_full_at(e: BaseException, folder: Path) -> bool:
    """`errors.is_disk_full(e)`, or a short write without errno while `folder`'s disk is nearly full."""
    from velotune.errors import is_disk_full

    if is_disk_full(e):
        return True
    try:
        return bool(SHORT_WRITE.search(str(e))) and free_bytes(folder) < NEARLY_FULL
    except OSError:
        return False


_RENAME_EXCHANGE = 2


def exchange_dirs(a: Path, b: Path) -> bool:
    """Swap the names of two folders in one atomic step (Linux renameat2 RENAME_EXCHANGE).
    Returns False where the OS or file system cannot (the caller then renames twice)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    rc = fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a))
