"""Data set formats: loading local files and turning rows into chat messages.

    ds = load_dataset_file("data/train.jsonl")                     # json / jsonl / parquet / csv / a datasets object
    ds = to_sharegpt(ds, merged_prompt="{instruction}[[\\nInput: {input}]]", output_column_name="output")
    ds = standardize_sharegpt(ds)                                  # from/value -> role/content
    ds = standardize_data_formats(ds)                              # any key/role spelling (Unsloth's helper)
    messages = to_messages(ds[0])                                  # [{'role': 'user', 'content': ...}, ...]

Row formats `to_messages` recognises (first match wins):
  messages / conversations / conversation   list of {role, content} or ShareGPT {from, value} dicts
  instruction + output       alpaca (optional input, optional system)
  prompt + completion        strings or message lists (TRL's prompt-completion format)
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

from velotune.errors import DataError

ROLE_ALIASES = {
    "human": "user",
    "user": "user",
    "prompter": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "bot": "assistant",
    "chatgpt": "assistant",
    "system": "system",
}
CONVERSATION_COLUMNS = ("messages", "conversations", "conversation")
_LOADERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


class RowError(DataError):
    """A row that cannot be used; `reason` is one of velotune.data.report.REASONS."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def load_dataset_file(path_or_dataset: Any, split: str = "train", *, report=None):
    """A `datasets.Dataset` from a local .json/.jsonl/.parquet/.csv file, a list of dicts, or a datasets object.

    A DatasetDict gives its `split`. Missing files, unknown suffixes and unreadable files raise DataError.
    Bytes that are not UTF-8: in a .jsonl file each such line is one bad row. With `report` (a
    velotune.data.report.DataReport) the row stays in place as an empty row (every column None, so the
    row numbers of the others do not move) and is recorded as skipped "not_utf8" with its line number;
    without `report` a DataError names the rows. In a .json or .csv file the whole file is refused
    (DataError naming the line).
    """
    import datasets

    obj = path_or_dataset
    if isinstance(obj, (datasets.Dataset, datasets.IterableDataset)):
        return obj
    if isinstance(obj, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if split not in obj:
            raise DataError(f"the DatasetDict has no split {split!r}; splits: {list(obj)}")
        return obj[split]
    if isinstance(obj, list):
        if not all(isinstance(r, dict) for r in obj):
            raise DataError("a list data set must hold one dict per row")
        keys = list(dict.fromkeys(k for r in obj for k in r))  # from_list alone keeps only the first row's keys
        try:
            return datasets.Dataset.from_list([{k: r.get(k) for k in keys} for r in obj])
        except Exception as e:  # pyarrow: one column holding e.g. text in some rows and lists in others
            raise DataError(
                f"the rows do not share one type per column ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
            ) from None
    if not isinstance(obj, (str, Path)):
        raise DataError(f"cannot load a data set from {type(obj).__name__}: pass a file path or a datasets object")
    path = Path(obj).expanduser()
    if not path.exists():
        raise DataError(f"data file {str(path)!r} does not exist")
    if path.is_dir():
        raise DataError(f"{str(path)!r} is a folder: pass one .json/.jsonl/.parquet/.csv file")
    kind = _LOADERS.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path.name}: unknown data file type {path.suffix!r}; use one of {sorted(_LOADERS)}")
    if kind in ("json", "csv"):
        bad = find_non_utf8_lines(path)
        if bad and (path.suffix.lower() != ".jsonl" or report is None):
            rows = ", ".join(f"{r} (line {n})" for r, n, _ in bad[:5]) + (", ..." if len(bad) > 5 else "")
            if path.suffix.lower() == ".jsonl":
                raise DataError(
                    f"{path.name}: {len(bad)} rows are not UTF-8: rows {rows}, e.g. {bad[0][2]}; "
                    "save the file as UTF-8, or load it through tokenize_conversations / "
                    "velotune train (on_bad='skip') to leave those rows out"
                )
            raise DataError(
                f"{path.name} is not UTF-8: line {bad[0][1]} has {bad[0][2]} "
                f"({len(bad)} such line{'s' if len(bad) > 1 else ''}); save the file as UTF-8"
            )
        if bad:
            return _load_jsonl_without(path, bad, report)
    try:
        ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as e:  # pyarrow / json errors: say which file and why, keep it one line
        first = str(e).splitlines()[0][:300] if str(e) else ""
        cause = e.__cause__ or e.__context__
        if cause is not None and str(cause):
            first += f" ({str(cause).splitlines()[0][:200]})"
        raise DataError(f"could not read {path.name} as {kind}: {type(e).__name__}: {first}") from None
    return ds


