"""Rows -> token ids and labels, with every unusable row counted (never a silent drop).

    ds, report = tokenize_conversations(raw, tokenizer, max_seq_length=2048, on_long="truncate")
    print(report.summary()); report.raise_if_empty()
    # ds columns: input_ids [T], attention_mask [T], labels [T] (-100 outside assistant replies)

Assistant tokens come from the chat template's `{% generation %}` markers
(`return_assistant_tokens_mask`), so they are exact: no text search. velotune's templates
(get_chat_template) all carry the markers.
"""

from __future__ import annotations

import logging

from velotune.data.formats import RowError, normalize_messages, to_messages
from velotune.data.masking import require_chat_template
from velotune.data.report import DataReport, check_on_bad
from velotune.errors import ConfigError, DataError

log = logging.getLogger("velotune")


def _check_options(on_long: str, train_on: str | None = None, on_bad: str = "skip") -> None:
    check_on_bad(on_bad)
    if on_long not in ("truncate", "skip"):
        raise ConfigError(f"on_long={on_long!r}: use 'truncate' or 'skip'")
    if train_on is not None and train_on not in ("responses", "all"):
        raise ConfigError(f"train_on={train_on!r}: use 'responses' or 'all'")


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="row", leave=False)


def check_role_order(msgs: list[dict]) -> None:
    """RowError("role_order") unless the turns read: [system], user, assistant, user, assistant, ...

    A system message may only come first; after it the user speaks first and the two sides alternate.
    (A conversation may end on either side; a trailing user turn is context that is not trained on.)
    """
    for k, m in enumerate(msgs):
        role = m["role"]
        if role == "system":
            if k:
                raise RowError(
                    "role_order",
                    f"message {k} is a system turn in the middle of the conversation "
                    "(a system message may only come first)",
                )
            continue
        prev = msgs[k - 1]["role"] if k else "system"
        if prev == "system" and role != "user":
            raise RowError("role_order", f"message {k}: the conversation starts with an {role} turn, not the user's")
        if prev == role:
            raise RowError("role_order", f"messages {k - 1} and {k} are both {role} turns (turns must alternate)")


def _validate_messages(msgs: list[dict]) -> None:
    check_role_order(msgs)
    if all(not m["content"].strip() for m in msgs):
        raise RowError("empty", "every message is blank")
    replies = [m for m in msgs if m["role"] == "assistant"]
    if not replies:
        raise RowError("missing_field", "no assistant message to learn from")
    if all(not m["content"].strip() for m in replies):
        raise RowError("empty", "every assistant reply is blank")


_CHUNK = 256  # conversations rendered and tokenized per call (one batched encode in the Rust tokenizer)


def _encode(tokenizer, chunk, with_mask: bool, report: DataReport):
    """[(row index, {"input_ids", "assistant_masks"?})] for a chunk; a row the template rejects is reported."""
    from jinja2.exceptions import TemplateError

    if not chunk:
        return []
    kwargs = dict(tokenize=True, return_dict=True, return_assistant_tokens_mask=with_mask)
    try:
        out = tokenizer.apply_chat_template([m for _, m in chunk], **kwargs)
        keys = [k for k in ("input_ids", "assistant_masks") if k in out]
        return [(i, {k: out[k][n] for k in keys}) for n, (i, _) in enumerate(chunk)]
    except TemplateError:  # find the rows to blame, one by one
        results = []
        for i, msgs in chunk:
            try:
                results.append((i, tokenizer.apply_chat_template(msgs, **kwargs)))
            except TemplateError as e:
                report.add("template_error", i, f"row {i}: the chat template rejected it: {e}")
        return results


