"""Limits and parse_size: units, validation, and the messages a user sees."""

from __future__ import annotations

import re

import attrs
import pytest

import branchagent as ba
from branchagent._limits import parse_size


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (1, 1),
        (4096, 4096),
        ("4096", 4096),
        ("10B", 10),
        ("1K", 1 << 10),
        ("1k", 1 << 10),
        ("64KiB", 64 << 10),
        ("64kb", 64 << 10),
        ("512M", 512 << 20),
        ("512MiB", 512 << 20),
        (" 2 M ", 2 << 20),
        ("1.5G", (3 << 30) // 2),
        ("1.5K", 1536),
        ("2T", 2 << 40),
        ("2TB", 2 << 40),
        (None, None),
    ],
)
def test_parse_size_units(raw: int | str | None, expected: int | None) -> None:
    assert parse_size(raw) == expected


@pytest.mark.parametrize(
    "raw", ["", "abc", "M", "12Q", "1e3", "-5M", "1.5.2G", "5 M B", "0x10", "MiB12"]
)
def test_parse_size_unreadable_strings(raw: str) -> None:
    with pytest.raises(ValueError, match=r"cannot read .* as a size; use e\.g\. 512M"):
        parse_size(raw)


@pytest.mark.parametrize("raw", [0, -1, "0", "0M", "0.1", "0.0001K"])
def test_parse_size_not_positive(raw: int | str) -> None:
    with pytest.raises(ValueError, match="size must be positive"):
        parse_size(raw)


def test_parse_size_rejects_bool() -> None:
    with pytest.raises(TypeError, match="not a bool"):
        parse_size(True)


def test_limits_defaults() -> None:
    lim = ba.Limits()
    assert lim.memory is None
    assert lim.pids is None
    assert lim.cpu is None
    assert lim.timeout is None
    assert lim.output == 10 << 20
    assert lim.network is True


def test_limits_converts_sizes() -> None:
    lim = ba.Limits(memory="512M", output="64KiB", pids=256, cpu=1.5, timeout=60)
    assert lim.memory == 512 << 20
    assert lim.output == 64 << 10
    assert lim.pids == 256
    assert lim.cpu == 1.5
    assert lim.timeout == 60
    assert ba.Limits(output=None).output is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pids": 0}, "Limits.pids must be positive, got 0"),
        ({"pids": -3}, "Limits.pids must be positive, got -3"),
        ({"cpu": 0}, "Limits.cpu must be positive, got 0"),
        ({"cpu": -0.5}, "Limits.cpu must be positive, got -0.5"),
        ({"timeout": 0}, "Limits.timeout must be positive, got 0"),
        ({"timeout": -1.0}, "Limits.timeout must be positive, got -1.0"),
        ({"memory": 0}, "size must be positive, got 0"),
        ({"memory": "lots"}, "cannot read 'lots' as a size"),
        ({"output": "-1M"}, "cannot read '-1M' as a size"),
        ({"output": "0K"}, "size must be positive, got '0K'"),
    ],
)
def test_limits_validation_messages(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        ba.Limits(**kwargs)  # type: ignore[arg-type]


def test_limits_is_frozen_and_keyword_only() -> None:
    lim = ba.Limits(timeout=1)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        lim.timeout = 2  # type: ignore[misc]
    with pytest.raises(TypeError):
        ba.Limits(10)  # type: ignore[call-arg]
    assert ba.Limits(memory="1K") == ba.Limits(memory=1024)
    assert hash(ba.Limits(memory="1K")) == hash(ba.Limits(memory=1024))
