"""The benchmark scripts' code paths on a tiny model on the CPU (each in its own process, as on the GPU
machine), so a device call does not spend its time on a bench bug; and the rows they append to a
JSON-lines file carry what BENCHMARKS.md needs (card, commit, command) and the settings that ran."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _run(script: str, *argv: str, jsonl: Path) -> tuple[str, list[dict]]:
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), *argv, "--jsonl", str(jsonl), "--commit", "abc1234"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()] if jsonl.exists() else []
    for row in rows:
        assert row["card"] == "cpu" and row["commit"] == "abc1234"
        assert row["command"].startswith(f"python bench/{script} ") and "--jsonl" in row["command"]
    return proc.stdout, rows


def test_qlora_bench_memory_options_reach_the_worker(tmp_path):
    out, rows = _run(
        "qlora.py",
        "--cpu-smoke",
        "--impls",
        "stock-qlora",
        "velotune-qlora",
        "--recompute",
        "mlp",
        "--offload-embedding",
        "--optimizer",
        "offloaded-in-backward",
        jsonl=tmp_path / "q.jsonl",
    )
    by_impl = {r["impl"]: r for r in rows}
    assert set(by_impl) == {"stock-qlora", "velotune-qlora"} and all(r["subject"] == "qlora" for r in rows)
    v = by_impl["velotune-qlora"]
    assert v["memory"]["recompute"] == "mlp" and v["memory"]["optimizer"] == "offloaded-in-backward"
    assert v["embeddings_offloaded"] is True  # get_peft_model(offload_embedding=True) ran
    assert "memory" not in by_impl["stock-qlora"]  # the options are velotune's only
    assert v["speedup_vs"]["stock-qlora"] > 0 and v["tokens_per_s_rounds"] == [v["tokens_per_s"]]
    assert abs(v["first_loss"] - by_impl["stock-qlora"]["first_loss"]) < 1e-3  # the same model and batch
    assert "velotune-qlora / stock-qlora:" in out


def test_context_bench_probes(tmp_path):
    out, rows = _run("context.py", "--cpu-smoke", "--impls", "velotune-qlora", jsonl=tmp_path / "c.jsonl")
    assert "[velotune-qlora] probe      64:" in out  # the worker ran its probes (no fit on the CPU)
    assert rows == []  # nothing verified on the CPU: no row


def test_nf4_bench_bit_exact(tmp_path):
    out, rows = _run("nf4.py", "--cpu-smoke", jsonl=tmp_path / "n.jsonl")
    assert len(rows) == 6 and all(r["bit_exact"] for r in rows)
    assert {r["dtype"] for r in rows} == {"bfloat16", "float16", "float32"}


def test_train_bench(tmp_path):
    out, rows = _run(
        "train.py",
        "--shapes",
        "tiny",
        "--device",
        "cpu",
        "--impls",
        "velotune",
        "stock",
        "--steps",
        "1",
        "--warmup",
        "1",
        "--batch",
        "1",
        "--seq",
        "32",
        jsonl=tmp_path / "t.jsonl",
    )
    by_impl = {r["impl"]: r for r in rows}
    assert set(by_impl) == {"velotune", "stock"} and by_impl["velotune"]["speedup_vs_stock"] > 0
    assert abs(by_impl["velotune"]["first_loss"] - by_impl["stock"]["first_loss"]) < 1e-3


def test_sft_bench(tmp_path):
    """TRL's SFTTrainer on variable-length rows, stock and velotune: the same rows, the same real-token
    count and losses (fp32), velotune padding-free (no padding reaches its model), stock padded."""
    out = tmp_path / "s.jsonl"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "sft.py"), "--quick", "--impls", "stock", "velotune"]
        + ["--out", str(out), "--commit", "abc1234"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["impl"]: r for r in map(json.loads, out.read_text().splitlines())}
    stock, fast = rows["stock"], rows["velotune"]
    assert fast["commit"] == stock["commit"] == "abc1234" and fast["card"] == "cpu"
    assert fast["real_tokens"] == stock["real_tokens"] > 0 and stock["batch_tokens"] > stock["real_tokens"]
    assert fast["micro_batches"] == stock["micro_batches"] == 2
    pf = fast["padding_free"]
    assert pf["forwards"] == 3 and pf["real_tokens"] < pf["batch_tokens"]  # warm-up + timed micro-batches packed
    for a, b in zip(fast["losses"], stock["losses"], strict=True):
        assert abs(a - b) <= 1e-5 * abs(b)
    assert "vs stock" in proc.stdout


def test_grpo_bench(tmp_path):
    """One GRPO step per contender (TRL's GRPOTrainer): velotune's glue installed and its engine used."""
    out, rows = _run("grpo.py", "--cpu-smoke", "--impls", "velotune-lora", "stock-lora", jsonl=tmp_path / "g.jsonl")
    by_impl = {r["impl"]: r for r in rows}
    assert set(by_impl) == {"velotune-lora", "stock-lora"} and all(r["subject"] == "grpo" for r in rows)
    v = by_impl["velotune-lora"]
    assert v["glue"] == {"rollouts": True, "logprob_head": True} and v["engine_generate_calls"] == 2
    assert v["padding_free"]["real_tokens"] < v["padding_free"]["batch_tokens"]  # left-padded prompts
    assert 0 < v["generate_ms"] < v["ms_per_step"] and v["speedup_vs"]["stock-lora"] > 0
    assert v["completion_len"] == 6 and "velotune-lora / stock-lora:" in out


def test_results_rows_name_card_commit_and_command():
    """Every row under bench/results (the rows BENCHMARKS.md cites) says where it came from."""
    files = sorted((BENCH / "results").glob("*.jsonl"))
    assert files and all(f.suffix == ".jsonl" for f in (BENCH / "results").iterdir())
    for f in files:
        for line in f.read_text().splitlines():
            row = json.loads(line)
            assert row["subject"] == f.stem
            assert row["card"].startswith(("NVIDIA", "2x NVIDIA")) and len(row["commit"]) == 7
            assert row["command"].startswith("python bench/") or row["command"].startswith("python -m pytest")
            assert row["source"]


def test_benches_from_a_checkpoint_with_offload_every(tmp_path):
    """--checkpoint (a bench/make_checkpoint.py folder) in qlora.py (stock and velotune load it) and
    context.py with --offload-every auto under a host budget smaller than one layer input: k = layers,
    reported host-bound at every probe."""
    ckpt = tmp_path / "tiny"
    subprocess.run(
        [
            sys.executable,
            str(BENCH / "make_checkpoint.py"),
            "--shape",
            "tiny-llama",
            "--out",
            str(ckpt),
            "--device",
            "cpu",
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    out, rows = _run(
        "qlora.py",
        "--cpu-smoke",
        "--checkpoint",
        str(ckpt),
        "--impls",
        "stock-qlora",
        "velotune-qlora",
        "--offload-every",
        "2",
        jsonl=tmp_path / "q.jsonl",
    )
    by_impl = {r["impl"]: r for r in rows}
    assert set(by_impl) == {"stock-qlora", "velotune-qlora"}
    assert by_impl["velotune-qlora"]["memory"]["offload_every"] == 2
    assert abs(by_impl["velotune-qlora"]["first_loss"] - by_impl["stock-qlora"]["first_loss"]) < 1e-3
    out, _ = _run(
        "context.py",
        "--cpu-smoke",
        "--checkpoint",
        str(ckpt),
        "--impls",
        "velotune-qlora",
        "--offload-every",
        "auto",
        "--host-budget-gib",
        "1e-7",
        jsonl=tmp_path / "c.jsonl",
    )
    assert "[velotune-qlora] probe      64:" in out and "k=2," in out and "host-bound" in out
