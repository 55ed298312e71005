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


def positive_int(text: str) -> int:
    value = _number(text, int, "a positive whole number")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} is not a positive whole number")
    return value


def non_negative_float(text: str) -> float:
    value = _number(text, float, "a number >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is not a number >= 0")
    return value


def positive_float(text: str) -> float:
    value = _number(text, float, "a number > 0")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a number > 0")
    return value


def probability(text: str) -> float:
    """A number in (0, 1] (nucleus sampling's top-p)."""
    value = _number(text, float, "a number in (0, 1]")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not a number in (0, 1]")
    return value


def byte_size(text: str) -> int:
    """'5GB', '500MB', '2GiB', '1048576' -> bytes (velotune.export.safetensors_io.parse_size)."""
    from velotune.errors import ConfigError
    from velotune.export.safetensors_io import parse_size

    try:
        return parse_size(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
