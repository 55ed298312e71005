"""`velotune demo` end to end with fewer steps: it trains, answers better than before, exports,
and leaves its outputs behind; `velotune chat` on the exported model, with its defaults, answers the
held-out questions as the demo's evaluation did."""

from __future__ import annotations

import io
import json
import sys

from velotune.cli import main


def test_demo_runs_learns_exports_and_saves_everything(tmp_path, capsys, monkeypatch):
    out = tmp_path / "demo-out"
    assert main(["demo", "--output-dir", str(out), "--steps", "60", "--cpu"]) == 0
    printed = capsys.readouterr().out
    assert "before:" in printed and "after:" in printed and "llama.cpp" in printed
    assert printed.rstrip().splitlines()[-1].strip().startswith("GGUF")  # the file list ends the run
    assert f"Saved in {out}" in printed

    # training outputs
    assert (out / "adapter_model.safetensors").stat().st_size > 0
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 60
    assert summary["last_loss"] < 0.5 * summary["first_loss"]

    # the demo proves learning: held-out questions (facts never asked in training) get answered
    demo = summary["demo"]
    before, after = demo["heldout_before"], demo["heldout_after"]
    assert before["questions"] == after["questions"] == len(demo["examples"]) >= 20
    assert after["exact"] > before["exact"] + before["questions"] // 4, (before, after)
    assert after["fact"] > before["fact"]
    assert sum(e["after"] == e["expected"] for e in demo["examples"]) == after["exact"]

    # export: merged safetensors + q8_0 GGUF, read back by llama.cpp
    export = demo["export"]
    assert export["merged_dir"] == str(out / "merged") and (out / "merged" / "model.safetensors").stat().st_size > 0
    assert json.loads((out / "merged" / "config.json").read_text())["model_type"] == "llama"
    gguf = out / "gguf" / "model.Q8_0.gguf"
    assert export["gguf_path"] == str(gguf) and gguf.read_bytes()[:4] == b"GGUF"
    assert (out / "gguf" / "Modelfile").exists()
    llama_cpp = export["llama_cpp"]
    assert llama_cpp["question"] == demo["examples"][0]["question"]
    assert llama_cpp["answer"] and llama_cpp["answer"] in printed
    # q8_0 rounding may change a token, but llama.cpp answers from the fine-tuned weights, not the base
    assert llama_cpp["answer"].split()[:2] == llama_cpp["transformers_answer"].split()[:2]
    assert str(gguf) in printed and str(out / "merged") in printed

    # `velotune chat` on the merged model with its default settings (greedy, the model's native context,
    # RoPE as trained) gives the demo's answers; only --max-new-tokens matches the demo's evaluation.
    # Ten questions (chat decodes one conversation at a time: ~1 s each on a busy CI core).
    examples = demo["examples"][:10]
    script = "".join(f"{e['question']}\n/reset\n" for e in examples) + "/exit\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    assert main(["chat", str(out / "merged"), "--max-new-tokens", "24"]) == 0
    chat = capsys.readouterr()
    assert "greedy" in chat.out.splitlines()[0] and "RoPE" not in chat.err
    replies = [line[4:].strip() for line in chat.out.splitlines() if line.startswith(">>> ")]
    replies = [r for r in replies if r and r != "(conversation reset)"]
    assert replies == [e["after"] for e in examples]


def test_demo_rejects_bad_steps(tmp_path, capsys):
    assert main(["demo", "--output-dir", str(tmp_path / "x"), "--steps", "0", "--cpu"]) != 0
    assert "--steps" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
