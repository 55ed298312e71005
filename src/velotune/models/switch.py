"""Module-level switches of models/: a one-element list set for the duration of a `with` block."""
from __future__ import annotations

import contextlib


@contextlib.contextmanager
def switched(cell: list, value):
    """cell[0] = value inside the block; the previous value again after it (nesting restores)."""
    prev, cell[0] = cell[0], value
    try:
        yield
    finally:
        cell[0] = prev
