"""Fixtures of the fault-injection tests (helpers live in cli_harness.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from cli_harness import _can_mount, train_config


@pytest.fixture
def small_tmpfs(tmp_path):
    """mount(size_bytes) -> a folder on a tmpfs of that size (root only; skipped elsewhere)."""
    mounts = []

    def mount(size: int, name: str = "disk", options: str = "") -> Path:
        if not _can_mount():
            pytest.skip("mounting a small tmpfs needs root (CAP_SYS_ADMIN)")
        point = tmp_path / name
        point.mkdir()
        rc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}{options}", "tmpfs", str(point)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if rc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {rc.stderr.strip()}")
        mounts.append(point)
        return point

    yield mount
    for point in reversed(mounts):
        subprocess.run(["umount", "-l", str(point)], capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A finished tiny LoRA run (r=4, 2 steps, a checkpoint each step) made in this process; copy it
    before changing it."""
    from velotune.train.config import load_config
    from velotune.train.runner import run_training

    folder = tmp_path_factory.mktemp("trained")
    out = folder / "run"
    run_training(load_config(train_config(folder, out, save_steps=1)), progress=False)
    return out
