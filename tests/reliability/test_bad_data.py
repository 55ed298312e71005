"""`velotune train` on data with rows that are not UTF-8 or whose turns are out of order: counted and left out
(the summary names them), or refused in one line with `data.on_bad: raise`; never trained. A chat template
whose tokens the tokenizer lacks (chatml on the mini model) grows the embeddings and trains."""

from __future__ import annotations

import json

from bad_input_harness import assert_refused, run_cli, toy_rows, write_config

LATIN1 = json.dumps(
    {"messages": [{"role": "user", "content": "Caf\u00e9?"}, {"role": "assistant", "content": "Oui."}]},
    ensure_ascii=False,
).encode("latin-1")
ASSISTANT_FIRST = json.dumps(
    {
        "messages": [
            {"role": "assistant", "content": "Hi."},
            {"role": "user", "content": "?"},
            {"role": "assistant", "content": "Hello."},
        ]
    }
).encode()
TWO_USERS = json.dumps(
    {
        "messages": [
            {"role": "user", "content": "a"},
            {"role": "user", "content": "b"},
            {"role": "assistant", "content": "c"},
        ]
    }
).encode()
MID_SYSTEM = json.dumps(
    {
        "messages": [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "system", "content": "Now be rude."},
            {"role": "user", "content": "c"},
            {"role": "assistant", "content": "d"},
        ]
    }
).encode()


def bad_file(tmp_path):
    rows = toy_rows()
    path = tmp_path / "train.jsonl"
    # rows: 0 ok, 1 not UTF-8, 2 ok, 3 assistant first, 4 two users, 5 system mid-conversation, 6 ok
    path.write_bytes(b"\n".join([rows[0], LATIN1, rows[1], ASSISTANT_FIRST, TWO_USERS, MID_SYSTEM, rows[2]]) + b"\n")
    return path


def test_bad_rows_are_skipped_and_counted(tmp_path):
    r = run_cli("train", write_config(tmp_path, bad_file(tmp_path)))
    assert r.returncode == 0, r.err[-3000:]
    line = next(x for x in r.out.splitlines() if x.startswith("data ("))
    assert "7 rows: 3 kept (0 truncated), 4 skipped" in line
    assert "not_utf8 (1): row 1 [e.g. row 1: not UTF-8 (byte 0xe9" in line and "of line 2)" in line
    assert "role_order (3): rows 3, 4, 5" in line
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["data_report"]["counts"] == {"not_utf8": 1, "role_order": 3}


def test_on_bad_raise_refuses_in_one_line_before_training(tmp_path):
    r = run_cli("train", write_config(tmp_path, bad_file(tmp_path), on_bad="raise"), "--no-progress")
    assert_refused(
        r,
        "train",
        "train.jsonl: 4 of 7 rows unusable",
        "not_utf8 (1): row 1",
        "role_order (3): rows 3, 4, 5",
        "data.on_bad: skip",
    )
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()


def test_on_bad_takes_only_skip_or_raise(tmp_path):
    data = tmp_path / "ok.jsonl"
    data.write_bytes(b"\n".join(toy_rows()) + b"\n")
    r = run_cli("train", write_config(tmp_path, data, on_bad="ignore"), "--no-progress")
    assert_refused(r, "train", "on_bad")


def test_chatml_on_a_tokenizer_without_its_tokens_trains(tmp_path):
    data = tmp_path / "ok.jsonl"
    data.write_bytes(b"\n".join(toy_rows()) + b"\n")
    r = run_cli("train", write_config(tmp_path, data, chat_template="chatml"), "--no-progress")
    assert r.returncode == 0, r.err[-3000:]
    assert "index out of range" not in r.err
    tok = json.loads((tmp_path / "run" / "tokenizer.json").read_text())
    assert {"<|im_start|>", "<|im_end|>"} <= {t["content"] for t in tok["added_tokens"]}
    # the run's adapter (with the grown embedding rows) loads for chat on the original base
    c = run_cli("chat", tmp_path / "run", "--max-new-tokens", "4", "--temperature", "0", stdin="Hi\n/exit\n")
    assert c.returncode == 0, c.err[-3000:]
    assert "Traceback" not in c.err
