"""Loaders, ShareGPT/alpaca conversion, and the counted report for every kind of bad row."""

from __future__ import annotations

import json
import logging

import datasets
import pytest
from mini import mini_tokenizer

from velotune.data.chat_templates import get_chat_template
from velotune.data.formats import load_dataset_file, standardize_sharegpt, to_messages, to_sharegpt
from velotune.data.prepare import tokenize_conversations, validate_preference_rows
from velotune.errors import ConfigError, DataError

GOOD = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How are you?"}]


@pytest.fixture(scope="module")
def tok(chatml_tok):
    return chatml_tok


def test_each_bad_row_kind_is_counted_and_named(tok):
    rows = [
        {"messages": GOOD},  # 0 ok
        {"messages": [{"role": "user", "content": "Hi"}]},  # 1 no reply -> missing_field
        {"messages": [{"role": "alien", "content": "x"}, GOOD[1]]},  # 2 unknown_role
        {"messages": []},  # 3 empty
        {"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": ""}]},  # 4 empty
        {"messages": GOOD * 10},  # 5 too long -> truncated
        {"messages": [{"role": "user", "content": "The quick brown fox. " * 20}, GOOD[1]]},  # 6 reply cut away
        {"messages": [{"role": "user"}, GOOD[1]]},  # 7 missing content
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "   "}]},  # 8 blank reply
        {"messages": GOOD},  # 9 ok
    ]
    ds, report = tokenize_conversations(rows, tok, max_seq_length=48, on_long="truncate", progress=False)
    assert report.total == 10 and len(ds) == report.num_kept == 3
    assert report.skipped == {
        "missing_field": [1, 7],
        "unknown_role": [2],
        "empty": [3, 4, 8],
        "no_trainable_tokens": [6],
    }
    assert report.truncated == {"too_long": [5]}
    text = report.summary()
    assert "10 rows: 3 kept (1 truncated), 7 skipped" in text
    assert "unknown_role (1): rows 2" in text and "unknown role 'alien'" in text
    assert "no assistant message" in text and "cut the whole reply" in text
    assert all(len(r) <= 48 for r in ds["input_ids"])
    # skip instead of truncate: the long row is dropped, and counted
    _, report = tokenize_conversations(rows, tok, max_seq_length=48, on_long="skip", progress=False)
    assert report.skipped["too_long"] == [5, 6] and not report.truncated


def test_rows_the_template_rejects_are_counted():
    logging.disable(logging.WARNING)
    try:
        tok = get_chat_template(mini_tokenizer(), "mistral")
    finally:
        logging.disable(logging.NOTSET)
    # a template that refuses some content (the turn order is checked before any template sees a row)
    tok.chat_template = (
        "{% for m in messages %}{% if 'FORBIDDEN' in m['content'] %}"
        "{{ raise_exception('no forbidden words') }}{% endif %}"
        "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{{ eos_token }}"
        "{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}{% endfor %}"
    )
    rows = [{"messages": GOOD}, {"messages": [{"role": "user", "content": "FORBIDDEN"}, GOOD[1]]}, {"messages": GOOD}]
    ds, report = tokenize_conversations(rows, tok, max_seq_length=64, progress=False)
    assert len(ds) == 2 and report.skipped == {"template_error": [1]}
    assert "no forbidden words" in report.summary()


def test_labels_are_the_replies(tok):
    ds, report = tokenize_conversations([{"messages": GOOD}], tok, max_seq_length=256, progress=False)
    row = ds[0]
    assert tok.decode([t for t in row["labels"] if t != -100]) == "Hello! How are you?<|im_end|>"
    assert row["attention_mask"] == [1] * len(row["input_ids"])
    ds, _ = tokenize_conversations([{"messages": GOOD}], tok, max_seq_length=256, train_on="all", progress=False)
    assert ds[0]["labels"] == ds[0]["input_ids"]


def test_options_and_empty_results_are_clear_errors(tok):
    with pytest.raises(ConfigError, match="on_long='cut'"):
        tokenize_conversations([{"messages": GOOD}], tok, max_seq_length=64, on_long="cut")
    _, report = tokenize_conversations([{"messages": []}], tok, max_seq_length=64, progress=False)
    with pytest.raises(DataError, match="no usable row left"):
        report.raise_if_empty()
    bare = mini_tokenizer()
    bare.chat_template = None
    with pytest.raises(DataError, match="no chat template"):
        tokenize_conversations([{"messages": GOOD}], bare, max_seq_length=64)
    bare.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(DataError, match="no \\{% generation %\\} markers"):
        tokenize_conversations([{"messages": GOOD}], bare, max_seq_length=64)


