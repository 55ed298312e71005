"""Fixtures of the fault-injection tests (helpers live in cli_harness.py)."""
from __future__ import annotations

import pytest

from cli_harness import *  # noqa: F403 (helpers the fixtures use)
from cli_harness import _can_mount, _fork_run  # noqa: F401


@pytest.fixture
def small_tmpfs(tmp_path):
    """mount(size_bytes) -> a folder on a tmpfs of that size (root only; skipped elsewhere)."""
    mounts = []

    def mount(size: int, name: str = "disk", options: str = "") -> Path:
        if not _can_mount():
            pytest.skip("mounting a small tmpfs needs root (CAP_SYS_ADMIN)")
        point = tmp_path / name
        point.mkdir()
        rc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}{options}", "tmpfs", str(point)],
                            capture_output=True, text=True)
        if rc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {rc.stderr.strip()}")
        mounts.append(point)
        return point

    yield mount
    for point in reversed(mounts):
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


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


# ---- helpers for the bad-input cases (tests/reliability/test_bad_data.py, test_bad_arguments.py) ----
MINI = ASSETS   # the shipped mini model (256 positions)
TOY = ROOT / "examples" / "data"


def run_cli(*args: str, stdin: bytes | str | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m velotune.cli ARGS` as a user runs it: no TRITON_INTERPRET, bytes on stdin allowed.
    The result carries `.out` / `.err`: stdout / stderr decoded (undecodable bytes replaced)."""
    env = {k: v for k, v in cli_env().items() if k != "TRITON_INTERPRET"}
    data = stdin.encode() if isinstance(stdin, str) else stdin
    r = subprocess.run([sys.executable, "-m", "velotune.cli", *map(str, args)], input=data, capture_output=True,
                       env=env, timeout=timeout)
    r.out, r.err = r.stdout.decode("utf-8", "replace"), r.stderr.decode("utf-8", "replace")
    return r


def assert_refused(r, command: str, *fragments: str) -> str:
    """Exit code 2, no traceback, and exactly one line `velotune COMMAND: error: ...`, holding `fragments`."""
    assert r.returncode == 2, (r.returncode, r.err[-3000:])
    assert "Traceback" not in r.err and "Traceback" not in r.out, r.err[-3000:]
    errors = [line for line in r.err.splitlines() if line.startswith(f"velotune {command}: error:")]
    assert len(errors) == 1, r.err[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def write_config(folder: Path, data: Path, **data_keys) -> Path:
    """A one-step CPU SFT config on the mini model; `data_keys` go into the data section."""
    extra = "".join(f", {k}: {v}" for k, v in data_keys.items())
    cfg = folder / "cfg.yaml"
    cfg.write_text(f"model: {{name: {MINI}, dtype: float32, max_seq_length: 96}}\n"
                   f"data: {{path: {data}{extra}}}\n"
                   "lora: {r: 4, alpha: 8, gradient_checkpointing: false}\n"
                   "training: {max_steps: 1, batch_size: 2, gradient_accumulation_steps: 1, use_cpu: true}\n"
                   f"output_dir: {folder / 'run'}\n")
    return cfg


@pytest.fixture
def toy_rows() -> list[bytes]:
    return (TOY / "sft.jsonl").read_bytes().splitlines()[:4]
