"""argparse number and size types: values in, one-line messages out."""

from __future__ import annotations

import argparse

import pytest

from velotune.argtypes import byte_size, non_negative_float, positive_float, positive_int, probability
from velotune.errors import ConfigError
from velotune.export.safetensors_io import parse_size


@pytest.mark.parametrize(
    "fn,good,bad",
    [
        (positive_int, {"1": 1, "256": 256}, ["0", "-5", "1.5", "x", ""]),
        (non_negative_float, {"0": 0.0, "0.7": 0.7}, ["-0.1", "nan", "inf", "hot"]),
        (positive_float, {"1": 1.0, "1.1": 1.1}, ["0", "-1", "nan"]),
        (probability, {"1": 1.0, "0.9": 0.9}, ["0", "1.01", "-0.5", "nan"]),
    ],
)
def test_number_types(fn, good, bad):
    for text, value in good.items():
        assert fn(text) == value
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError):
            fn(text)


def test_sizes():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500mb") == 500 * 10**6 and parse_size("2GiB") == 2 * 2**30
    assert parse_size("1.5GB") == 1_500_000_000 and parse_size("1048576") == 2**20 and parse_size(4096) == 4096
    assert parse_size(" 40 KB ") == 40_000 and parse_size("7B") == 7
    for bad in ("banana", "5 parsecs", "GB", "-5GB", "0", 0, -1, "1e9", True, 1.5):
        with pytest.raises(ConfigError, match="e.g. 5GB, 500MB, 2GiB"):
            parse_size(bad)
    assert byte_size("40KB") == 40_000
    with pytest.raises(argparse.ArgumentTypeError, match="'banana' is not a size"):
        byte_size("banana")
