"""bench/qlora.py's code paths on a tiny config on the CPU (a worker per contender, the dequant table,
the max-context probes), so a GPU session does not spend device time on a bench bug."""
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "qlora.py"


def test_qlora_bench_cpu_smoke():
    proc = subprocess.run([sys.executable, str(BENCH), "--cpu-smoke", "--impls", "velotune-qlora", "velotune-qlora-mlp",
                           "stock-qlora", "--ctx-impls", "velotune-qlora", "--offload-embedding"],
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "NF4 dequantisation" in out and "False" not in out.split("NF4 dequantisation")[1].split("velotune-qlora")[0]
    assert "velotune-qlora / stock-qlora:" in out                    # both throughput workers ran
    assert "velotune-qlora-mlp / velotune-qlora:" in out            # and the recompute="mlp" variant
    assert "[embeddings in host memory]" in out                      # --offload-embedding reached the worker
    assert "[velotune-qlora] probe      64:" in out                   # the max-context worker ran its probes
