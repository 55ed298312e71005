"""Fixtures for the Unsloth-style scripts: the mini models they load in place of hub ids.

Each test here is one of Unsloth's notebooks or tests written out as a script with `from unsloth import`
changed to `from velotune import`; hub model ids become a saved mini model (tests/mini.py) and hub data
sets a few local rows. Steps, lengths and batch sizes are cut down so the whole folder runs in CI.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))  # `from mini import ...`
sys.path.insert(0, str(TESTS / "export"))  # `from helpers import RecordingHfApi` (the hub stand-in)

CONTEXT = 1024


@pytest.fixture(autouse=True)
def _bitsandbytes():
    """The notebooks load in 4 bit (`load_in_4bit=True`): bitsandbytes (the test extra) is needed."""
    pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="session")
def mini_models(tmp_path_factory):
    """(family, **config overrides) -> folder of a saved mini model (config, safetensors, tokenizer), made on first
    use. Its native context is CONTEXT tokens: the mini tokenizer spells chat-format markers it lacks (Llama 3's
    headers) in dozens of byte tokens, so a short conversation takes a few hundred."""
    from mini import save_mini_model

    root = tmp_path_factory.mktemp("compat-models")
    made: dict[tuple, Path] = {}

    def get(family: str, **overrides) -> str:
        key = (family, *sorted(overrides.items()))
        if key not in made:
            folder = root / f"{len(made)}"
            made[key] = save_mini_model(family, folder, max_position_embeddings=CONTEXT, **overrides)
        return str(made[key])

    return get
