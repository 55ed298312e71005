"""Saves under faults: kill -9 at random moments of train's final save, of a checkpoint save and of
exports (merged safetensors, GGUF, the CLI); a real full disk (a small tmpfs) during training and export;
stale temp files of killed exports removed; outputs created with the user's umask."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from cli_harness import (
    assert_one_line,
    cli_env,
    copy_run,
    fork_run,
    hidden_entries,
    kill_and_reap,
    kill_loop,
    read_json,
    snapshot,
    train_config,
    velotune,
)


@pytest.fixture(scope="module")
def loaded_run(trained_run):
    """(PEFT model, tokenizer) of the trained run, loaded as export does."""
    from velotune.export.command import load_for_export

    model, tok, _, _ = load_for_export(trained_run)
    return model, tok


def _retrained(model, rank_seed: int):
    """The same adapter with other weights: a save of it differs in every weight file."""
    with torch.no_grad():
        g = torch.Generator().manual_seed(rank_seed)
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.01)
    return model


def test_kill_during_final_save_leaves_old_or_new_never_a_mix(tmp_path, trained_run, loaded_run):
    """The issue's case: the new run's adapter_config.json must never sit beside the old weights."""
    from velotune.train.runner import save_final

    model, tok = loaded_run
    base = copy_run(trained_run, tmp_path / "pristine")
    out = tmp_path / "run"
    copy_run(base, out)
    old = snapshot(out)
    _retrained(model, 1)

    def extra(stage):
        (stage / "summary.json").write_text(json.dumps({"new": True}))

    new_dir = tmp_path / "new"
    copy_run(base, new_dir)
    save_final(model, tok, new_dir, extra=extra)
    new = snapshot(new_dir)
    assert new != old and new["adapter_model.safetensors"] != old["adapter_model.safetensors"]

    def check():
        now = snapshot(out)
        assert now in (old, new), sorted(k for k in set(now) | set(old) if now.get(k) != old.get(k))[:5]
        stray = [p for p in out.rglob("*") if ".tmp" in p.name or ".save-" in p.name]
        assert not stray, stray

    def restore():
        shutil.rmtree(out)
        copy_run(base, out)

    counts = kill_loop(lambda: save_final(model, tok, out, extra=extra), check, kills=16, seed=1, restore=restore)
    assert counts["killed"] >= 5, counts
    # the killed saves' stage folders are removed by the next save
    save_final(model, tok, out, extra=extra)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run.")], list(tmp_path.iterdir())


def test_kill_during_checkpoint_save_resume_takes_newest_complete(tmp_path, trained_run):
    """kill -9 inside a checkpoint write: checkpoint-N is whole or absent (it is staged in a hidden temp
    folder and renamed into place); a torn one made by other means is detected by --resume, removed with
    a line, and resuming starts from the previous complete one."""
    from velotune.fsio import TEMP_NAME, remove_stale_temps
    from velotune.train.config import load_config
    from velotune.train.resume import newest_complete, why_incomplete
    from velotune.train.runner import _resume_arg, run_training

    out = tmp_path / "run"
    cfg = load_config(train_config(tmp_path, out, save_steps=1, max_steps=1))
    trainer = run_training(cfg, progress=False).trainer
    step = [100]

    def save():
        trainer.state.global_step = step[0]
        trainer._save_checkpoint(trainer.model, None)

    outcomes = []

    def check():
        ckpt = out / f"checkpoint-{step[0]}"
        why = why_incomplete(ckpt) if ckpt.exists() else "absent"
        assert why in (None, "absent"), f"a torn checkpoint under its final name: {ckpt}: {why}"
        outcomes.append(why)
        last, torn = newest_complete(out)
        assert last == (ckpt if why is None else out / "checkpoint-1") and not torn
        hidden = [p.name for p in out.iterdir() if p.name.startswith(".") and p.name != ".velotune.lock"]
        assert all(TEMP_NAME.match(n) for n in hidden), hidden  # leftovers are named as temps

    def restore():
        shutil.rmtree(out / f"checkpoint-{step[0]}", ignore_errors=True)
        step[0] += 1

    counts = kill_loop(save, check, kills=16, seed=2, restore=restore)
    assert counts["killed"] >= 5 and outcomes.count("absent") >= 2, (counts, outcomes)
    remove_stale_temps(out)  # the killed children's staging folders (their processes are gone)
    assert not [p for p in out.iterdir() if TEMP_NAME.match(p.name)]

    # A torn newest checkpoint on disk: --resume skips and removes it with one line, and resumes from the last.
    trainer.state.global_step = 7
    trainer._save_checkpoint(trainer.model, None)
    (out / "checkpoint-7" / "trainer_state.json").unlink()
    with open(out / "checkpoint-7" / "optimizer.pt", "r+b") as f:
        f.truncate(100)
    cfg.training.resume_from_checkpoint = True
    assert _resume_arg(cfg) == str(out / "checkpoint-1")
    assert not (out / "checkpoint-7").exists()


def test_kill_during_merged_and_gguf_export(tmp_path, loaded_run):
    model, tok = loaded_run
    out = tmp_path / "exp"
    merged, gguf_dir = out / "merged_16bit", out / "gguf"
    model.save_pretrained_merged(merged, tok, "merged_16bit", max_shard_size="2MB", quiet=True)
    model.save_pretrained_gguf(gguf_dir, tok, "q8_0", quiet=True)
    old = {"m": snapshot(merged), "g": snapshot(gguf_dir)}
    assert len([k for k in old["m"] if k.endswith(".safetensors")]) > 2  # several shards
    ref = tmp_path / "ref"
    _retrained(model, 2)
    model.save_pretrained_merged(ref / "merged_16bit", tok, "merged_16bit", max_shard_size="2MB", quiet=True)
    model.save_pretrained_gguf(ref / "gguf", tok, "q8_0", quiet=True)
    new = {"m": snapshot(ref / "merged_16bit"), "g": snapshot(ref / "gguf")}
    assert new["m"] != old["m"] and new["g"] != old["g"]

    def check(key, folder):
        def run():
            assert snapshot(folder) in (old[key], new[key])
            assert not [
                p
                for p in out.rglob("*")
                if not any(s.startswith(".") for s in p.relative_to(out).parts)
                and p.parent.name not in ("merged_16bit", "gguf", "exp")
                and p != merged
                and p != gguf_dir
            ]

        return run

    def restore_m():
        if snapshot(merged) != old["m"]:
            shutil.rmtree(merged)
            shutil.copytree(tmp_path / "old-m", merged)

    shutil.copytree(merged, tmp_path / "old-m")
    c1 = kill_loop(
        lambda: model.save_pretrained_merged(merged, tok, "merged_16bit", max_shard_size="2MB", quiet=True),
        check("m", merged),
        kills=14,
        seed=3,
        restore=restore_m,
    )
    shutil.copytree(gguf_dir, tmp_path / "old-g")

    def restore_g():
        if snapshot(gguf_dir) != old["g"]:
            shutil.rmtree(gguf_dir)
            shutil.copytree(tmp_path / "old-g", gguf_dir)

    c2 = kill_loop(
        lambda: model.save_pretrained_gguf(gguf_dir, tok, "q8_0", quiet=True),
        check("g", gguf_dir),
        kills=10,
        seed=4,
        restore=restore_g,
    )
    assert c1["killed"] >= 4 and c2["killed"] >= 3, (c1, c2)
    # Stale temps of the killed exports (hidden, named by their dead pids) go at the next export.
    model.save_pretrained_merged(merged, tok, "merged_16bit", max_shard_size="2MB", quiet=True)
    model.save_pretrained_gguf(gguf_dir, tok, "q8_0", quiet=True)
    assert hidden_entries(out) == [] and hidden_entries(gguf_dir) == []


def test_cli_export_killed_at_random_moments(tmp_path, trained_run):
    """`velotune export` (a real process) killed during its write: the previous export stays whole."""
    import random

    run = copy_run(trained_run, tmp_path / "run")
    exp = tmp_path / "exp"
    done = velotune("export", run, "--to", "merged_16bit", "--max-shard-size", "2MB", "-o", exp)
    assert done.returncode == 0, done.stderr[-2000:]
    before = snapshot(exp)
    rng = random.Random(5)
    for _ in range(3):
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "velotune.cli",
                "export",
                str(run),
                "--to",
                "merged_16bit",
                "--max-shard-size",
                "2MB",
                "-o",
                str(exp),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=cli_env(),
        )
        deadline = time.monotonic() + 300
        while not any(".tmp-" in p.name for p in exp.iterdir()) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.05))
        kill_and_reap(proc)
        assert snapshot(exp) == before
    done = velotune("export", run, "--to", "merged_16bit", "--max-shard-size", "2MB", "-o", exp)
    assert done.returncode == 0 and snapshot(exp) == before and hidden_entries(exp) == []


def test_disk_full_during_export_is_one_line_and_leaves_nothing(tmp_path, trained_run, small_tmpfs):
    disk = small_tmpfs(3 * 2**20)
    run = copy_run(trained_run, tmp_path / "run")
    exp = disk / "exp"
    assert velotune("export", run, "--to", "lora", "-o", exp).returncode == 0
    lora = snapshot(exp / "lora")
    line = assert_one_line(
        velotune("export", run, "--to", "merged_16bit", "-o", exp),
        "the disk is full (ENOSPC)",
        "nothing was written there",
        command="export",
    )
    assert str(exp / "merged_16bit") in line
    assert sorted(p.name for p in exp.iterdir()) == ["lora"] and snapshot(exp / "lora") == lora
    line = assert_one_line(
        velotune("export", run, "--to", "gguf", "--quant", "f32", "-o", exp),
        "the disk is full (ENOSPC)",
        command="export",
    )
    assert sorted(p.name for p in exp.iterdir()) == ["gguf", "lora"] and list((exp / "gguf").iterdir()) == []


def test_disk_full_during_a_training_checkpoint(tmp_path, small_tmpfs):
    """The disk fills up (another writer) after the first checkpoint: one line, the torn checkpoint removed,
    and --resume finishes once there is space again."""
    disk = small_tmpfs(24 * 2**20)
    out = disk / "out"
    cfg = train_config(tmp_path, out, save_steps=2, max_steps=8, gradient_accumulation_steps=4, save_total_limit=3)
    proc = subprocess.Popen(
        [sys.executable, "-m", "velotune.cli", "train", str(cfg), "--no-progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
    )
    deadline = time.monotonic() + 300
    while not (out / "checkpoint-2" / "trainer_state.json").exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    filler = disk / "filler"
    with open(filler, "wb") as f:  # fill the disk up to its last few KiB
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    _, err = proc.communicate(timeout=300)
    proc.stderr = err
    assert_one_line(
        proc,
        "the disk filled up while saving a checkpoint",
        "the disk is full (ENOSPC)",
        "the incomplete checkpoint was removed",
        "--resume",
        command="train",
    )
    from velotune.train.resume import checkpoints, why_incomplete

    kept = checkpoints(out)
    assert kept and all(why_incomplete(c) is None for c in kept), [(c, why_incomplete(c)) for c in kept]
    assert not (out / "adapter_model.safetensors").exists()
    filler.unlink()
    done = velotune("train", cfg, "--resume", "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    assert read_json(out / "summary.json")["steps"] == 8


def test_outputs_honour_the_umask(tmp_path, trained_run, loaded_run):
    model, tok = loaded_run
    old = os.umask(0o027)
    try:
        folder = model.save_pretrained_merged(tmp_path / "m", tok, "merged_16bit", quiet=True)
        (gguf,) = model.save_pretrained_gguf(tmp_path / "g", tok, "q8_0", quiet=True)
        from velotune.train.runner import save_final

        out = save_final(model, tok, copy_run(trained_run, tmp_path / "run"))
    finally:
        os.umask(old)
    for p in [
        folder / "model.safetensors",
        folder / "config.json",
        gguf,
        tmp_path / "g" / "Modelfile",
        out / "adapter_model.safetensors",
        out / "adapter_config.json",
    ]:
        assert p.stat().st_mode & 0o777 == 0o640, (p, oct(p.stat().st_mode))
    for d in (folder, out):
        assert d.stat().st_mode & 0o777 == 0o750, (d, oct(d.stat().st_mode))
    # checkpoints and final files of a real run (default umask 022 of the test process, or the caller's)
    mask = os.umask(0)
    os.umask(mask)
    for p in [
        trained_run / "checkpoint-2" / "adapter_model.safetensors",
        trained_run / "summary.json",
        trained_run / "loss_curve.png",
    ]:
        assert p.stat().st_mode & 0o777 == 0o666 & ~mask, (p, oct(p.stat().st_mode))


def test_a_fork_killed_inside_a_progress_bar_lock_leaves_this_process_free():
    """The kill loops' forked children take tqdm's write lock (every bar does, even a disabled one); a
    child SIGKILLed while holding it must not leave it held here (it did: the next bar hung pytest)."""
    import threading

    from tqdm.auto import tqdm

    def hold_the_lock():
        with tqdm.get_lock():
            time.sleep(60)

    tqdm.get_lock()  # made here first (as earlier bars of this process do), so the child inherits it
    pid = fork_run(hold_the_lock)
    time.sleep(1.0)  # the child is inside the lock by now
    kill_and_reap(pid)
    made = threading.Event()
    threading.Thread(target=lambda: (tqdm(total=1, disable=True).close(), made.set()), daemon=True).start()
    assert made.wait(20), "a progress bar here waits for a lock the killed child held"
