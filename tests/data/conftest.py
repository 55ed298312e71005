"""tests/data: one intra-op thread. The models here are tiny; with 2 threads on a shared 2-core machine a
mini-model step measured 1 s instead of 16 ms (threads spinning against each other)."""
import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every data test runs with one intra-op thread (tests/conftest.py: one_thread)."""
    yield