def find_non_utf8_lines(path: Path) -> list[tuple[int, int, str]]:
    """[(row index, line number from 1, what is wrong)] for every line of `path` that is not UTF-8.

    Rows are counted as the JSON Lines reader counts them: blank lines are not rows.
    """
    bad, row = [], 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                bad.append((row, lineno, f"byte 0x{raw[e.start]:02x} at column {e.start + 1} of line {lineno}"))
            row += 1
    return bad


def _load_jsonl_without(path: Path, bad: list[tuple[int, int, str]], report):
    """Load a JSON Lines file whose `bad` lines are replaced by an all-None row, recording them in report."""
    import tempfile

    import datasets

    lines = {n for _, n, _ in bad}
    placeholder = None  # the first readable row's keys, all None (an empty `{}` row would be dropped)
    with open(path, "rb") as src:
        for lineno, raw in enumerate(src, 1):
            if lineno not in lines and raw.strip():
                try:
                    first = json.loads(raw)
                except ValueError:
                    break  # the JSON reader below names the problem
                placeholder = json.dumps({k: None for k in first} if isinstance(first, dict) else {}).encode()
                break
    if placeholder is None:
        raise DataError(
            f"{path.name}: no row is UTF-8 ({len(bad)} rows; e.g. row {bad[0][0]}: {bad[0][2]}); save the file as UTF-8"
        )
    with tempfile.TemporaryDirectory(prefix="velotune-utf8-") as tmp:
        clean = Path(tmp) / path.name
        with open(path, "rb") as src, open(clean, "wb") as dst:
            for lineno, raw in enumerate(src, 1):  # blank lines are no rows (and older datasets refuse them)
                if raw.strip():
                    dst.write(placeholder + b"\n" if lineno in lines else raw.rstrip(b"\r\n") + b"\n")
        try:
            ds = datasets.load_dataset("json", data_files=str(clean), split="train")
        except Exception as e:
            raise DataError(
                f"could not read {path.name} as json: {type(e).__name__}: "
                f"{str(e).splitlines()[0][:300] if str(e) else ''}"
            ) from None
    for row, lineno, what in bad:
        report.add("not_utf8", row, f"row {row}: not UTF-8 ({what})")
    return ds


def normalize_messages(messages: Any, aliases: dict[str, str] | None = None) -> list[dict[str, str]]:
    """role/content or from/value dicts -> [{'role': canonical, 'content': str}]; RowError when unusable."""
    aliases = {**ROLE_ALIASES, **(aliases or {})}
    if not isinstance(messages, (list, tuple)) or not messages:
        raise RowError("empty", "no messages")
    out = []
    for k, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RowError("missing_field", f"message {k} is a {type(m).__name__}, not a dict")
        role = m.get("role") if m.get("role") is not None else m.get("from")
        content = m.get("content") if m.get("content") is not None else m.get("value")
        if role is None:
            raise RowError("missing_field", f"message {k} has no 'role' (or 'from'); keys: {sorted(m)}")
        if content is None:
            raise RowError("missing_field", f"message {k} has no 'content' (or 'value'); keys: {sorted(m)}")
        canonical = aliases.get(str(role).strip().lower())
        if canonical is None:
            raise RowError("unknown_role", f"message {k} has unknown role {role!r}; known: {sorted(set(aliases))}")
        if not isinstance(content, str):
            raise RowError("missing_field", f"message {k}'s content is a {type(content).__name__}, not text")
        out.append({"role": canonical, "content": content})
    return out


