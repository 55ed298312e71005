"""`velotune chat` and `velotune export` with bad arguments, bad stdin and conversations longer than the model:
one line and exit code 2 for a bad argument (before any model loads), the chat goes on otherwise.
(`export -o FILE` is in test_bad_inputs.py.)"""

from __future__ import annotations

import pytest

from bad_input_harness import MINI, assert_refused, run_cli

CHAT_ARGS = [
    (["--max-new-tokens", "-5"], "argument --max-new-tokens: -5 is not a positive whole number"),
    (["--max-new-tokens", "0"], "argument --max-new-tokens: 0 is not a positive whole number"),
    (["--max-new-tokens", "many"], "argument --max-new-tokens: 'many' is not a positive whole number"),
    (["--temperature", "-1"], "argument --temperature: -1 is not a number >= 0"),
    (["--temperature", "nan"], "argument --temperature: 'nan' is not a number >= 0"),
    (["--top-p", "1.5"], "argument --top-p: 1.5 is not a number in (0, 1]"),
    (["--repetition-penalty", "0"], "argument --repetition-penalty: 0 is not a number > 0"),
    (["--max-seq-length", "-1"], "argument --max-seq-length: -1 is not a positive whole number"),
]


@pytest.mark.parametrize("argv,message", CHAT_ARGS, ids=[a[0] + a[1] for a, _ in CHAT_ARGS])
def test_chat_bad_numbers(argv, message):
    assert_refused(run_cli("chat", MINI, *argv, stdin=""), "chat", message)


def test_chat_stdin_that_is_not_utf8_is_refused_and_the_chat_goes_on():
    r = run_cli("chat", MINI, "--max-new-tokens", "4", "--temperature", "0", stdin=b"caf\xe9 \xff\nHello\n/exit\n")
    assert r.returncode == 0, r.err[-3000:]
    assert "Traceback" not in r.err
    assert "(that line is not UTF-8 text: byte 0xe9 at column 4; nothing was sent, type it again)" in r.out
    assert r.out.count(">>> ") == 3  # the bad line, Hello (answered), /exit


def test_a_long_chat_keeps_within_the_models_positions():
    """40 exchanges on a 256-position model: the oldest are left out with a notice, never a traceback."""
    turns = "".join(f"Tell me fact number {i} about the sea, please.\n" for i in range(40))
    r = run_cli(
        "chat", MINI, "--max-new-tokens", "16", "--temperature", "0", "--system", "Be brief.", stdin=turns + "/exit\n"
    )
    assert r.returncode == 0, r.err[-3000:]
    assert "Traceback" not in r.err
    notices = [line for line in r.out.splitlines() if "(context: left out the" in line]
    assert notices and "to fit the model's 256 positions; the system prompt stays" in notices[0]
    assert r.out.count(">>> ") == 41


def test_chat_message_longer_than_the_model_is_refused_and_the_chat_goes_on():
    r = run_cli("chat", MINI, "--max-new-tokens", "4", "--temperature", "0", stdin="word " * 400 + "\nHello\n/exit\n")
    assert r.returncode == 0, r.err[-3000:]
    assert "this model takes 256 positions in all: shorten it)" in r.out and "Traceback" not in r.err


@pytest.mark.parametrize("size", ["banana", "-5GB", "0", "5 parsecs"])
def test_export_bad_shard_size(tmp_path, size):
    line = assert_refused(
        run_cli("export", MINI, "--to", "merged_16bit", f"--max-shard-size={size}", "-o", tmp_path / "out"),
        "export",
        "argument --max-shard-size",
        repr(size),
    )
    assert "5GB, 500MB, 2GiB" in line
    assert not (tmp_path / "out").exists()
