"""bench/sft.py's code paths on CPU (tiny model, 2 steps): every contender worker runs real TRL
trainers, and the contenders train the same weights on the same rows, so their losses agree."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "sft.py"


def _run(tmp_path, impls, *extra):
    out = tmp_path / "rows.jsonl"
    argv = [
        sys.executable,
        str(BENCH),
        "--quick",
        "--impls",
        *impls,
        "--out",
        str(out),
        "--model-dir",
        str(tmp_path / "models"),
        *extra,
    ]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["impl"] for r in rows] == list(impls)
    for r in rows:
        assert r["tokens_per_s"] > 0 and 0 < r["real_tokens"] <= r["batch_tokens"] and r["micro_batches"] == 2, r
        assert r["dpo"] is ("--dpo" in extra)
    assert "real tok/s" in proc.stdout.splitlines()[-1 - len(rows)]
    return rows


def test_sft_bench_quick(tmp_path):
    stock, fast = _run(tmp_path, ["stock", "velotune"])
    assert stock["real_tokens"] == fast["real_tokens"]
    assert abs(stock["first_loss"] - fast["first_loss"]) <= 1e-4 * abs(stock["first_loss"])
    assert fast["padding_free"]["forwards"] >= 3  # velotune ran the padded batches padding-free


def test_dpo_bench_quick(tmp_path):
    (fast,) = _run(tmp_path, ["velotune"], "--dpo")
    assert fast["padding_free"]["forwards"] >= 3