def to_messages(row: dict) -> list[dict[str, str]]:
    """Detect the row's format and return canonical messages (see module docstring); RowError if none fits."""
    for col in CONVERSATION_COLUMNS:
        if row.get(col) is not None:
            return normalize_messages(row[col])
    if "instruction" in row or "output" in row:
        instruction, output = row.get("instruction"), row.get("output")
        if instruction is None or output is None:
            missing = "instruction" if instruction is None else "output"
            raise RowError("missing_field", f"alpaca row lacks {missing!r}")
        extra = row.get("input") or ""
        user = f"{instruction}\n\n{extra}" if str(extra).strip() else str(instruction)
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": str(output)}]
        if row.get("system"):
            msgs.insert(0, {"role": "system", "content": str(row["system"])})
        return msgs
    if "prompt" in row or "completion" in row:
        prompt, completion = row.get("prompt"), row.get("completion")
        if prompt is None or completion is None:
            missing = "prompt" if prompt is None else "completion"
            raise RowError("missing_field", f"prompt-completion row lacks {missing!r}")
        p = normalize_messages(prompt) if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]
        c = (
            normalize_messages(completion)
            if isinstance(completion, list)
            else [{"role": "assistant", "content": str(completion)}]
        )
        return p + c
    raise RowError(
        "missing_field",
        "no conversation found: expected 'messages' or 'conversations', alpaca "
        f"'instruction'+'output', or 'prompt'+'completion'; row has {sorted(row)}",
    )


def standardize_sharegpt(dataset, aliases: dict[str, str] | None = None, num_proc: int | None = None):
    """ShareGPT `from`/`value` -> `role`/`content` with roles human/gpt/system -> user/assistant/system.

    Works on the 'conversations' (or 'messages' / 'conversation') column in place. Unknown roles are kept
    (lower-cased) so that tokenize_conversations can count and report them instead of failing here.
    """
    column = next((c for c in CONVERSATION_COLUMNS if c in dataset.column_names), None)
    if column is None:
        raise DataError(
            f"standardize_sharegpt: no {' / '.join(CONVERSATION_COLUMNS)} column; columns: {dataset.column_names}"
        )
    table = {**ROLE_ALIASES, **(aliases or {})}

    def convert(batch):
        out = []
        for conv in batch[column]:
            msgs = []
            for m in conv or []:
                role = m.get("role") if m.get("role") is not None else m.get("from")
                content = m.get("content") if m.get("content") is not None else m.get("value")
                role = None if role is None else table.get(str(role).strip().lower(), str(role).strip().lower())
                msgs.append({"role": role, "content": content})
            out.append(msgs)
        return {column: out}

    kwargs = {"num_proc": num_proc} if num_proc else {}
    return dataset.map(convert, batched=True, desc="Standardizing ShareGPT", **kwargs)


_FIELD = re.compile(r"\{(\w+)\}")
_OPTIONAL = re.compile(r"\[\[(.*?)\]\]", re.S)


def _merge(prompt: str, row: dict) -> str:
    """Fill {column} fields; an optional [[...]] block is kept only if all its fields are non-empty."""

    def optional(m):
        block = m.group(1)
        names = _FIELD.findall(block)
        return block if all(str(row.get(n) or "").strip() for n in names) else ""

    text = _OPTIONAL.sub(optional, prompt)
    return _FIELD.sub(lambda m: str(row.get(m.group(1)) if row.get(m.group(1)) is not None else ""), text)


def to_sharegpt(
    dataset,
    merged_prompt: str = "{instruction}[[\nInput:\n{input}]]",
    output_column_name: str = "output",
    merged_column_name: str = "instruction",
    conversation_extension: int = 1,
    random_state: int = 3407,
):
    """Merge alpaca-style columns into a ShareGPT 'conversations' column ({from, value}; Unsloth-compatible).

    merged_prompt: text with {column} fields; [[...]] blocks are dropped when any field inside is empty.
    conversation_extension=n > 1 joins n randomly chosen rows into one multi-turn conversation.
    Follow with standardize_sharegpt for role/content messages.
    """
    import datasets

    names = set(_FIELD.findall(merged_prompt)) | {output_column_name}
    missing = sorted(n for n in names if n not in dataset.column_names)
    if missing:
        raise DataError(f"to_sharegpt: columns {missing} not in the data set; columns: {dataset.column_names}")
    del merged_column_name  # accepted for Unsloth compatibility; the merged text goes straight into the turn
    turns = [
        [
            {"from": "human", "value": _merge(merged_prompt, row)},
            {"from": "gpt", "value": str(row[output_column_name] if row[output_column_name] is not None else "")},
        ]
        for row in dataset
    ]
    if conversation_extension > 1:
        rng = random.Random(random_state)
        order = list(range(len(turns)))
        convs = []
        for i in range(len(turns)):
            others = rng.sample(order, min(conversation_extension - 1, len(order)))
            convs.append(turns[i] + [t for j in others for t in turns[j]])
    else:
        convs = turns
    return datasets.Dataset.from_dict({"conversations": convs})


