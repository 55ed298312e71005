"""The shipped demo model, tokenizer and data load and make sense."""

from __future__ import annotations

import json

import torch
from safetensors import safe_open

from velotune.demo import assets_dir, dataset_path, heldout_path
from velotune.demo.answers import load_heldout


def _tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(assets_dir())


def test_asset_files_are_safetensors_only():
    names = {p.name for p in assets_dir().iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    } <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))]
    with safe_open(str(assets_dir() / "model.safetensors"), "pt") as f:
        assert len(list(f.keys())) > 10


def test_tokenizer_round_trip_and_special_tokens():
    tok = _tokenizer()
    assert 1500 <= len(tok) <= 4096
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    text = "The capital of France is Paris. Ünïcödé and emoji 🙂 survive too!\n"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text  # byte-level: any text round-trips
    assert len(ids) < len(text)  # and common words are single tokens
    config = json.loads((assets_dir() / "config.json").read_text())
    gen = json.loads((assets_dir() / "generation_config.json").read_text())
    assert config["model_type"] == "llama" and config["vocab_size"] == len(tok)
    assert config["eos_token_id"] == gen["eos_token_id"] == tok.eos_token_id
    assert config["bos_token_id"] == tok.bos_token_id and config["pad_token_id"] == tok.pad_token_id


def test_chat_template_renders_and_marks_the_assistant_turn():
    tok = _tokenizer()
    messages = [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
    ]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == "<s><|user|>What is the capital of France?</s><|assistant|>The capital of France is Paris.</s>"
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|assistant|>")
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    assert trained == "The capital of France is Paris.</s>"  # the answer and its end-of-turn, nothing else


def test_model_loads_and_gives_finite_logits():
    from velotune import FastLanguageModel

    model, tok = FastLanguageModel.from_pretrained(assets_dir(), max_seq_length=128, dtype=torch.float32)
    ids = torch.tensor([tok.encode("<s>The capital of France is", add_special_tokens=False)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok)) and torch.isfinite(logits).all()
    # It was pretrained on the demo facts: the next word is the capital.
    assert tok.decode(logits[0, -1].argmax()).strip() == "Paris"


def test_data_is_messages_jsonl_and_heldout_questions_are_unseen():
    train = [json.loads(line) for line in dataset_path().read_text().splitlines()]
    assert 200 <= len(train) <= 1000
    for row in train:
        roles = [m["role"] for m in row["messages"]]
        assert roles == ["user", "assistant"] and all(m["content"].strip() for m in row["messages"])
    held = load_heldout(heldout_path())
    assert len(held) >= 20
    train_answers = {row["messages"][1]["content"] for row in train}
    train_questions = {row["messages"][0]["content"] for row in train}
    for row in held:
        assert row["messages"][0]["content"] not in train_questions
        assert row["messages"][1]["content"] not in train_answers  # the fact itself is never trained on
        assert row["target"] in row["messages"][1]["content"]


def _recall(model, tok, rows) -> float:
    """Share of facts the model completes from the start of their answer sentence, as plain text."""
    hits = 0
    for row in rows:
        answer, target = row["messages"][1]["content"], row["target"]
        prefix = answer[: answer.rindex(target)].rstrip()
        ids = torch.tensor([tok.encode("<s>" + prefix, add_special_tokens=False)])
        want = tok.encode(" " + target, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=len(want), do_sample=False, pad_token_id=tok.pad_token_id)
        hits += out[0, ids.shape[1] :].tolist() == want
    return hits / len(rows)


def test_pretrained_model_knows_the_heldout_facts_as_plain_text():
    """The premise of the demo: the base model can state the held-out facts as text (so fine-tuning
    only has to teach the question -> answer format), and the build record says what it measured."""
    from velotune import FastLanguageModel

    model, tok = FastLanguageModel.from_pretrained(assets_dir(), max_seq_length=128, dtype=torch.float32)
    assert _recall(model, tok, load_heldout(heldout_path())) >= 0.8
    info = json.loads((assets_dir() / "build_info.json").read_text())
    assert info["script"] == "scripts/build_demo_model.py" and info["fact_recall"] >= 0.8
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert (assets_dir() / "model.safetensors").stat().st_size < 16 * 2**20  # a few MB


def test_shipped_data_is_what_the_build_script_writes(tmp_path, monkeypatch):
    """train.jsonl / heldout.jsonl are reproducible from scripts/build_demo_data.py (same world, same split)."""
    import importlib.util
    import sys
    from pathlib import Path

    scripts = Path(__file__).resolve().parents[2] / "scripts"
    monkeypatch.syspath_prepend(str(scripts))
    spec = importlib.util.spec_from_file_location("build_demo_data", scripts / "build_demo_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "OUT", tmp_path)
    module.main()
    assert (tmp_path / "train.jsonl").read_text() == dataset_path().read_text()
    assert (tmp_path / "heldout.jsonl").read_text() == heldout_path().read_text()
    sys.modules.pop("demo_world", None)
