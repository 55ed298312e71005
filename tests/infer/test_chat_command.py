"""`velotune chat`: a scripted conversation through stdin, replies checked against stock generate."""

import io
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import torch

from mini import mini_model, save_mini_model
from test_generate import add_lora
from velotune.infer import stop_token_ids
from velotune.infer.command import decoding, run


def expected_reply(model, tok, messages, max_new_tokens):
    """What greedy stock generate answers to `messages` (stop tokens as the chat command sets them)."""
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = type(model).generate(
        model,
        **enc,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=stop_token_ids(tok, model),
        pad_token_id=tok.pad_token_id,
    )
    return tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def test_stop_tokens_include_the_template_end_of_turn():
    from mini import mini_tokenizer

    tok = mini_tokenizer()
    ids = stop_token_ids(tok, mini_model("llama"))
    assert tok.convert_tokens_to_ids("<|end|>") in ids and tok.eos_token_id in ids


def test_chat_merged_folder_keeps_history(tmp_path, monkeypatch, capsys):
    from mini import mini_tokenizer

    path = save_mini_model("gemma2", tmp_path)
    tok, model = mini_tokenizer(), mini_model("gemma2").eval()
    first = expected_reply(model, tok, [{"role": "user", "content": "Hello there"}], 6)
    second = expected_reply(
        model,
        tok,
        [
            {"role": "user", "content": "Hello there"},
            {"role": "assistant", "content": first},
            {"role": "user", "content": "And then?"},
        ],
        6,
    )
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello there\n\nAnd then?\n/exit\nnever read\n"))
    args = Namespace(
        model_dir=str(path),
        max_new_tokens=6,
        temperature=0.0,
        top_p=0.9,
        repetition_penalty=1.0,
        system=None,
        load_in_4bit=False,
        dtype="float32",
        max_seq_length=256,
    )
    assert run(args) == 0
    out = capsys.readouterr().out
    assert first.strip() and first.strip() in out
    assert second.strip() in out.split(first.strip(), 1)[1]


def test_chat_adapter_folder_through_the_cli(tmp_path):
    """End to end in a subprocess: `velotune chat ADAPTER_DIR` loads base + adapter, answers, /reset, /exit."""
    from mini import mini_tokenizer

    base = save_mini_model("llama", tmp_path)
    peft_model = add_lora(mini_model("llama"))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    (adapter / "adapter_config.json").write_text(
        (adapter / "adapter_config.json")
        .read_text()
        .replace('"base_model_name_or_path": null', f'"base_model_name_or_path": "{base}"')
    )
    tok = mini_tokenizer()
    reply = expected_reply(peft_model, tok, [{"role": "user", "content": "Hi"}], 8)
    script = "Hi\n/reset\nHi\n/exit\n"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[2] / "src"))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "velotune.cli",
            "chat",
            str(adapter),
            "--max-new-tokens",
            "8",
            "--temperature",
            "0",
            "--dtype",
            "float32",
        ],
        input=script,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "(conversation reset)" in proc.stdout
    assert reply.strip() and proc.stdout.count(reply.strip()) == 2, (reply, proc.stdout)


def test_chat_bad_folder_is_a_clear_error(tmp_path, capsys):
    from velotune.cli import main

    assert main(["chat", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    assert main(["chat", str(tmp_path / "adapter")]) == 2
    assert "has no adapter_model.safetensors" in capsys.readouterr().err
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert main(["chat", str(tmp_path / "adapter")]) == 2
    assert "base_model_name_or_path" in capsys.readouterr().err


def test_chat_is_greedy_unless_sampling_is_asked_for():
    from transformers import GenerationConfig

    model = mini_model("llama")
    model.generation_config = GenerationConfig(do_sample=False)
    assert decoding(model, None, None) == (dict(do_sample=False), "greedy")
    assert decoding(model, 0.0, 0.5)[0] == dict(do_sample=False)
    assert decoding(model, 0.7, None) == (
        dict(do_sample=True, temperature=0.7, top_p=1.0),
        "sampling at temperature 0.7, top-p 1.0",
    )
    assert decoding(model, None, 0.9)[0] == dict(do_sample=True, temperature=1.0, top_p=0.9)
    model.generation_config = GenerationConfig(do_sample=True, temperature=0.6, top_p=0.95)
    assert decoding(model, None, None) == (
        dict(do_sample=True),  # generate reads the model's own temperature and top_p
        "sampling at temperature 0.6, top-p 0.95 (the model's generation_config)",
    )
    assert decoding(model, 0.0, None)[0] == dict(do_sample=False)
    assert decoding(model, 1.2, None)[0] == dict(do_sample=True, temperature=1.2)


def test_chat_defaults_are_greedy_at_the_native_context(tmp_path, monkeypatch, capsys):
    """No --temperature, no --max-seq-length: the stock greedy reply, RoPE as trained, and the start line says so."""
    from mini import mini_tokenizer

    from velotune.cli import main

    path = save_mini_model("mistral", tmp_path)  # default RoPE, 256 positions
    tok, model = mini_tokenizer(), mini_model("mistral").eval()
    want = expected_reply(model, tok, [{"role": "user", "content": "Hello there"}], 6)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello there\n/exit\n"))
    assert main(["chat", str(path), "--max-new-tokens", "6", "--dtype", "float32"]) == 0
    out = capsys.readouterr()
    assert "greedy, 256 positions" in out.out.splitlines()[0]
    assert want.strip() and want.strip() in out.out
    assert "RoPE" not in out.err
