"""bench/sft.py's code paths on CPU (tiny model, 2 steps): every contender worker runs real TRL
trainers, and the contenders train the same weights on the same rows, so their losses agree."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "sft.py"


@pytest.mark.parametrize("task", ["sft", "dpo"])
def test_sft_bench_quick(task, tmp_path):
    out = tmp_path / "rows.jsonl"
    argv = [sys.executable, str(BENCH), "--quick", "--impls", "stock", "velotune", "--out", str(out),
            "--model-dir", str(tmp_path / "models")] + (["--dpo"] if task == "dpo" else [])
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["impl"] for r in rows] == ["stock", "velotune"]
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["real_tokens"] > 0 and r["micro_batches"] == 2, r
        assert r["dpo"] is (task == "dpo")
    stock, fast = rows
    assert stock["real_tokens"] == fast["real_tokens"]
    assert abs(stock["first_loss"] - fast["first_loss"]) <= 1e-4 * abs(stock["first_loss"])
    assert "real tok/s" in proc.stdout.splitlines()[-3]
