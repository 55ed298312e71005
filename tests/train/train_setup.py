"""Helpers of the training tests: the shipped toy data, small slices of it and a small CPU TrainConfig.
(A module of its own, not conftest: `from conftest import ...` finds whichever conftest was imported
first when several test folders run together.)"""

from __future__ import annotations

import json
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TOY = EXAMPLES / "data"


def toy_slice(name: str, rows: int, folder: Path) -> Path:
    """The first `rows` rows of a shipped toy data set, as a JSONL file in `folder`."""
    lines = (TOY / name).read_text(encoding="utf-8").splitlines()[:rows]
    path = folder / f"{rows}-{name}"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert all(json.loads(line) for line in lines)
    return path


def make_config(model: Path, data: Path, out: Path, method: str = "sft", *, lora=None, training=None, **data_kw):
    """A small float32 CPU TrainConfig: batch = the whole slice, so every step sees the same rows."""
    from velotune.train.config import TrainConfig

    return TrainConfig(
        model={"name": str(model), "dtype": "float32", "max_seq_length": 96},
        data={"path": str(data), **data_kw},
        method=method,
        lora={"r": 8, "alpha": 16, "gradient_checkpointing": False, **(lora or {})},
        training={
            "max_steps": 4,
            "batch_size": 4,
            "gradient_accumulation_steps": 1,
            "learning_rate": 1e-2,
            "lr_scheduler": "constant",
            "use_cpu": True,
            "seed": 0,
            **(training or {}),
        },
        output_dir=str(out),
    )
