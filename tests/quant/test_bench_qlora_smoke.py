"""bench/qlora.py's code paths on a tiny config on the CPU (a worker per contender, the dequant table,
the max-context probes), so a GPU session does not spend device time on a bench bug."""
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "qlora.py"


def test_qlora_bench_cpu_smoke():
    proc = subprocess.run([sys.executable, str(BENCH), "--cpu-smoke", "--impls", "velotune-qlora", "velotune-qlora-mlp", "stock-qlora",
                           "--ctx-impls", "velotune-qlora", "--offload-embedding"], capture_output=True, text=True, timeout=600)
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "NF4 dequantisation" in out and "False" not in out.split("NF4 dequantisation")[1].split("velotune-qlora")[0]
    assert "velotune-qlora / stock-qlora:" in out                    # both throughput workers ran
    assert "velotune-qlora-mlp / velotune-qlora:" in out            # and the recompute="mlp" variant
    assert "[embeddings in host memory]" in out                      # --offload-embedding reached the worker
    assert "[velotune-qlora] probe      64:" in out                   # the max-context worker ran its probes


def test_qlora_bench_from_checkpoint_with_offload_every(tmp_path):
    """--checkpoint (a bench/make_checkpoint.py folder) and --offload-every auto: the context probes
    report k and which bound holds (a host budget smaller than one layer input: host-bound at k = layers)."""
    ckpt = tmp_path / "tiny"
    make = BENCH.parent / "make_checkpoint.py"
    subprocess.run([sys.executable, str(make), "--shape", "tiny-llama", "--out", str(ckpt), "--device", "cpu"],
                   check=True, capture_output=True, timeout=300)
    proc = subprocess.run([sys.executable, str(BENCH), "--cpu-smoke", "--checkpoint", str(ckpt), "--no-throughput",
                           "--ctx-impls", "velotune-qlora", "--offload-every", "auto", "--host-budget-gib", "1e-7"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[velotune-qlora] probe      64:" in proc.stdout and "k=2," in proc.stdout
    assert "host-bound" in proc.stdout