def _add_row(cols, report: DataReport, i: int, out, max_seq_length: int, on_long: str, train_on: str) -> None:
    ids = list(out["input_ids"])
    labels = ids if train_on == "all" else [t if m else -100 for t, m in zip(ids, out["assistant_masks"])]
    if train_on == "responses" and all(v == -100 for v in labels):
        report.add("no_trainable_tokens", i, f"row {i}: the chat template marked no assistant token")
        return
    if len(ids) > max_seq_length:
        if on_long == "skip":
            report.add("too_long", i, f"row {i}: {len(ids)} tokens > max_seq_length={max_seq_length}")
            return
        n = len(ids)
        ids, labels = ids[:max_seq_length], labels[:max_seq_length]
        if all(v == -100 for v in labels[1:]):  # label 0 is never predicted (labels shift by one)
            report.add("no_trainable_tokens", i, f"row {i}: truncation to {max_seq_length} tokens cut the whole reply")
            return
        report.add("too_long", i, f"row {i}: truncated from {n} to {max_seq_length} tokens", truncated=True)
    cols["input_ids"].append(ids)
    cols["attention_mask"].append([1] * len(ids))
    cols["labels"].append(labels)


def _name_of(dataset) -> str:
    from pathlib import Path

    return f"data file {Path(dataset).name}" if isinstance(dataset, (str, Path)) else "the data set"


def load_with_report(dataset, report: DataReport | None = None):
    """(Dataset, DataReport): load_dataset_file with the rows found unusable while reading (not UTF-8) counted.

    `report`: one made by an earlier load of the same rows (its counts are kept), else a new one.
    """
    from velotune.data.formats import load_dataset_file

    report = DataReport() if report is None else report
    dataset = load_dataset_file(dataset, report=report)
    report.total = len(dataset)
    return dataset, report


def tokenize_conversations(
    dataset,
    tokenizer,
    *,
    max_seq_length: int,
    on_long: str = "truncate",
    train_on: str = "responses",
    on_bad: str = "skip",
    progress: bool = True,
    report: DataReport | None = None,
):
    """Tokenize chat rows with the tokenizer's chat template -> (Dataset, DataReport).

    dataset: anything load_dataset_file accepts; rows in a format to_messages recognises.
    on_long: "truncate" keeps the first max_seq_length tokens, "skip" drops the row (both counted).
    train_on: "responses" (labels only on assistant replies and their stop token) or "all".
    on_bad: "skip" leaves every unusable row out and counts it in the report (reasons in
    velotune.data.report: e.g. not_utf8, role_order, unknown_role, empty, too_long with on_long="skip");
    "raise" stops with a DataError naming those rows. Nothing unusable is ever trained.
    report: the DataReport from `load_with_report` when the rows were loaded beforehand (rows it already
    skipped, e.g. not UTF-8, stay skipped).
    A row whose reply is cut away entirely by truncation is skipped as "no_trainable_tokens".
    """
    import datasets

    _check_options(on_long, train_on, on_bad)
    if max_seq_length < 2:
        raise ConfigError(f"max_seq_length={max_seq_length} is too small")
    dataset_arg = dataset
    dataset, report = load_with_report(dataset, report)
    require_chat_template(tokenizer)
    if train_on == "responses" and "generation" not in tokenizer.chat_template:
        raise DataError(
            "the tokenizer's chat template has no {% generation %} markers, so assistant tokens cannot "
            "be found exactly; use velotune.get_chat_template(tokenizer, NAME) or train_on='all'"
        )
    already = report.rows_skipped()
    cols: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
    chunk: list[tuple[int, list[dict]]] = []

    def flush():
        for i, out in _encode(tokenizer, chunk, train_on == "responses", report):
            _add_row(cols, report, i, out, max_seq_length, on_long, train_on)
        chunk.clear()

    for i, row in enumerate(_progress(dataset, len(dataset), "Tokenizing", progress)):
        if i in already:
            continue
        try:
            msgs = to_messages(row)
            _validate_messages(msgs)
        except RowError as e:
            report.add(e.reason, i, f"row {i}: {e}")
            continue
        chunk.append((i, msgs))
        if len(chunk) == _CHUNK:
            flush()
    flush()
    report.raise_if_bad(on_bad, what=_name_of(dataset_arg))
    if report.num_skipped or report.num_truncated:
        log.warning("tokenize_conversations: %s", report.summary())
    return datasets.Dataset.from_dict(cols), report


