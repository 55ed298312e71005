"""Bad model folders, adapters, checkpoints and paths: one line naming the file and what to do, exit code 2,
no traceback, in `velotune chat`, `train` and `export`; `--traceback` shows it; a bug keeps its traceback."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import pytest

from cli_harness import ASSETS, assert_one_line, copy_run, train_config, velotune
from velotune.cli import main


def broken_model(tmp_path, case: str):
    """A copy of the shipped mini model broken one way; returns (folder, expected message fragment)."""
    m = tmp_path / f"model-{case}"
    shutil.copytree(ASSETS, m)
    weights = m / "model.safetensors"
    if case == "truncated":
        os.truncate(weights, weights.stat().st_size // 2)
        return m, "re-download or re-export the model"
    if case == "empty":
        weights.write_bytes(b"")
        return m, "too short for a safetensors header"
    if case == "garbage":
        weights.write_bytes(b"\xff" * 64 + b"not safetensors" * 10)
        return m, "bad safetensors header length"
    if case == "bad-json-header":
        weights.write_bytes((20).to_bytes(8, "little") + b"{not json at all}!!!" + b"\0" * 16)
        return m, "header is not valid JSON"
    if case == "no-tokenizer":
        (m / "tokenizer.json").unlink()
        return m, "has no tokenizer files"
    if case == "unknown-model-type":
        cfg = json.loads((m / "config.json").read_text())
        (m / "config.json").write_text(json.dumps({**cfg, "model_type": "bogus"}))
        return m, "model_type 'bogus' is not known to transformers"
    if case == "remote-code":
        cfg = json.loads((m / "config.json").read_text())
        cfg.update(model_type="custom-thing", auto_map={"AutoConfig": "cfg.C", "AutoModelForCausalLM": "m.M"})
        (m / "config.json").write_text(json.dumps(cfg))
        return m, "trust_remote_code"
    if case == "missing-layer":
        from safetensors.torch import load_file, save_file

        tensors = {k: v for k, v in load_file(weights).items() if ".layers.3." not in k}
        save_file(tensors, weights, metadata={"format": "pt"})
        return m, "lack 9 weight(s) the model needs (model.layers.3."
    if case == "pickle-only":
        weights.unlink()
        (m / "pytorch_model.bin").write_bytes(pickle.dumps({"x": 1}))
        return m, "convert them to safetensors"
    if case == "missing-shard":
        (m / "model.safetensors.index.json").write_text(
            json.dumps(
                {
                    "metadata": {},
                    "weight_map": {
                        "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                        "lm_head.weight": "model-00002-of-00002.safetensors",
                    },
                }
            )
        )
        weights.rename(m / "model-00001-of-00002.safetensors")
        return m, "model-00002-of-00002.safetensors named in model.safetensors.index.json are missing"
    if case == "bad-config-json":
        (m / "config.json").write_text("{ nope")
        return m, "config.json is not valid JSON"
    raise ValueError(case)


CASES = [
    "truncated",
    "empty",
    "garbage",
    "bad-json-header",
    "no-tokenizer",
    "unknown-model-type",
    "remote-code",
    "missing-layer",
    "pickle-only",
    "missing-shard",
    "bad-config-json",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_model_folder_in_chat(tmp_path, capsys, case):
    folder, fragment = broken_model(tmp_path, case)
    assert main(["chat", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("velotune chat: error: ") and fragment in line, line


def test_truncated_model_in_train_and_export_subprocesses(tmp_path, trained_run):
    """The same refusal through the real CLI processes, before any training step or export file."""
    folder, fragment = broken_model(tmp_path, "truncated")
    out = tmp_path / "out"
    line = assert_one_line(velotune("train", train_config(tmp_path, out, model=folder)), fragment, command="train")
    assert "model.safetensors" in line
    assert not (out / "adapter_model.safetensors").exists() and not list(out.glob("checkpoint-*"))

    run = copy_run(trained_run, tmp_path / "run")
    exp = tmp_path / "exp"
    line = assert_one_line(
        velotune("export", run, "--to", "merged_16bit", "--base", folder, "-o", exp), fragment, command="export"
    )
    assert not exp.exists()


def test_pickled_adapter_is_refused_without_unpickling(tmp_path, trained_run, capsys):
    run = copy_run(trained_run, tmp_path / "run")
    marker = tmp_path / "code-ran"

    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (run / "adapter_model.safetensors").unlink()
    (run / "adapter_model.bin").write_bytes(pickle.dumps(Boom()))
    for argv in (["chat", str(run)], ["export", str(run), "--to", "lora", "-o", str(tmp_path / "exp")]):
        assert main(argv) == 2
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert "never unpickles: convert them to safetensors" in line, line
    assert not marker.exists()


def test_refused_pickle_in_a_checkpoint_names_what_to_do(tmp_path, trained_run, capsys):
    """--resume from a checkpoint whose optimizer.pt is a booby-trapped pickle: refused (no code runs)
    with one line, not torch.load's traceback."""
    import torch

    run = copy_run(trained_run, tmp_path / "run")
    marker = tmp_path / "code-ran"

    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    ckpt = run / "checkpoint-2"
    torch.save({"state": Boom()}, ckpt / "optimizer.pt")
    cfg = train_config(tmp_path, run, max_steps=3)
    assert main(["train", str(cfg), "--resume", str(ckpt), "--no-progress"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "holds pickled objects beyond plain tensors" in line and "delete that checkpoint" in line, line
    assert not marker.exists()


def test_export_out_pointing_at_a_file(tmp_path, trained_run, capsys):
    target = tmp_path / "a-file"
    target.write_text("keep me")
    assert main(["export", str(trained_run), "--to", "lora", "-o", str(target)]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == f"velotune export: error: -o/--out: {target} is a file, not a folder; pass -o with a folder path"
    assert target.read_text() == "keep me"
    assert main(["export", str(trained_run), "--to", "lora", "-o", str(target / "sub")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_traceback_flag_and_internal_bugs(tmp_path, capsys, monkeypatch):
    folder, _ = broken_model(tmp_path, "garbage")
    assert main(["--traceback", "chat", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "ModelLoadError" in err
    assert err.strip().splitlines()[-1].startswith("velotune chat: error: ")
    assert main(["chat", str(folder), "--traceback"]) == 2  # after the command too
    assert "Traceback" in capsys.readouterr().err

    import velotune.infer.command as chat

    def bug(args):
        raise KeyError("an internal bug")

    monkeypatch.setattr(chat, "run", bug)
    with pytest.raises(KeyError, match="an internal bug"):  # not turned into a one-line user error
        main(["chat", str(folder)])
