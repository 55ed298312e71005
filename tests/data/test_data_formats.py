"""standardize_data_formats (Unsloth's helper): ShareGPT and other key / role spellings become role/content
messages with system / user / assistant roles; unknown roles are a clear error naming the row."""

from __future__ import annotations

import pytest
from datasets import Dataset

from velotune.data.formats import standardize_data_formats
from velotune.errors import DataError

WANT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello."},
]


def conversations(rows) -> Dataset:
    return Dataset.from_dict({"conversations": rows})


def test_sharegpt_keys_and_roles():
    ds = conversations(
        [
            [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": "Hi!"},
                {"from": "gpt", "value": "Hello."},
            ]
        ]
    )
    assert standardize_data_formats(ds)[0]["conversations"] == WANT


def test_other_keys_are_inferred_and_roles_aliased():
    """Keys neither role/content nor from/value: the key with fewer distinct values holds the role."""
    rows = [
        [{"speaker": "input", "text": f"question {i}"}, {"speaker": "output", "text": f"answer {i}"}] for i in range(3)
    ]
    out = standardize_data_formats(conversations(rows), aliases_for_user=["input"], aliases_for_assistant=["output"])
    assert out[2]["conversations"] == [
        {"role": "user", "content": "question 2"},
        {"role": "assistant", "content": "answer 2"},
    ]
    upper = conversations([[{"role": "User", "content": "Hi!"}, {"role": "ASSISTANT", "content": "Hello."}]])
    assert standardize_data_formats(upper)[0]["conversations"] == WANT[1:]  # case-insensitive aliases


def test_role_content_data_and_processors():
    class Processor:  # a multimodal processor holds its text tokenizer as .tokenizer
        tokenizer = object()

    out = standardize_data_formats(conversations([WANT]), tokenizer=Processor())
    assert out[0]["conversations"][1] == {"role": "user", "content": [{"type": "text", "text": "Hi!"}]}
    assert standardize_data_formats(conversations([WANT]))[0]["conversations"] == WANT


def test_unknown_role_names_the_row_and_data_without_conversations_is_returned_as_is():
    rows = [WANT, [{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}]]
    with pytest.raises(DataError, match=r"row 1 has role 'tool', which is in no alias list.*aliases_for_user"):
        standardize_data_formats(conversations(rows))
    plain = Dataset.from_dict({"text": ["a", "b"]})
    assert standardize_data_formats(plain) is plain
    with pytest.raises(DataError, match="cannot tell the role and content keys"):
        standardize_data_formats(conversations([[{"a": "x", "b": "y", "c": "z"}]]))
