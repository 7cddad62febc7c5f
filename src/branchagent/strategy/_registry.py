"""The registry: strategies found by name in the ``branchagent.strategies`` entry-point group."""

from __future__ import annotations

from importlib.metadata import entry_points

from ..exceptions import StrategyError, StrategyNotFound
from ._base import Strategy

__all__ = ["GROUP", "available_strategies", "get_strategy"]

#: The entry-point group strategies (built-in and third-party) register in.
GROUP = "branchagent.strategies"

def available_strategies() -> list[str]:
    """Names registered in the ``branchagent.strategies`` entry-point group."""
    return sorted({ep.name for ep in entry_points(group=GROUP)})


def get_strategy(name: str) -> type[Strategy]:
    """The strategy class registered under ``name`` (built-in or plugin).

    Raises :class:`StrategyNotFound` (a ``LookupError``) listing the known
    names, or :class:`StrategyError` when the entry point cannot be loaded or
    is not a :class:`Strategy` subclass.
    """
    found = {ep.value: ep for ep in entry_points(group=GROUP) if ep.name == name}
    if not found:
        known = ", ".join(available_strategies()) or "none"
        raise StrategyNotFound(f"no strategy named {name!r}; registered strategies: {known}")
    if len(found) > 1:
        raise StrategyError(
            f"several plugins register a strategy named {name!r}: {', '.join(sorted(found))}"
        )
    (ep,) = found.values()
    try:
        obj = ep.load()
    except Exception as exc:
        raise StrategyError(f"cannot load strategy {name!r} ({ep.value}): {exc}") from exc
    if not (isinstance(obj, type) and issubclass(obj, Strategy)):
        raise StrategyError(f"entry point {name!r} ({ep.value}) is not a Strategy subclass")
    return obj
