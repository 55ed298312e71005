"""DataReport counting of rows that are not UTF-8 or whose turns are out of order, and on_bad.

Every unusable row is counted with its row number and reason, left out of the tokenized data with
on_bad="skip", and named in a one-line DataError with on_bad="raise": never trained.
"""

from __future__ import annotations

import json

import pytest

from velotune.data.formats import load_dataset_file
from velotune.data.prepare import check_role_order, load_with_report, tokenize_conversations, validate_preference_rows
from velotune.data.report import DataReport
from velotune.errors import ConfigError, DataError

U = {"role": "user", "content": "Hi there"}
A = {"role": "assistant", "content": "Hello! How are you?"}
S = {"role": "system", "content": "Be brief."}


@pytest.fixture(scope="module")
def tok(chatml_tok):
    return chatml_tok


def write_jsonl(path, rows: list) -> None:
    """rows: dicts (written as JSON) or raw bytes (written as they are, one line each); b"" is a blank line."""
    with open(path, "wb") as f:
        for r in rows:
            f.write((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n")


def latin1_row() -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": "caf\u00e9"}, A]}, ensure_ascii=False).encode("latin-1")


ORDER_CASES = [
    ([U, A], None),
    ([S, U, A], None),
    ([S, U, A, U, A], None),
    ([U, A, U], None),  # ends on the user's side: context, not trained
    ([A, U, A], "starts with an assistant turn"),
    ([S, A], "starts with an assistant turn"),
    ([U, U, A], "both user turns"),
    ([U, A, A], "both assistant turns"),
    ([U, A, S, U, A], "system turn in the middle"),
    ([S, S, U, A], "system turn in the middle"),
]


@pytest.mark.parametrize("msgs,problem", ORDER_CASES)
def test_check_role_order(msgs, problem):
    if problem is None:
        check_role_order(msgs)
    else:
        with pytest.raises(DataError, match=problem) as e:
            check_role_order(msgs)
        assert e.value.reason == "role_order"


def test_role_order_violations_are_counted_and_never_trained(tok):
    rows = [
        {"messages": [U, A]},  # 0 ok
        {"messages": [A, U, A]},  # 1 assistant first
        {"messages": [U, U, A]},  # 2 two user turns in a row
        {"messages": [U, A, S, U, A]},  # 3 system mid-conversation
        {"messages": [U, {"role": "tool", "content": "x"}, A]},  # 4 unknown role
        {"messages": [S, U, A]},
    ]  # 5 ok
    ds, report = tokenize_conversations(rows, tok, max_seq_length=64, progress=False)
    assert report.skipped == {"role_order": [1, 2, 3], "unknown_role": [4]}
    assert len(ds) == report.num_kept == 2
    assert report.summary().startswith("6 rows: 2 kept (0 truncated), 4 skipped")
    assert "role_order (3): rows 1, 2, 3" in report.summary()
    with pytest.raises(DataError) as e:
        tokenize_conversations(rows, tok, max_seq_length=64, on_bad="raise", progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "4 of 6 rows unusable" in msg
    assert "role_order (3): rows 1, 2, 3" in msg and "unknown_role (1): row 4" in msg and "on_bad='skip'" in msg


def test_non_utf8_jsonl_rows_are_counted_with_their_line(tok, tmp_path):
    path = tmp_path / "train.jsonl"
    bad2 = b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}'
    write_jsonl(path, [{"messages": [U, A]}, latin1_row(), b"", {"messages": [U, A]}, bad2, {"messages": [S, U, A]}])
    col1, col2 = latin1_row().index(b"\xe9") + 1, bad2.index(b"\xff") + 1
    ds, report = tokenize_conversations(str(path), tok, max_seq_length=64, progress=False)
    # the blank line is not a row: rows 1 and 3 are lines 2 and 5
    assert report.total == 5 and report.skipped == {"not_utf8": [1, 3]}
    assert len(ds) == 3
    assert report.details_for("not_utf8") == [
        f"row 1: not UTF-8 (byte 0xe9 at column {col1} of line 2)",
        f"row 3: not UTF-8 (byte 0xff at column {col2} of line 5)",
    ]
    with pytest.raises(DataError, match=r"train.jsonl: 2 of 5 rows unusable: not_utf8 \(2\): rows 1, 3"):
        tokenize_conversations(str(path), tok, max_seq_length=64, on_bad="raise", progress=False)
    # a plain load (no report to count into) names the rows instead of returning undecodable text
    with pytest.raises(DataError, match=r"2 rows are not UTF-8: rows 1 \(line 2\), 3 \(line 5\)"):
        load_dataset_file(path)
    # a load with a report keeps every other row at its index, the bad ones as empty rows
    ds, report = load_with_report(path)
    assert len(ds) == 5 and ds[1]["messages"] is None and ds[3]["messages"] is None
    assert ds[2]["messages"] == [U, A] and ds[4]["messages"] == [S, U, A]
    assert report.rows_skipped() == {1, 3}


def test_non_utf8_json_and_csv_files_are_refused_with_the_line(tmp_path):
    j = tmp_path / "d.json"
    j.write_bytes(b'[{"text": "ok"},\n {"text": "caf\xe9"}]')
    with pytest.raises(DataError, match=r"d.json is not UTF-8: line 2 has byte 0xe9"):
        load_dataset_file(j)
    c = tmp_path / "d.csv"
    c.write_bytes(b"text\nok\nbad \xff\n")
    with pytest.raises(DataError, match=r"d.csv is not UTF-8: line 3 has byte 0xff"):
        load_dataset_file(c)


def test_a_file_with_no_utf8_row_at_all(tok, tmp_path):
    path = tmp_path / "all_bad.jsonl"
    write_jsonl(path, [latin1_row(), latin1_row()])
    with pytest.raises(DataError, match=r"all_bad.jsonl: no row is UTF-8 \(2 rows; e.g. row 0: byte 0xe9"):
        tokenize_conversations(str(path), tok, max_seq_length=64, progress=False)


def test_preference_rows_keep_the_turn_order(tok):
    rows = [
        {"prompt": [U], "chosen": [A], "rejected": [{"role": "assistant", "content": "No."}]},  # 0 ok
        {"prompt": [U], "chosen": [U, A], "rejected": [A]},  # 1 two users
        {"chosen": [A, U], "rejected": [A]},  # 2 assistant 1st
        {"prompt": [S, U], "chosen": [A], "rejected": [{"role": "assistant", "content": "Go."}]},  # 3 ok
        {"prompt": [U, A], "chosen": [A], "rejected": [{"role": "assistant", "content": "Go."}]},
    ]  # 4 A, A
    ds, report = validate_preference_rows(rows, max_seq_length=64, progress=False)
    assert report.skipped == {"role_order": [1, 2, 4]} and len(ds) == 2
    with pytest.raises(DataError, match=r"role_order \(3\): rows 1, 2, 4"):
        validate_preference_rows(rows, max_seq_length=64, on_bad="raise", progress=False)


def test_empty_and_too_long_rows_follow_on_bad(tok):
    rows = [{"messages": [U, A]}, {"messages": []}, {"messages": [U, A] * 10}]
    _, report = tokenize_conversations(rows, tok, max_seq_length=48, on_long="skip", progress=False)
    assert report.skipped == {"empty": [1], "too_long": [2]}
    with pytest.raises(DataError, match=r"empty \(1\): row 1 .*too_long \(1\): row 2"):
        tokenize_conversations(rows, tok, max_seq_length=48, on_long="skip", on_bad="raise", progress=False)
    # truncated rows are kept (on_long says so), so on_bad="raise" does not stop on them
    ds, report = tokenize_conversations(rows[::2], tok, max_seq_length=48, on_bad="raise", progress=False)
    assert report.truncated == {"too_long": [1]} and len(ds) == 2


def test_on_bad_is_validated():
    with pytest.raises(ConfigError, match="on_bad='ignore'"):
        DataReport(total=1).raise_if_bad("ignore")
    with pytest.raises(ConfigError, match="on_bad='drop'"):
        tokenize_conversations([{"messages": [U, A]}], None, max_seq_length=64, on_bad="drop")
