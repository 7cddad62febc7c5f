"""Resource limits for processes run in a branch."""

from __future__ import annotations

import re
from typing import Any

import attrs

from .exceptions import InvalidLimits

__all__ = ["Limits", "parse_size"]

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(value: int | str | None) -> int | None:
    """Bytes from an int or a human size: ``"512M"``, ``"1.5G"``, ``"64KiB"``."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError("a size must be an int or a string like '512M', not a bool")
    if not isinstance(value, int | str):
        raise TypeError(f"a size must be an int or a string like '512M', not {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"size must be positive, got {value}")
        return value
    m = _SIZE.match(value)
    if m is None:
        raise ValueError(f"cannot read {value!r} as a size; use e.g. 512M, 1.5G, 4096")
    n = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if n <= 0:
        raise ValueError(f"size must be positive, got {value!r}")
    return n


def _field_size(field: str, value: int | str | None) -> int | None:
    """:func:`parse_size`, with errors naming ``Limits.<field>`` (:class:`InvalidLimits`)."""
    try:
        return parse_size(value)
    except (TypeError, ValueError) as exc:
        raise InvalidLimits(f"Limits.{field}: {exc}; or None for no limit") from None


# (Named functions, not a factory: the attrs plugin of mypy reads converters' types.)
def _memory_size(value: int | str | None) -> int | None:
    return _field_size("memory", value)


def _output_size(value: int | str | None) -> int | None:
    return _field_size("output", value)


def _disk_size(value: int | str | None) -> int | None:
    return _field_size("disk", value)


def _positive_or_none(_inst: object, attr: attrs.Attribute[Any], value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidLimits(f"Limits.{attr.name} must be a number, got {value!r}; "
                            "pass a positive number, or None for no limit")
    if value != value or value in (float("inf"), float("-inf")):
        raise InvalidLimits(f"Limits.{attr.name} must be a finite number, got {value}; "
                            "pass None for no limit")
    if value <= 0:
        raise InvalidLimits(f"Limits.{attr.name} must be positive, got {value}; "
                            "pass None for no limit")


def _positive_int_or_none(inst: object, attr: attrs.Attribute[Any], value: Any) -> None:
    if isinstance(value, float):
        raise InvalidLimits(f"Limits.{attr.name} must be a whole number, got {value!r}; "
                            f"e.g. {attr.name}={max(1, int(value))}")
    _positive_or_none(inst, attr, value)


def _is_bool(_inst: object, attr: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, bool):
        raise InvalidLimits(f"Limits.{attr.name} must be True or False, got {value!r}; "
                            f"pass {attr.name}=False for no network, True (the default) "
                            "to keep the host's")


@attrs.frozen(kw_only=True)
class Limits:
    """Limits for one process tree. ``None`` means unlimited.

    ``memory``, ``output`` and ``disk`` take bytes or human sizes (``"512M"``);
    ``cpu`` is a number of CPUs (``1.5``); ``timeout`` is wall-clock seconds;
    ``network`` false gives the process an empty network namespace.

    Every field is checked on construction: a wrong type or value raises
    :class:`~branchagent.InvalidLimits` (a ``ValueError``) naming the field and the fix.

    ``disk`` caps the bytes the branch's copy-on-write layers may hold (see
    :meth:`Branch.usage`) while the run runs: a write that would pass it fails
    with ``EDQUOT`` inside the branch. Backends that cannot enforce it say so in
    ``RunResult.not_enforced``; the FUSE backend enforces it (``"disk:fuse"``).
    """

    memory: int | None = attrs.field(default=None, converter=_memory_size)
    pids: int | None = attrs.field(default=None, validator=_positive_int_or_none)
    cpu: float | None = attrs.field(default=None, validator=_positive_or_none)
    timeout: float | None = attrs.field(default=None, validator=_positive_or_none)
    output: int | None = attrs.field(default=10 << 20, converter=_output_size)
    network: bool = attrs.field(default=True, validator=_is_bool)
    disk: int | None = attrs.field(default=None, converter=_disk_size)