def test_preference_rows(tok):
    rows = [
        {"prompt": "Say hi", "chosen": "Hi!", "rejected": "No."},  # 0 ok
        {"prompt": "Say hi", "chosen": "Hi!", "rejected": None},  # 1 missing rejected
        {"prompt": "Say hi", "chosen": "", "rejected": "No."},  # 2 empty
        {"prompt": "Say hi", "chosen": "Same", "rejected": "Same"},  # 3 identical
        {"prompt": "The quick brown fox. " * 20, "chosen": "a", "rejected": "b"},  # 4 too long
        {"prompt": None, "chosen": "Hi!", "rejected": "No."},  # 5 no prompt, plain text
        {"prompt": "Hey", "chosen": "Hello!", "rejected": "Go away."},  # 6 ok
    ]
    ds, report = validate_preference_rows(rows, max_seq_length=40, on_long="skip", tokenizer=tok, progress=False)
    assert report.skipped == {"missing_field": [1, 5], "empty": [2], "identical_pair": [3], "too_long": [4]}
    assert ds["chosen"] == ["Hi!", "Hello!"]
    ds, report = validate_preference_rows(rows, max_seq_length=40, on_long="truncate", tokenizer=tok, progress=False)
    assert report.truncated == {"too_long": [4]} and len(ds) == 3
    conversational = [
        {"chosen": [GOOD[0], GOOD[1]], "rejected": [GOOD[0], {"role": "assistant", "content": "Bye"}]},  # implicit
        {"chosen": [{"role": "wizard", "content": "x"}], "rejected": [GOOD[1]]},  # unknown role
    ]
    ds, report = validate_preference_rows(conversational, max_seq_length=64, tokenizer=tok, progress=False)
    assert report.skipped == {"unknown_role": [1]} and len(ds) == 1
    with pytest.raises(DataError, match="do not share one type per column"):
        validate_preference_rows(rows[:1] + conversational, max_seq_length=64)


def test_to_messages_detects_formats():
    assert to_messages({"messages": GOOD}) == GOOD
    assert (
        to_messages(
            {"conversations": [{"from": "human", "value": "Hi there"}, {"from": "gpt", "value": "Hello! How are you?"}]}
        )
        == GOOD
    )
    assert to_messages({"instruction": "Add", "input": "2 and 2", "output": "4", "system": "Be exact."}) == [
        {"role": "system", "content": "Be exact."},
        {"role": "user", "content": "Add\n\n2 and 2"},
        {"role": "assistant", "content": "4"},
    ]
    assert to_messages({"instruction": "Hi there", "input": "", "output": "Hello! How are you?"}) == GOOD
    assert to_messages({"prompt": "Hi there", "completion": "Hello! How are you?"}) == GOOD
    with pytest.raises(DataError, match="no conversation found.*row has \\['text'\\]"):
        to_messages({"text": "plain"})


def test_standardize_sharegpt_and_to_sharegpt():
    ds = datasets.Dataset.from_list(
        [
            {
                "conversations": [
                    {"from": "system", "value": "S"},
                    {"from": "human", "value": "Q"},
                    {"from": "gpt", "value": "A"},
                ]
            },
            {"conversations": [{"from": "HUMAN", "value": "Q2"}, {"from": "narrator", "value": "?"}]},
        ]
    )
    out = standardize_sharegpt(ds)
    assert out[0]["conversations"] == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A"},
    ]
    assert out[1]["conversations"][1]["role"] == "narrator"  # kept, so tokenize_conversations reports it

    alpaca = datasets.Dataset.from_list(
        [
            {"instruction": "Add", "input": "2 and 2", "output": "4"},
            {"instruction": "Greet", "input": "", "output": "Hi"},
        ]
    )
    conv = to_sharegpt(alpaca, merged_prompt="{instruction}[[\nInput: {input}]]", output_column_name="output")
    assert conv[0]["conversations"] == [
        {"from": "human", "value": "Add\nInput: 2 and 2"},
        {"from": "gpt", "value": "4"},
    ]
    assert conv[1]["conversations"][0]["value"] == "Greet"  # the optional block vanished with its empty field
    assert to_messages(standardize_sharegpt(conv)[1]) == [
        {"role": "user", "content": "Greet"},
        {"role": "assistant", "content": "Hi"},
    ]
    assert len(to_sharegpt(alpaca, conversation_extension=2)[0]["conversations"]) == 4
    with pytest.raises(DataError, match="columns \\['question'\\] not in the data set"):
        to_sharegpt(alpaca, merged_prompt="{question}")


def test_load_dataset_file_formats(tmp_path):
    rows = [{"instruction": "Add", "input": "", "output": "4"}, {"instruction": "Greet", "input": "", "output": "Hi"}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "a.parquet"))
    datasets.Dataset.from_list(rows).to_csv(str(tmp_path / "a.csv"), index=False)
    for name in ("a.json", "a.jsonl", "a.parquet", "a.csv"):
        ds = load_dataset_file(tmp_path / name)
        assert ds.num_rows == 2 and ds[1]["output"] == "Hi", name
    ds = datasets.Dataset.from_list(rows)
    assert load_dataset_file(ds) is ds
    assert load_dataset_file(datasets.DatasetDict({"train": ds})) is ds
    # a list with different keys per row keeps every key (datasets' from_list alone keeps the first row's)
    mixed = load_dataset_file([{"messages": GOOD}, {"instruction": "a", "output": "b"}])
    assert mixed[1]["instruction"] == "a"
    with pytest.raises(DataError, match="does not exist"):
        load_dataset_file(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="unknown data file type '.txt'"):
        (tmp_path / "a.txt").write_text("x")
        load_dataset_file(tmp_path / "a.txt")
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n{not json\n')
    with pytest.raises(DataError, match="could not read bad.jsonl as json"):
        load_dataset_file(tmp_path / "bad.jsonl")
    with pytest.raises(DataError, match="no split 'test'"):
        load_dataset_file(datasets.DatasetDict({"train": ds}), split="test")
