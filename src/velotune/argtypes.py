"""argparse `type=` functions for numbers and sizes: a bad value is argparse's one-line error, exit code 2.

    parser.add_argument("--max-new-tokens", type=positive_int, default=256)
    # velotune chat: error: argument --max-new-tokens: -5 is not a positive whole number

Each raises argparse.ArgumentTypeError, whose message argparse prints as it is (other exceptions turn
into a bare "invalid value").
"""

from __future__ import annotations

import argparse
import math


def _number(text: str, kind, what: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
    return value


def _within(text: str, kind, what: str, ok) -> int | float:
    """`text` as `kind`, which `ok(value)` must accept, else argparse's one-line error naming `what`."""
    value = _number(text, kind, what)
    if not ok(value):
        raise argparse.ArgumentTypeError(f"{value if kind is int else text} is not {what}")
    return value


def positive_int(text: str) -> int:
    return _within(text, int, "a positive whole number", lambda v: v > 0)


def non_negative_float(text: str) -> float:
    return _within(text, float, "a number >= 0", lambda v: v >= 0)


def positive_float(text: str) -> float:
    return _within(text, float, "a number > 0", lambda v: v > 0)


def probability(text: str) -> float:
    """A number in (0, 1] (nucleus sampling's top-p)."""
    return _within(text, float, "a number in (0, 1]", lambda v: 0 < v <= 1)


def byte_size(text: str) -> int:
    """'5GB', '500MB', '2GiB', '1048576' -> bytes (velotune.export.safetensors_io.parse_size)."""
    from velotune.errors import ConfigError
    from velotune.export.safetensors_io import parse_size

    try:
        return parse_size(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
