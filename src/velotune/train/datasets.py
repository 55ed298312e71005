"""From `cfg.data` to the datasets a TRL trainer takes, with a DataReport of every row not used as given.

    train_ds, eval_ds, report = prepare_datasets(cfg, tokenizer)

- sft + messages/sharegpt/alpaca: velotune.data's `tokenize_conversations` (chat template, response-only
  labels, long rows truncated or skipped) -> input_ids + labels, which SFTTrainer uses as they are.
- sft + text (continued pretraining): every row's text + EOS, concatenated and cut into blocks of
  max_seq_length tokens, all tokens trained.
- dpo / orpo + preference: velotune.data's `validate_preference_rows`; TRL tokenizes prompt/chosen/rejected.

The format is detected from the columns when `data.format` is auto.
"""

from __future__ import annotations

from velotune.errors import ConfigError, DataError

PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected")
CONVERSATION_COLUMNS = ("messages", "conversations", "conversation")
_NEEDS = {  # format -> (column sets, any of which is enough; what to tell the user)
    "messages": (
        [{c} for c in CONVERSATION_COLUMNS] + [{"prompt", "completion"}],
        "'messages' / 'conversations', or 'prompt' + 'completion'",
    ),
    "sharegpt": ([{c} for c in CONVERSATION_COLUMNS], "'conversations' (from/value) or 'messages'"),
    "alpaca": ([{"instruction", "output"}], "'instruction' and 'output' (and optionally 'input')"),
    "preference": ([{"chosen", "rejected"}], "'prompt', 'chosen' and 'rejected'"),
}


def detect_format(columns: list[str], text_field: str = "text") -> str:
    if {"chosen", "rejected"} <= set(columns):
        return "preference"
    if any(c in columns for c in CONVERSATION_COLUMNS) or {"prompt", "completion"} <= set(columns):
        return "messages"
    if {"instruction", "output"} <= set(columns):
        return "alpaca"
    if text_field in columns:
        return "text"
    raise DataError(
        f"cannot tell the data format from the columns {columns}: expected messages / conversations "
        f"(chat), instruction/input/output (alpaca), prompt/chosen/rejected (preference) or "
        f"{text_field!r} (raw text); set data.format"
    )


def check_format(fmt: str, columns: list[str], path: str, text_field: str = "text") -> None:
    """An explicit data.format must match the file's columns (rows are then read by velotune.data)."""
    sets, wanted = _NEEDS.get(fmt, ([{text_field}], repr(text_field)))
    if not any(s <= set(columns) for s in sets):
        raise DataError(f"data.format is {fmt!r} but {path} has columns {columns}; {fmt} data needs {wanted}")


def tokenize_text(
    dataset, tokenizer, *, max_seq_length: int, text_field: str = "text", on_bad: str = "skip", report=None
):
    """Continued pretraining: concatenate `text + eos` of all rows, cut into max_seq_length blocks.

    Returns (Dataset with input_ids and labels [= input_ids], DataReport). Rows without a text string
    are reported as missing_field, blank rows as empty (on_bad and report: as in
    velotune.data.prepare.tokenize_conversations). The last block may be shorter; a final block of
    one token (nothing to predict) is dropped.
    """
    from datasets import Dataset

    from velotune.data.prepare import load_with_report
    from velotune.data.report import check_on_bad

    check_on_bad(on_bad)
    dataset, report = load_with_report(dataset, report)
    already = report.rows_skipped()
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for i, row in enumerate(dataset):
        if i in already:
            continue
        text = row.get(text_field)
        if not isinstance(text, str):
            report.add("missing_field", i, f"row {i}: no {text_field!r} string")
            continue
        if not text.strip():
            report.add("empty", i, f"row {i}: blank text")
            continue
        stream.extend(tokenizer(text, add_special_tokens=True)["input_ids"])
        if eos is not None:
            stream.append(eos)
    blocks = [stream[i : i + max_seq_length] for i in range(0, len(stream), max_seq_length)]
    blocks = [b for b in blocks if len(b) > 1]
    report.raise_if_bad(on_bad)
    report.raise_if_empty()
    return Dataset.from_dict({"input_ids": blocks, "labels": [list(b) for b in blocks]}), report


def _prepare_one(cfg, tokenizer, path: str, progress: bool):
    from velotune.data.prepare import load_with_report

    data = cfg.data
    raw, loaded = load_with_report(path)  # rows unreadable as text (not UTF-8) are already counted in `loaded`
    if loaded.total and loaded.num_skipped == loaded.total:  # nothing readable: say so before guessing a format
        loaded.raise_if_bad(data.on_bad, what=f"data file {path}")
        loaded.raise_if_empty()
    columns = list(raw.column_names)
    fmt = data.format if data.format != "auto" else detect_format(columns, data.text_field)
    check_format(fmt, columns, path, data.text_field)
    if cfg.method in ("dpo", "orpo"):
        if fmt != "preference":
            raise ConfigError(
                f"data.path: method {cfg.method} needs prompt/chosen/rejected columns; "
                f"{path} has {list(raw.column_names)}"
            )
        from velotune.data.prepare import validate_preference_rows

        ds, report = validate_preference_rows(
            raw,
            max_seq_length=cfg.model.max_seq_length,
            on_long=data.on_long,
            tokenizer=tokenizer,
            progress=progress,
            report=loaded,
        )
    elif fmt == "preference":
        raise ConfigError(f"data.path: {path} holds preference pairs (prompt/chosen/rejected): use method dpo or orpo")
    elif fmt == "text":
        ds, report = tokenize_text(
            raw, tokenizer, max_seq_length=cfg.model.max_seq_length, text_field=data.text_field, report=loaded
        )
    else:
        from velotune.data.prepare import tokenize_conversations

        ds, report = tokenize_conversations(
            raw,
            tokenizer,
            max_seq_length=cfg.model.max_seq_length,
            on_long=data.on_long,
            train_on=data.train_on,
            progress=progress,
            report=loaded,
        )
    report.raise_if_bad(data.on_bad, what=f"data file {path}")  # the rows were counted with on_bad="skip"
    report.raise_if_empty()
    return ds, report, fmt


def prepare_datasets(cfg, tokenizer, progress: bool = True):
    """(train dataset, eval dataset or None, DataReport of the training file, detected format)."""
    train_ds, report, fmt = _prepare_one(cfg, tokenizer, cfg.data.path, progress)
    eval_ds = None
    if cfg.data.eval_path:
        eval_ds, _, _ = _prepare_one(cfg, tokenizer, cfg.data.eval_path, progress)
    if cfg.data.packing:
        from velotune.data.packing import pack_dataset

        train_ds = pack_dataset(train_ds, cfg.model.max_seq_length)
        if eval_ds is not None:
            eval_ds = pack_dataset(eval_ds, cfg.model.max_seq_length)
    return train_ds, eval_ds, report, fmt
