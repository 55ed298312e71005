"""Helpers for the bad-input cases (test_bad_data.py, test_bad_arguments.py): the CLI with bytes on stdin and
without TRITON_INTERPRET (as a user runs it), the one-line refusal check, a one-step config, toy rows."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from cli_harness import ASSETS, ROOT, cli_env

MINI = ASSETS  # the shipped mini model (256 positions)
TOY = ROOT / "examples" / "data"


def run_cli(*args: str, stdin: bytes | str | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m velotune.cli ARGS` as a user runs it: no TRITON_INTERPRET, bytes on stdin allowed.
    The result carries `.out` / `.err`: stdout / stderr decoded (undecodable bytes replaced)."""
    env = {k: v for k, v in cli_env().items() if k != "TRITON_INTERPRET"}
    data = stdin.encode() if isinstance(stdin, str) else stdin
    r = subprocess.run(
        [sys.executable, "-m", "velotune.cli", *map(str, args)],
        input=data,
        capture_output=True,
        env=env,
        timeout=timeout,
    )
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
    cfg.write_text(
        f"model: {{name: {MINI}, dtype: float32, max_seq_length: 96}}\n"
        f"data: {{path: {data}{extra}}}\n"
        "lora: {r: 4, alpha: 8, gradient_checkpointing: false}\n"
        "training: {max_steps: 1, batch_size: 2, gradient_accumulation_steps: 1, use_cpu: true}\n"
        f"output_dir: {folder / 'run'}\n"
    )
    return cfg


def toy_rows() -> list[bytes]:
    """The first 4 rows of the shipped toy SFT data, as the bytes of their JSONL lines."""
    return (TOY / "sft.jsonl").read_bytes().splitlines()[:4]
