"""Loss only on the assistant's replies, found by token ids.

    trainer = SFTTrainer(model, args, train_dataset=ds, processing_class=tokenizer)
    trainer = train_on_responses_only(trainer)                       # parts derived from the chat template
    trainer = train_on_responses_only(trainer, instruction_part="<|start_header_id|>user<|end_header_id|>\\n\\n",
                                      response_part="<|start_header_id|>assistant<|end_header_id|>\\n\\n")

Labels are -100 everywhere except inside assistant turns. A turn starts right after the token sequence
of `response_part` and ends right before the next `instruction_part` (Unsloth's rule); in automatic
mode it also ends after the format's stop token (so a trailing newline or a system turn after the
reply is never trained on).

Automatic mode renders a probe conversation with the tokenizer's chat template and reads the parts
off the token ids: `response_part` = the tokens between the end of a user message and the first
assistant token (as marked by the template's `{% generation %}` block), `instruction_part` = the
tokens between the end of an assistant turn and the next user message. Rows that end up with no
trainable token are reported with the reason (and dropped by default, counted, never silently).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

from velotune.data.report import DataReport
from velotune.errors import DataError

log = logging.getLogger("velotune")

_PROBE = [
    {"role": "user", "content": "What is one plus one?"},
    {"role": "assistant", "content": "It is two."},
    {"role": "user", "content": "And two plus two?"},
    {"role": "assistant", "content": "It is four."},
]


@dataclass(frozen=True)
class ResponseParts:
    """Token ids that open an assistant turn (response) and a user turn (instruction); stop ends a turn."""

    instruction: tuple[int, ...]
    response: tuple[int, ...]
    stop: int | None = None


def derive_parts(tokenizer) -> ResponseParts:
    """Read instruction/response parts off the tokenizer's chat template (see module docstring)."""
    require_chat_template(tokenizer)
    out = tokenizer.apply_chat_template(_PROBE, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    text = tokenizer.apply_chat_template(_PROBE, tokenize=False)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if list(enc["input_ids"]) != ids:
        raise DataError(
            "could not derive response/instruction parts: the tokenizer re-tokenizes the rendered chat "
            "differently; pass instruction_part= and response_part= explicitly"
        )
    offsets = enc["offset_mapping"]
    # character spans of the probe's contents in the rendered text, in order
    spans, pos = [], 0
    for m in _PROBE:
        start = text.find(m["content"], pos)
        if start < 0:
            raise DataError(
                "could not derive response/instruction parts: the chat template alters message "
                "contents; pass instruction_part= and response_part= explicitly"
            )
        spans.append((start, start + len(m["content"])))
        pos = start + len(m["content"])
    runs = _runs(mask)
    if len(runs) != 2:  # template without {% generation %}: assistant tokens = those overlapping the replies
        runs = [_token_span(offsets, spans[1]), _token_span(offsets, spans[3])]
        stop = tokenizer.eos_token_id
        for k, (a, b) in enumerate(runs):  # the stop token right after a reply belongs to the reply
            if b < len(ids) and ids[b] == stop:
                runs[k] = (a, b + 1)
    user2_end, user2_start = spans[2][1], spans[2][0]
    response = tuple(ids[i] for i in range(runs[0][1], runs[1][0]) if offsets[i][0] >= user2_end)
    instruction = tuple(ids[i] for i in range(runs[0][1], len(ids)) if offsets[i][1] <= user2_start)
    if not response:
        raise DataError(
            "could not derive a response part from the chat template (nothing separates a user message "
            "from the reply); pass response_part= explicitly"
        )
    stop_id = ids[runs[1][1] - 1]
    return ResponseParts(instruction=instruction, response=response, stop=stop_id)


def require_chat_template(tokenizer) -> None:
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(
            "the tokenizer has no chat template; set one first, e.g. "
            "tokenizer = velotune.get_chat_template(tokenizer, 'llama-3.1')"
        )


def _runs(mask: Sequence[int]) -> list[tuple[int, int]]:
    """[start, end) index ranges where mask is 1."""
    runs, start = [], None
    for i, v in enumerate(list(mask) + [0]):
        if v and start is None:
            start = i
        elif not v and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _token_span(offsets, span) -> tuple[int, int]:
    idx = [i for i, (a, b) in enumerate(offsets) if a < span[1] and b > span[0]]
    return idx[0], idx[-1] + 1


def _as_ids(tokenizer, part) -> tuple[int, ...]:
    if isinstance(part, str):
        ids = tokenizer(part, add_special_tokens=False)["input_ids"]
    else:
        ids = list(part)
    if not ids:
        raise DataError(f"instruction/response part {part!r} tokenizes to nothing")
    return tuple(int(i) for i in ids)


def resolve_parts(tokenizer, instruction_part=None, response_part=None) -> ResponseParts:
    """Parts from strings / id lists, or derived from the chat template when both are None."""
    if instruction_part is None and response_part is None:
        return derive_parts(tokenizer)
    if response_part is None:
        raise DataError("response_part is required when instruction_part is given")
    instruction = _as_ids(tokenizer, instruction_part) if instruction_part is not None else ()
    return ResponseParts(instruction=instruction, response=_as_ids(tokenizer, response_part))


def response_labels(
    input_ids: Sequence[int],
    tokenizer=None,
    *,
    instruction_part=None,
    response_part=None,
    parts: ResponseParts | None = None,
) -> list[int]:
    """Labels for one row: the token id inside assistant turns, -100 elsewhere.

    input_ids: [T] ints. Returns [T] ints. Pass `parts` (from resolve_parts) to avoid re-deriving them.
    """
    if parts is None:
        parts = resolve_parts(tokenizer, instruction_part, response_part)
    ids = [int(i) for i in input_ids]
    resp, inst, n = list(parts.response), list(parts.instruction), len(ids)
    labels = [-100] * n
    i, inside = 0, False
    while i < n:
        if not inside and ids[i : i + len(resp)] == resp:
            inside, i = True, i + len(resp)
            continue
        if inside and inst and ids[i : i + len(inst)] == inst:
            inside, i = False, i + len(inst)
            continue
        if inside:
            labels[i] = ids[i]
            if parts.stop is not None and ids[i] == parts.stop:
                inside = False
        i += 1
    return labels


def _why_empty(ids: Sequence[int], parts: ResponseParts, max_length: int | None) -> str:
    resp = list(parts.response)
    ids = list(ids)
    found = [i for i in range(len(ids) - len(resp) + 1) if ids[i : i + len(resp)] == resp]
    at_limit = max_length is not None and len(ids) >= max_length
    if not found:
        if at_limit:
            return f"truncation at max_length={max_length} cut the row before any assistant reply"
        return "no assistant reply found (the response part's tokens do not occur in the row)"
    if found[-1] + len(resp) >= len(ids):
        return "truncation cut the response: the row ends right after the response part"
    return "every assistant reply is empty"


def train_on_responses_only(
    trainer,
    instruction_part=None,
    response_part=None,
    force_match: bool = True,
    tokenizer=None,
    return_function: bool = False,
    num_proc: int | None = None,
    *,
    on_empty: str = "drop",
):
    """Set labels to -100 outside assistant turns in the trainer's train/eval datasets (Unsloth signature).

    instruction_part / response_part: strings (tokenized without special tokens) or lists of token ids;
    both None = derive them from the chat template. on_empty: rows without any trainable token are
    "drop"ped (counted, logged, listed in `trainer.velotune_data_report`), "keep"t, or "raise" a DataError.
    return_function=True returns `fn(batch) -> {"labels": ...}` for a batched `dataset.map` instead.
    The trainer's collator is wrapped to warn, naming rows and reasons, if a batch has no trainable token.
    force_match is accepted for compatibility (matching is always by exact token ids).
    """
    del force_match
    if on_empty not in ("drop", "keep", "raise"):
        raise DataError(f"on_empty={on_empty!r}: use 'drop', 'keep' or 'raise'")
    tokenizer = tokenizer or getattr(trainer, "processing_class", None) or getattr(trainer, "tokenizer", None)
    if tokenizer is None:
        raise DataError("train_on_responses_only needs a tokenizer: pass tokenizer=")
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor wraps the tokenizer
    parts = resolve_parts(tokenizer, instruction_part, response_part)
    log.info(
        "train_on_responses_only: response part %r, instruction part %r",
        tokenizer.decode(parts.response),
        tokenizer.decode(parts.instruction),
    )

    def label_batch(batch):
        return {"labels": [response_labels(ids, parts=parts) for ids in batch["input_ids"]]}

    if return_function:
        return label_batch
    max_length = getattr(getattr(trainer, "args", None), "max_length", None)
    empty: dict[int, str] = {}
    report = DataReport(total=0)
    trainer.train_dataset = _relabel(
        trainer.train_dataset, parts, max_length, num_proc, on_empty, "train", report, empty
    )
    eval_ds = getattr(trainer, "eval_dataset", None)
    if isinstance(eval_ds, dict):
        trainer.eval_dataset = {
            k: _relabel(v, parts, max_length, num_proc, on_empty, f"eval[{k}]", report, empty)
            for k, v in eval_ds.items()
        }
    elif eval_ds is not None:
        trainer.eval_dataset = _relabel(eval_ds, parts, max_length, num_proc, on_empty, "eval", report, empty)
    trainer.velotune_data_report = report
    if getattr(trainer, "data_collator", None) is not None and not isinstance(trainer.data_collator, _EmptyBatchGuard):
        trainer.data_collator = _EmptyBatchGuard(trainer.data_collator, empty)
    return trainer


def _relabel(dataset, parts, max_length, num_proc, on_empty, name, report, empty):
    if dataset is None:
        return None
    if "input_ids" not in dataset.column_names:
        raise DataError(
            f"the {name} dataset has no input_ids column: train_on_responses_only works on the "
            "trainer's tokenized datasets (build the trainer first)"
        )

    def add_labels(batch):
        labels = [response_labels(ids, parts=parts) for ids in batch["input_ids"]]
        return {"labels": labels, "_velotune_trainable": [sum(v != -100 for v in lab) for lab in labels]}

    if not hasattr(dataset, "__len__"):  # an IterableDataset: relabel lazily; only the collator guard can report
        log.warning(
            "train_on_responses_only: the %s dataset is iterable, so rows without trainable tokens can "
            "only be reported per batch",
            name,
        )
        return dataset.map(
            lambda b: {"labels": [response_labels(ids, parts=parts) for ids in b["input_ids"]]}, batched=True
        )
    kwargs = {"num_proc": num_proc} if num_proc else {}
    dataset = dataset.map(add_labels, batched=True, desc=f"Masking non-response tokens ({name})", **kwargs)
    counts = dataset["_velotune_trainable"]
    dataset = dataset.remove_columns("_velotune_trainable")
    bad = [i for i, c in enumerate(counts) if c == 0]
    report.total += len(counts)
    for i in bad:
        why = _why_empty(dataset[i]["input_ids"], parts, max_length)
        report.add("no_trainable_tokens", i, f"{name} row {i}: {why}")
        empty.setdefault(hash(tuple(dataset[i]["input_ids"])), []).append(f"{name} row {i} ({why})")
    if bad:
        msg = f"{len(bad)} of {len(counts)} {name} rows have no trainable token after masking: " + "; ".join(
            report.details_for("no_trainable_tokens")[:5]
        )
        if on_empty == "raise" or len(bad) == len(counts):
            raise DataError(msg + (". No row is left to train on" if len(bad) == len(counts) else ""))
        if on_empty == "drop":
            keep = [i for i, c in enumerate(counts) if c > 0]
            dataset = dataset.select(keep)
            log.warning("%s; dropped them (listed in trainer.velotune_data_report)", msg)
        else:
            log.warning("%s; kept them (they add nothing to the loss)", msg)
    return dataset


class _EmptyBatchGuard:
    """Wraps a collator: a batch without any trainable label gets a warning naming its rows and why."""

    def __init__(self, collator, empty_rows: dict[int, list[str]]):
        self.collator = collator
        self.empty_rows = empty_rows

    def __getattr__(self, name):  # only called for names not found on the guard itself
        if name.startswith("__") or name in ("collator", "empty_rows"):  # pickling / half-built instances
            raise AttributeError(name)
        return getattr(self.collator, name)

    def __call__(self, features, *args, **kwargs):
        batch = self.collator(features, *args, **kwargs)
        labels = batch.get("labels") if hasattr(batch, "get") else None
        if labels is not None and not bool((labels != -100).any()):
            rows = [
                " = ".join(
                    self.empty_rows.get(hash(tuple(int(t) for t in f["input_ids"])), ["a row with no assistant reply"])[
                        :3
                    ]
                )
                for f in features
                if "input_ids" in f
            ]
            log.warning("a batch has no trainable token (its loss is 0/0): %s", "; ".join(rows[:8]))
        return batch
