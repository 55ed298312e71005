"""Helpers for the fault-injection tests: the `velotune` CLI in a subprocess, the one-line error check,
tiny training configs on the shipped mini model, small tmpfs mounts (a real ENOSPC), and kill -9 loops."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))  # `from mini import ...`
ASSETS = ROOT / "src" / "velotune" / "demo" / "assets"
DEMO_DATA = ROOT / "src" / "velotune" / "demo" / "data" / "train.jsonl"


def cli_env() -> dict:
    src = str(ROOT / "src")
    path = os.environ.get("PYTHONPATH", "")
    return dict(
        os.environ,
        PYTHONPATH=src + (os.pathsep + path if path else ""),
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )


def velotune(*args, input: str | None = None, timeout: int = 300, **kw) -> subprocess.CompletedProcess:
    """`velotune ARGS...` in a subprocess (this checkout's sources)."""
    return subprocess.run(
        [sys.executable, "-m", "velotune.cli", *map(str, args)],
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=timeout,
        **kw,
    )


def assert_one_line(proc, *fragments: str, command: str | None = None) -> str:
    """Exit code 2, no traceback, the last stderr line is `velotune CMD: error: ...` holding `fragments`."""
    err = proc.stderr
    assert proc.returncode == 2, (proc.returncode, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"velotune {command}: error: " if command else "velotune "), line
    assert ": error: " in line
    for f in fragments:
        assert f in line, (f, line)
    return line


def data_slice(folder: Path, rows: int = 8) -> Path:
    path = folder / "data.jsonl"
    path.write_text("\n".join(DEMO_DATA.read_text(encoding="utf-8").splitlines()[:rows]) + "\n", encoding="utf-8")
    return path


def train_config(folder: Path, out: Path, model: Path = ASSETS, **training) -> Path:
    """A YAML config for a tiny LoRA run on the mini model (2 steps, CPU)."""
    import yaml

    data = data_slice(folder)
    cfg = {
        "model": {"name": str(model), "dtype": "float32", "max_seq_length": 64},
        "data": {"path": str(data)},
        "lora": {"r": 4, "alpha": 8, "gradient_checkpointing": False},
        "training": {
            "max_steps": 2,
            "batch_size": 2,
            "gradient_accumulation_steps": 1,
            "use_cpu": True,
            "logging_steps": 1,
            "seed": 0,
            **training,
        },
        "output_dir": str(out),
    }
    path = folder / f"config-{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def snapshot(folder: Path, hidden: bool = False) -> dict[str, bytes]:
    """{relative path: bytes} of the files under `folder` (hidden entries left out unless `hidden`)."""
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and (hidden or not any(part.startswith(".") for part in p.relative_to(folder).parts))
    }


def hidden_entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) if folder.exists() else []


# -- a real full disk: a small tmpfs ------------------------------------------------------------------------


def _can_mount() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("mount") is not None


# -- kill -9 at random moments -------------------------------------------------------------------------------


def _own_tqdm_lock() -> None:
    """A fresh progress-bar lock for tqdm and every subclass holding one (transformers', hub's, ...)."""
    import threading

    from tqdm.std import tqdm

    lock = threading.RLock()
    classes = [tqdm]
    while classes:
        cls = classes.pop()
        if cls is tqdm or "_lock" in vars(cls):
            cls._lock = lock
        classes += cls.__subclasses__()


def fork_run(action) -> int:
    pid = os.fork()
    if pid == 0:  # the child: do the work, never return into pytest
        code = 0
        try:
            # tqdm's write lock holds a multiprocessing semaphore that a forked child shares with pytest
            # (and a thread lock a parent thread may have held at the fork): a child SIGKILLed inside a
            # progress bar's lock (even a disabled bar takes it) would leave it held and hang pytest at
            # its next progress bar. The child gets a lock of its own.
            _own_tqdm_lock()
            action()
        except BaseException:  # noqa: BLE001
            import traceback

            traceback.print_exc()
            code = 1
        os._exit(code)
    return pid


def _state(pid: int) -> str:
    """The kernel's view of a process: its state letter and where it sleeps (/proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        wchan = Path(f"/proc/{pid}/wchan").read_text().strip() or "-"
    except OSError as e:
        return f"no /proc entry: {e}"
    return f"state {stat}, waiting in {wchan}"


def _exit_status(proc: "subprocess.Popen | int", within: float) -> int | None:
    """The wait status of a child (a Popen's returncode) once it has ended, polled for `within` seconds;
    None if it is still running then."""
    end = time.monotonic() + within
    while time.monotonic() < end:
        if isinstance(proc, int):
            done, status = os.waitpid(proc, os.WNOHANG)
            if done:
                return status
        elif proc.poll() is not None:
            return proc.returncode
        time.sleep(0.002)
    return None


def kill_and_reap(proc: "subprocess.Popen | int", within: float = 120) -> int:
    """SIGKILL a process of this test (a Popen or a forked pid) and reap it within `within` seconds;
    returns its wait status (a Popen's returncode). Fails with the process's kernel state otherwise."""
    pid = proc if isinstance(proc, int) else proc.pid
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    status = _exit_status(proc, within)
    if status is None:
        raise AssertionError(f"pid {pid} was still there {within:.0f} s after SIGKILL ({_state(pid)})")
    return status


def _wait(pid: int, timeout: float = 60) -> int:
    status = _exit_status(pid, timeout)
    if status is None:
        kill_and_reap(pid)
        raise AssertionError("the forked save did not finish")
    return status


def kill_loop(action, check, kills: int, seed: int, restore=None) -> dict:
    """Run `action` in a forked process `kills` times, SIGKILL it at a random moment of its run, then
    `check()`. The delays spread over [0, the time an uninterrupted run takes]. `restore()` runs
    after each check (e.g. put the previous output back when the save had completed). Returns counts."""
    import torch

    torch.set_num_threads(1)  # no OpenMP pool in the forked children
    durations = []
    for _ in range(2):  # the second, warm run sets the window (the first one pays for lazy imports)
        start = time.monotonic()
        assert os.waitstatus_to_exitcode(_wait(fork_run(action))) == 0, "the uninterrupted save failed"
        durations.append(time.monotonic() - start)
        check()
        if restore:
            restore()
    duration = min(durations)
    rng = random.Random(seed)
    killed = finished = 0
    for _ in range(kills):
        pid = fork_run(action)
        time.sleep(rng.uniform(0, duration))
        status = kill_and_reap(pid)
        if os.WIFSIGNALED(status):
            killed += 1
        else:
            finished += 1
        check()
        if restore:
            restore()
    return {"killed": killed, "finished": finished, "seconds": duration}


def read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def copy_run(run: Path, dst: Path) -> Path:
    shutil.copytree(run, dst, symlinks=True)
    return dst
