"""Ask a model the held-out questions and score its replies.

rows = load_heldout(heldout_path())              # [{"messages": [user, assistant], "target": ...}]
replies = answer(model, tokenizer, [question(r) for r in rows])
exact, knows = score(replies, rows)
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from velotune.errors import DataError


def load_heldout(path: str | Path) -> list[dict]:
    rows = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        row = json.loads(line)
        if not (isinstance(row.get("messages"), list) and len(row["messages"]) == 2 and "target" in row):
            raise DataError(f"{path}: line {i + 1}: expected messages [user, assistant] and a target")
        rows.append(row)
    return rows


def question(row: dict) -> str:
    return row["messages"][0]["content"]


def expected(row: dict) -> str:
    return row["messages"][1]["content"]


@torch.no_grad()
def answer(model, tokenizer, questions: list[str], max_new_tokens: int = 24, batch_size: int = 64) -> list[str]:
    """Greedy replies, one per question, through the tokenizer's chat template (batched, left padding)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    replies: list[str] = []
    try:
        for i in range(0, len(questions), batch_size):
            prompts = [
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
                )
                for q in questions[i : i + batch_size]
            ]
            # The template already holds the BOS token: add no other special tokens.
            enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            new = out[:, enc["input_ids"].shape[1] :]
            replies += [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in new]
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return replies


def score(replies: list[str], rows: list[dict]) -> dict:
    """`exact`: the reply is the expected sentence and nothing more; `fact`: its first sentence
    contains the target word (e.g. "Paris"), whatever else it says."""
    exact = sum(r == expected(row) for r, row in zip(replies, rows))
    fact = sum(_has_word(r.split(".")[0], row["target"]) for r, row in zip(replies, rows))
    return {"questions": len(rows), "exact": exact, "fact": fact}


def _has_word(text: str, word: str) -> bool:
    return re.search(rf"\b{re.escape(word)}\b", text) is not None