def _text_of(value) -> str:
    if isinstance(value, str):
        return value
    return "".join(m["content"] for m in normalize_messages(value))


def _length(tokenizer, prompt, completion) -> int:
    """Tokens of prompt + completion as the trainer will see them (chat template when conversational)."""
    if isinstance(completion, list):
        msgs = (normalize_messages(prompt) if isinstance(prompt, list) else []) + normalize_messages(completion)
        return len(tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"])
    return len(tokenizer(_text_of(prompt or "") + completion, add_special_tokens=True)["input_ids"])


def validate_preference_rows(
    dataset,
    *,
    max_seq_length: int,
    on_long: str = "truncate",
    tokenizer=None,
    on_bad: str = "skip",
    progress: bool = True,
    report: DataReport | None = None,
):
    """Check DPO/ORPO rows (prompt, chosen, rejected) -> (Dataset of kept rows, DataReport).

    Rows are kept as they are (TRL tokenizes them); this only finds the unusable ones: a missing or
    empty field, an unknown role in conversational rows, chosen == rejected, or (with `tokenizer=`)
    prompt + chosen/rejected longer than max_seq_length: "skip" drops, "truncate" keeps and counts
    (the trainer truncates). The prompt may be omitted when chosen/rejected are conversations that
    share it (TRL's implicit prompt). Without a tokenizer lengths are not checked. Conversational rows
    must keep the turn order (prompt + chosen, prompt + rejected: see check_role_order). on_bad and
    report: as in tokenize_conversations.
    """
    _check_options(on_long, on_bad=on_bad)
    dataset_arg = dataset
    dataset, report = load_with_report(dataset, report)
    already = report.rows_skipped()
    keep = []
    for i, row in enumerate(_progress(dataset, len(dataset), "Checking preference rows", progress)):
        if i in already:
            continue
        try:
            for key in ("chosen", "rejected"):
                if row.get(key) is None:
                    raise RowError("missing_field", f"no {key!r} field; row has {sorted(row)}")
            prompt = row.get("prompt")
            if prompt is None and not isinstance(row["chosen"], list):
                raise RowError("missing_field", f"no 'prompt' field; row has {sorted(row)}")
            texts = {k: _text_of(row[k]) for k in ("chosen", "rejected")}
            if prompt is not None:
                texts["prompt"] = _text_of(prompt)
            blank = [k for k, v in texts.items() if not v.strip()]
            if blank:
                raise RowError("empty", f"blank {', '.join(blank)}")
            if row["chosen"] == row["rejected"]:
                raise RowError("identical_pair", "chosen equals rejected")
            if isinstance(row["chosen"], list):
                head = (
                    normalize_messages(prompt)
                    if isinstance(prompt, list)
                    else ([{"role": "user", "content": str(prompt)}] if prompt is not None else [])
                )
                for key in ("chosen", "rejected"):
                    if isinstance(row[key], list):
                        check_role_order(head + normalize_messages(row[key]))
            if tokenizer is not None:
                longest = max(_length(tokenizer, prompt, row[k]) for k in ("chosen", "rejected"))
                if longest > max_seq_length:
                    if on_long == "skip":
                        raise RowError("too_long", f"{longest} tokens > max_seq_length={max_seq_length}")
                    report.add(
                        "too_long",
                        i,
                        f"row {i}: {longest} tokens, the trainer truncates to {max_seq_length}",
                        truncated=True,
                    )
        except RowError as e:
            report.add(e.reason, i, f"row {i}: {e}")
            continue
        keep.append(i)
    report.raise_if_bad(on_bad, what=_name_of(dataset_arg))
    if report.num_skipped or report.num_truncated:
        log.warning("validate_preference_rows: %s", report.summary())
    return (dataset if len(keep) == len(dataset) else dataset.select(keep)), report
