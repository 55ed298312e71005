"""`velotune export` from a training output folder (and its --push-to-hub, up to the network), the demo export."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import logits, rel_err
from mini import VOCAB, save_mini_model

from velotune.cli import main

IDS = torch.randint(7, VOCAB, (1, 12), generator=torch.Generator().manual_seed(9))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A training output as the trainer leaves it: run/adapter/ (PEFT) whose config points at the base."""
    from velotune import FastLanguageModel

    tmp = tmp_path_factory.mktemp("export_cli")
    base = save_mini_model("llama", tmp)
    model, tok = FastLanguageModel.from_pretrained(base, dtype=torch.float32, fast=False)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    model.eval()
    run = tmp / "run"
    model.save_pretrained(run / "adapter")  # PEFT's own save_pretrained stays for adapters
    tok.save_pretrained(run / "adapter")
    (run / "checkpoint-5").mkdir()
    return run, logits(model, IDS)


def test_export_cli_all_formats(run_dir, capsys):
    from transformers import AutoModelForCausalLM

    from velotune.export.llama_cpp_io import open_gguf

    run, expected = run_dir
    assert main(["export", str(run), "--to", "lora", "merged_16bit", "gguf", "--quant", "q8_0", "q4_0"]) == 0
    out = run / "export"
    assert (out / "lora" / "adapter_config.json").exists()
    assert json.loads((out / "merged_16bit" / "config.json").read_text())["dtype"] == "float32"
    merged = AutoModelForCausalLM.from_pretrained(out / "merged_16bit", dtype=torch.float32)
    assert rel_err(logits(merged, IDS), expected) <= 1e-5
    assert {p.name for p in (out / "gguf").iterdir()} == {"model.Q8_0.gguf", "model.Q4_0.gguf", "Modelfile"}
    llm = open_gguf(out / "gguf" / "model.Q8_0.gguf", n_ctx=32, vocab_only=True)
    assert llm.n_vocab() == VOCAB
    llm.close()
    printed = capsys.readouterr().out
    assert "ollama create" in printed and "merged_16bit" in printed


def test_export_cli_errors(tmp_path, capsys):
    assert main(["export", str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--quant", "q9"]) == 2
    assert "quantization_method" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_export_help_lists_methods(capsys):
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    text = capsys.readouterr().out
    for method in ("q8_0", "q4_k_m", "q5_k_m", "q6_k", "q3_k_m", "q2_k", "f16", "bf16", "q4_0"):
        assert f"  {method} " in text


def test_export_demo(tmp_path):
    """The demo's export step on the shipped demo model: llama.cpp's greedy answer from the q8_0 GGUF
    starts with the same tokens as transformers' greedy answer from the model in memory."""
    from velotune import FastLanguageModel
    from velotune.demo import assets_dir
    from velotune.export import export_demo

    if not (assets_dir() / "model.safetensors").exists():
        pytest.skip("demo model not built")
    model, tok = FastLanguageModel.from_pretrained(assets_dir(), dtype=torch.float32, fast=False)
    result = export_demo(model, tok, tmp_path)
    assert (result["merged_dir"] / "model.safetensors").exists()
    assert result["gguf_path"].name == "model.Q8_0.gguf" and result["modelfile"].exists()
    ids = tok.apply_chat_template(
        [{"role": "user", "content": result["question"]}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
    expected = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert expected and result["answer"].startswith(expected)


def test_export_demo_without_llama_cpp_still_exports(tmp_path, monkeypatch):
    """Without llama-cpp-python the demo's export writes the same files and says it did not read them back."""
    from velotune import FastLanguageModel
    from velotune.demo import assets_dir
    from velotune.export import demo as export_demo_module

    monkeypatch.setattr(export_demo_module, "llama_cpp_available", lambda: False)
    model, tok = FastLanguageModel.from_pretrained(assets_dir(), dtype=torch.float32, fast=False)
    result = export_demo_module.export_demo(model, tok, tmp_path, question="Which continent is Chile in?")
    assert result["answer"] is None and result["question"] == "Which continent is Chile in?"
    assert (result["merged_dir"] / "model.safetensors").exists() and result["gguf_path"].stat().st_size > 0


def test_export_cli_push_to_hub(run_dir, monkeypatch, tmp_path):
    from helpers import RecordingHfApi

    from velotune.export import hub

    apis = []
    monkeypatch.setattr(
        hub, "default_api", lambda token: apis.append(RecordingHfApi(tmp_path / f"hub{len(apis)}")) or apis[-1]
    )
    run, _ = run_dir
    assert (
        main(
            [
                "export",
                str(run),
                "--to",
                "lora",
                "gguf",
                "-o",
                str(tmp_path / "o"),
                "--push-to-hub",
                "me/run1",
                "--token",
                "t",
            ]
        )
        == 0
    )
    uploads = [call for api in apis for name, call in api.calls if name == "upload_folder"]
    assert sorted(u["path_in_repo"] for u in uploads) == ["gguf", "lora"]
    assert {u["token"] for u in uploads} == {"t"} and {u["repo_id"] for u in uploads} == {"me/run1"}
    assert main(["export", str(run), "--push-to-hub", "bad id!"]) == 2  # refused before any work


def test_export_cli_full_model_folder(tmp_path):
    """A full fine-tuning output (no adapter) exports too; asking it for 'lora' is a clear error."""
    from transformers import AutoModelForCausalLM

    from mini import mini_model

    base = save_mini_model("qwen2", tmp_path)
    assert main(["export", str(base), "--to", "merged_16bit", "-o", str(tmp_path / "o")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "o" / "merged_16bit", dtype=torch.float32)
    assert torch.equal(logits(merged, IDS), logits(mini_model("qwen2"), IDS))
    assert main(["export", str(base), "--to", "lora", "-o", str(tmp_path / "o2")]) == 2
