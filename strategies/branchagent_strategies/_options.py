"""attrs validators for the built-ins' own options."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

__all__ = ["at_least", "callable_as"]

Validator = Callable[[Any, "attrs.Attribute[Any]", Any], None]


def at_least(minimum: int) -> Validator:
    """An int option of at least ``minimum`` (``ValueError`` otherwise; a bool is no int)."""

    def check(_inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{attr.name} must be an int >= {minimum}, got {value!r}")

    return check


def callable_as(what: str) -> Validator:
    """A callable option (``TypeError`` otherwise), described as ``what`` in the error."""

    def check(_inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
        if not callable(value):
            raise TypeError(f"{attr.name} must be {what}, not {type(value).__name__}")

    return check
