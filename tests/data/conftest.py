"""tests/data: one intra-op thread. The models here are tiny; with 2 threads on a shared 2-core machine a
mini-model step measured 1 s instead of 16 ms (threads spinning against each other)."""

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every data test runs with one intra-op thread (tests/conftest.py: one_thread)."""
    yield


@pytest.fixture(scope="module")
def chatml_tok():
    """The mini tokenizer with velotune's chatml template, its markers single tokens (added with model=, as
    `velotune train` does; module scope: built once per file)."""
    import logging

    from mini import mini_model, mini_tokenizer

    from velotune.data.chat_templates import get_chat_template

    logging.disable(logging.WARNING)
    try:
        return get_chat_template(mini_tokenizer(), "chatml", model=mini_model("llama"))
    finally:
        logging.disable(logging.NOTSET)
