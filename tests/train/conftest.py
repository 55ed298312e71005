"""Fixtures for the training tests: a saved mini Llama (helpers live in train_setup.py)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def mini_llama(tmp_path_factory) -> Path:
    from mini import save_mini_model

    return save_mini_model("llama", tmp_path_factory.mktemp("models"))
