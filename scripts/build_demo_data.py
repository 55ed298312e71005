"""Rebuild the instruction data that ships with `velotune demo` (src/velotune/demo/data/).

    python scripts/build_demo_data.py

Writes two messages-format JSONL files (one conversation per line, the format of ShareGPT-style
chat data after `standardize_sharegpt`):

* train.jsonl: questions about most facts of the demo world (scripts/demo_world.py), each with a
  one-sentence answer; some facts are asked twice in different words.
* heldout.jsonl: questions about the other facts. They never appear in train.jsonl; the model saw
  those facts only as plain sentences in pretraining. Each row also has `target`: the word a
  correct answer contains (the demo scores before/after answers with it).
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import demo_world  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "src" / "velotune" / "demo" / "data"


def conversation(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    tmp.replace(path)


def main(seed: int = 0, second_phrasing: float = 0.35) -> None:
    rng = random.Random(seed)
    train_facts, held_facts = demo_world.split(demo_world.facts(), seed=seed)
    train = []
    for f in train_facts:
        questions = rng.sample(f["questions"], 2 if rng.random() < second_phrasing else 1)
        train += [conversation(q, f["answer"]) for q in questions]
    rng.shuffle(train)
    held = [{**conversation(rng.choice(f["questions"]), f["answer"]), "target": f["target"]} for f in held_facts]
    rng.shuffle(held)
    OUT.mkdir(parents=True, exist_ok=True)
    write_jsonl(OUT / "train.jsonl", train)
    write_jsonl(OUT / "heldout.jsonl", held)
    print(f"wrote {len(train)} training and {len(held)} held-out conversations to {OUT}")


if __name__ == "__main__":
    main()
