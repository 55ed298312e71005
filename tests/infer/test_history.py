"""What `velotune chat` reads and sends: UTF-8 checks on stdin lines, history trimmed to the context."""

from __future__ import annotations

import io

import pytest
from mini import mini_tokenizer

from velotune.infer.history import MessageTooLong, fit_history, read_user_line


def test_read_user_line_bytes_and_text():
    stream = io.TextIOWrapper(io.BytesIO(b"hello\ncaf\xe9\n\xc3\xa9t\xc3\xa9\n"), encoding="utf-8")
    assert read_user_line(stream) == ("hello\n", None)
    text, problem = read_user_line(stream)
    assert text == "" and problem.startswith("(that line is not UTF-8 text: byte 0xe9 at column 4;")
    assert read_user_line(stream) == ("\u00e9t\u00e9\n", None)
    assert read_user_line(stream) == (None, None)
    # a text stream holding lone surrogates (a terminal decoding with surrogateescape)
    text, problem = read_user_line(io.StringIO("ab" + b"\xff".decode("utf-8", "surrogateescape") + "\n"))
    assert text == "" and "byte 0xff at column 3" in problem


def _history(n):
    out = []
    for i in range(n):
        out += [{"role": "user", "content": f"question {i} " * 3}, {"role": "assistant", "content": f"answer {i} " * 3}]
    return out + [{"role": "user", "content": "last question"}]


def test_fit_history_drops_the_oldest_exchanges_and_keeps_the_system_prompt():
    tok = mini_tokenizer()
    history = _history(30)
    enc, dropped, budget = fit_history(tok, "Be brief.", history, limit=128, max_new_tokens=40)
    n = enc["input_ids"].shape[1]
    assert dropped > 0 and n + 40 <= 128 and budget == 40
    assert history[-1]["content"] == "last question" and history[0]["role"] == "user"
    assert history[0]["content"] == f"question {dropped} " * 3  # exactly the oldest ones went
    text = tok.decode(enc["input_ids"][0])
    assert text.count("Be brief.") == 1 and "question 0 " not in text
    # one more dropped exchange would not have been needed: the previous one did not fit
    longer = _history(30)[2 * (dropped - 1) :]
    n_longer = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}] + longer,
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    assert n_longer["input_ids"].shape[1] + 40 > 128


def test_fit_history_caps_the_reply_and_refuses_a_message_that_cannot_fit():
    tok = mini_tokenizer()
    history = [{"role": "user", "content": "word " * 8}]
    enc, dropped, budget = fit_history(tok, None, history, limit=100, max_new_tokens=500)
    assert dropped == 0 and budget == 100 - enc["input_ids"].shape[1] > 0
    with pytest.raises(MessageTooLong) as e:
        fit_history(tok, None, [{"role": "user", "content": "word " * 300}], limit=100, max_new_tokens=5)
    assert e.value.limit == 100 and e.value.tokens >= 100
