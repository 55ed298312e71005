"""`velotune demo` end to end with few steps: it trains, answers, and leaves its outputs behind."""
from __future__ import annotations

import json

from velotune.cli import main


def test_demo_runs_and_saves_adapter_curve_and_summary(tmp_path, capsys):
    out = tmp_path / "demo-out"
    assert main(["demo", "--output-dir", str(out), "--steps", "10", "--cpu"]) == 0
    printed = capsys.readouterr().out
    assert "before:" in printed and "after:" in printed and str(out) in printed

    assert (out / "adapter_model.safetensors").stat().st_size > 0
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 10
    assert summary["last_loss"] < summary["first_loss"]
    demo = summary["demo"]
    assert demo["heldout_before"]["questions"] == demo["heldout_after"]["questions"] == len(demo["examples"])
    assert all(e["before"] is not None and e["after"] is not None for e in demo["examples"])
