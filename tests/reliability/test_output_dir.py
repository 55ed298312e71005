"""The output folder of `velotune train`: another run's folder refused (or moved aside with --overwrite),
one run per folder (an OS lock, stale-safe after kill -9), unwritable folders and too little disk refused
before any training step."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from cli_harness import (
    ROOT,
    assert_one_line,
    cli_env,
    copy_run,
    kill_and_reap,
    read_json,
    snapshot,
    train_config,
    velotune,
)


def test_another_runs_folder_is_refused_and_overwrite_moves_it_aside(tmp_path, trained_run):
    run = copy_run(trained_run, tmp_path / "run")
    before = snapshot(run)
    cfg = train_config(tmp_path, run, save_steps=1)
    line = assert_one_line(
        velotune("train", cfg), "already holds another run", "--overwrite", "--resume", command="train"
    )
    assert "adapter_config.json" in line
    assert snapshot(run) == before  # nothing touched

    # --overwrite: the old run is moved aside whole, the new one gets a fresh folder (no mixing)
    proc = velotune("train", cfg, "--overwrite", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert snapshot(aside) == before
    assert read_json(run / "summary.json")["steps"] == 2 and read_json(run / "summary.json")["resumed_from"] is None
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]


def test_resume_of_this_runs_folder_is_allowed(tmp_path, trained_run):
    """--resume continues the run in its own folder (more steps), from its newest complete checkpoint."""
    from velotune.train.config import load_config
    from velotune.train.runner import run_training

    run = copy_run(trained_run, tmp_path / "run")
    cfg = load_config(train_config(tmp_path, run, save_steps=1, max_steps=3))
    cfg.training.resume_from_checkpoint = True
    result = run_training(cfg, progress=False)
    assert result.summary["resumed_from"] == str(run / "checkpoint-2") and result.summary["steps"] == 3


def test_two_runs_on_one_folder_the_second_is_refused(tmp_path):
    """A run holding the lock (here: a process that took it); the second `velotune train` is refused at once."""
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time; from velotune.train.run_lock import RunLock; "
                f"RunLock({str(out)!r}).acquire(); print('held', flush=True); time.sleep(120)"
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=cli_env(),
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        cfg = train_config(tmp_path, out)
        line = assert_one_line(
            velotune("train", cfg),
            f"output_dir {out} is in use by another velotune train run",
            f"(pid {holder.pid})",
            command="train",
        )
        assert "choose another output_dir" in line

        # kill -9 of the holder: the kernel drops the lock; the next run is not refused by a stale lock
        kill_and_reap(holder)
        from velotune.train.run_lock import RunLock

        with RunLock(out) as lock:
            assert lock.held
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_lock_is_exclusive_in_process_terms(tmp_path):
    from velotune.errors import OutputError
    from velotune.train.run_lock import RunLock

    with RunLock(tmp_path):
        with pytest.raises(OutputError, match="in use by another velotune train run"):
            RunLock(tmp_path).acquire()
    RunLock(tmp_path).acquire().release()  # released on exit


def test_two_cli_runs_started_together(tmp_path):
    """Two real `velotune train` processes on one folder at the same moment: exactly one trains."""
    out = tmp_path / "out"
    cfg = train_config(tmp_path, out, max_steps=3)
    env = cli_env()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "velotune.cli", "train", str(cfg), "--no-progress"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    err = next(e for rc, e in results if rc == 2).strip().splitlines()[-1]
    assert "is in use by another velotune train run" in err or "already holds another run" in err, err
    assert "Traceback" not in next(e for rc, e in results if rc == 2)
    assert read_json(out / "summary.json")["steps"] == 3


def test_unwritable_output_folder_is_refused_before_training(tmp_path, small_tmpfs):
    """A read-only file system (a real one: a tmpfs mounted ro) and a path under a file."""
    ro = small_tmpfs(2**20, "ro", ",ro")
    line = assert_one_line(
        velotune("train", train_config(tmp_path, ro / "out")), "read-only file system", command="train"
    )
    assert f"output_dir {ro / 'out'}: cannot write in {ro}" in line


def test_output_dir_under_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    line = assert_one_line(
        velotune("train", train_config(tmp_path, f / "out")), "is a file, not a folder", command="train"
    )
    assert str(f) in line


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only modes")
def test_permission_denied_folder(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    line = assert_one_line(
        velotune("train", train_config(tmp_path, locked / "out")), "permission denied", command="train"
    )
    assert str(locked) in line


def test_too_little_disk_for_the_planned_checkpoints(tmp_path):
    """The estimate (checkpoints kept x their size + the final save) against the real free space."""
    from velotune.errors import OutputError
    from velotune.train.config import load_config
    from velotune.train.preflight import preflight

    cfg = load_config(train_config(tmp_path, tmp_path / "out", save_steps=1, max_steps=10**7, save_total_limit=10**7))
    with pytest.raises(
        OutputError,
        match=r"needed \(10000000 checkpoint\(s\) of ~.*only .* free there: free some "
        r"space, lower training.save_total_limit",
    ):
        preflight(cfg)
    cfg.training.save_total_limit = 2
    report = preflight(cfg)
    assert report.checkpoints == 3  # two kept + the one written before the oldest is deleted
    assert report.trainable == sum(4 * (i + o) for i, o in _lora_shapes()) and report.needed_bytes < report.free_bytes


def _lora_shapes():
    import json

    c = json.loads((ROOT / "src/velotune/demo/assets/config.json").read_text())
    h, i, hd = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    per_layer = [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]
    return per_layer * c["num_hidden_layers"]


def test_kill_9_during_training_then_resume(tmp_path):
    """kill -9 at a random moment after the first checkpoint; --resume finishes from the newest complete one."""
    import random

    out = tmp_path / "out"
    cfg = train_config(tmp_path, out, save_steps=1, max_steps=6, save_total_limit=2)
    proc = subprocess.Popen(
        [sys.executable, "-m", "velotune.cli", "train", str(cfg), "--no-progress"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=cli_env(),
    )
    deadline = time.monotonic() + 300
    while not (out / "checkpoint-1" / "trainer_state.json").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(random.Random(7).uniform(0, 0.3))
    kill_and_reap(proc)
    done = velotune("train", cfg, "--resume", "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = read_json(out / "summary.json")
    assert summary["steps"] == 6 and summary["resumed_from"].startswith(str(out / "checkpoint-"))


def test_resuming_from_another_folders_checkpoint_does_not_claim_this_one(tmp_path, trained_run):
    from velotune.train.output_dir import resumes_here

    run = copy_run(trained_run, tmp_path / "run")
    assert resumes_here(run, True) and resumes_here(run, str(run / "checkpoint-1"))
    assert not resumes_here(run, str(trained_run / "checkpoint-1")) and not resumes_here(run, None)
    cfg = train_config(tmp_path, run)
    line = assert_one_line(
        velotune("train", cfg, "--resume", trained_run / "checkpoint-1"), "already holds another run", command="train"
    )
    assert str(run) in line