def standardize_data_formats(
    dataset,
    tokenizer=None,
    aliases_for_system=("system",),
    aliases_for_user=("user", "human", "input"),
    aliases_for_assistant=("gpt", "assistant", "output"),
    batch_size: int = 1000,
    num_proc: int | None = None,
):
    """Conversations in any common key/role spelling -> Hugging Face role/content messages (Unsloth's helper).

    Works on the 'conversations' column (else 'messages' / 'conversation'); a data set with none of these
    is returned unchanged. The message keys are role/content, ShareGPT from/value, or any other pair of
    text keys (the one with fewer distinct values, over the first 10 rows, holds the role). Roles map
    through the alias lists to system / user / assistant (exact names first, then case-insensitive); a
    role in no list is a DataError naming the row. With a multimodal processor as `tokenizer` (it has a
    `.tokenizer`), each content becomes [{"type": "text", "text": ...}].
    """
    import itertools

    first = next(iter(dataset), None)
    column = next((c for c in CONVERSATION_COLUMNS if first is not None and c in first), None)
    if column is None:
        return dataset
    role_key, content_key = _message_keys(itertools.islice(dataset, 10), column)
    aliases = {}
    for canonical, names in (
        ("system", aliases_for_system),
        ("user", aliases_for_user),
        ("assistant", aliases_for_assistant),
    ):
        for name in [names] if isinstance(names, str) else names:
            aliases.setdefault(str(name), canonical)
    folded = {k.strip().lower(): v for k, v in aliases.items()}
    multimodal = tokenizer is not None and hasattr(tokenizer, "tokenizer")

    def role_of(value, row: int) -> str:
        role = aliases.get(value) or folded.get(str(value).strip().lower())
        if role is None:
            raise DataError(
                f"standardize_data_formats: row {row} has role {value!r}, which is in no alias list "
                f"(system {list(aliases_for_system)}, user {list(aliases_for_user)}, assistant "
                f"{list(aliases_for_assistant)}); add it to aliases_for_system / aliases_for_user / "
                "aliases_for_assistant"
            )
        return role

    def convert(batch, indices):
        out = []
        for row, conv in zip(indices, batch[column]):
            msgs = []
            for m in conv or []:
                text = m.get(content_key)
                msgs.append(
                    {
                        "role": role_of(m.get(role_key), row),
                        "content": [{"type": "text", "text": text}] if multimodal else text,
                    }
                )
            out.append(msgs)
        return {column: out}

    import datasets

    kwargs = dict(batched=True, batch_size=batch_size, with_indices=True)
    if not isinstance(dataset, datasets.IterableDataset):
        kwargs.update(num_proc=num_proc, desc="Standardizing formats")
    return dataset.map(convert, **kwargs)


def _message_keys(rows, column: str) -> tuple[str, str]:
    """(role key, content key) of the messages in `rows` (standardize_data_formats' docstring)."""
    values: dict[str, list] = {}
    for row in rows:
        for m in row[column] or []:
            if not isinstance(m, dict):
                raise DataError(f"standardize_data_formats: a message is a {type(m).__name__}, not a dict")
            for k, v in m.items():
                values.setdefault(k, []).append(v)
    for pair in (("role", "content"), ("from", "value")):
        if all(k in values for k in pair):
            return pair
    text = [k for k, vs in values.items() if all(isinstance(v, str) for v in vs)]
    if len(text) != 2:
        raise DataError(
            f"standardize_data_formats: cannot tell the role and content keys of the messages (keys {sorted(values)}, "
            f"text keys {sorted(text)}); rename them to role/content"
        )
    a, b = text
    return (a, b) if len(set(values[a])) <= len(set(values[b])) else (b, a)
