"""`velotune train CONFIG --nproc 2` (torchrun) and `accelerate launch -m velotune.cli train CONFIG` (2 gloo
processes on CPU) through TRL's SFTTrainer equal one process on the same global batch: same losses, same
adapter, outputs written once by rank 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mini import save_mini_model  # noqa: E402

TOY = Path(__file__).resolve().parents[2] / "examples" / "data" / "sft.jsonl"


def _config(folder: Path, model: Path, data: Path, batch_size: int) -> Path:
    cfg = {
        "model": {"name": str(model), "dtype": "float32", "max_seq_length": 96},
        "data": {"path": str(data)},
        "method": "sft",
        "lora": {"r": 8, "alpha": 16, "gradient_checkpointing": False},
        "training": {
            "max_steps": 3,
            "batch_size": batch_size,
            "gradient_accumulation_steps": 2,
            "learning_rate": 1e-2,
            "lr_scheduler": "constant",
            "seed": 0,
            "logging_steps": 1,
        },
        "output_dir": str(folder / "out"),
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def _train(folder: Path, model: Path, data: Path, *, nproc: int | None, launcher: str = "nproc") -> tuple[dict, dict]:
    folder.mkdir()
    # One process of batch 2, or two processes of batch 1: the same global batch of 2 x 2 accumulation.
    cfg = _config(folder, model, data, batch_size=2 if nproc is None else 1)
    cmd = [sys.executable, "-m", "velotune.cli", "train", str(cfg), "--no-progress"]
    if nproc and launcher == "nproc":
        cmd += ["--nproc", str(nproc)]
    elif nproc and launcher == "accelerate":
        # accelerate's --multi_gpu launcher is torchrun underneath; on a CPU-only machine velotune's
        # Trainer arguments (use_cpu for a model on the CPU) make it gloo DDP.
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            str(nproc),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "-m",
            *cmd[2:],
        ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONFAULTHANDLER"] = "1"
    # Own process group: on a timeout the launcher and both workers are killed, none is left running.
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=400)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGABRT)  # faulthandler prints every worker's Python stack
        stdout, stderr = proc.communicate()
        pytest.fail(f"{' '.join(cmd[2:5])} did not finish in 400 s:\n{stderr[-6000:]}")
    assert proc.returncode == 0, stderr[-3000:]
    assert stdout.count("summary:") == 1  # rank 0 prints, rank 1 does not
    out = folder / "out"
    summary = json.loads((out / "summary.json").read_text())
    assert (out / "loss_curve.png").stat().st_size > 0
    return summary, load_file(out / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("single")
    model = save_mini_model("llama", tmp / "models")
    data = tmp / "sft.jsonl"
    data.write_text("\n".join(TOY.read_text(encoding="utf-8").splitlines()[:24]) + "\n", encoding="utf-8")
    return model, data, _train(tmp / "one", model, data, nproc=None)


@pytest.mark.parametrize("launcher", ["nproc", "accelerate"])  # velotune train --nproc 2 / accelerate launch
def test_velotune_train_two_processes_equal_one_process(tmp_path, single_run, launcher):
    model, data, (one, w_one) = single_run
    two, w_two = _train(tmp_path / "two", model, data, nproc=2, launcher=launcher)
    assert one["world_size"] == 1 and two["world_size"] == 2  # really distributed
    assert one["steps"] == two["steps"] == 3
    for a, b in ((one["first_loss"], two["first_loss"]), (one["last_loss"], two["last_loss"])):
        assert abs(a - b) <= 1e-5 * abs(a), (a, b)
    assert w_one.keys() == w_two.keys() and w_one
    for name, w in w_one.items():
        err = ((w_two[name] - w).norm() / w.norm()).item()
        assert err <= 1e-5, f"{name}: rel err {err:.2e}"
    changed = [n for n in w_one if "lora_B" in n and w_one[n].abs().sum() > 0]
    assert changed  # training moved the (zero-initialised) B matrices
