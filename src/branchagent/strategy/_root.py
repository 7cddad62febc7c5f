"""The bottom of the kit: the option checks, and the abstract root every strategy derives from.

It imports no other module of the kit at run time, so that the candidate adapters
(a strategy can stand where a candidate stands) and the arena (which checks
``max_parallel``) need not import :mod:`._base`, which opens an arena: the kit's
module graph stays acyclic (``_root`` < ``_values`` < ``_candidates`` <
``_executor`` < ``_arena`` < ``_base`` < ``_registry``).
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING

import anyio

if TYPE_CHECKING:
    from ._candidates import Target
    from ._values import Outcome

__all__ = ["AbstractStrategy", "check_max_parallel", "check_timeout", "deadline_after"]


def check_timeout(timeout: float | None) -> float | None:
    """``timeout`` if it is a positive number of seconds or ``None``, else ``ValueError``."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout!r}")
    return float(timeout)


def check_max_parallel(max_parallel: int | None) -> int | None:
    """``max_parallel`` if it is a positive int or ``None``, else ``ValueError``."""
    if max_parallel is None:
        return None
    if isinstance(max_parallel, bool) or not isinstance(max_parallel, int) or max_parallel < 1:
        raise ValueError(f"max_parallel must be a positive int or None, got {max_parallel!r}")
    return max_parallel


def deadline_after(timeout: float | None) -> float | None:
    """The deadline ``timeout`` seconds from now on anyio's clock (``None``: no deadline)."""
    return None if timeout is None else anyio.current_time() + timeout


class AbstractStrategy(abc.ABC):
    """What the kit's lower modules know of a strategy: something with ``await run(target)``.

    :class:`~branchagent.strategy.Strategy` derives from it (subclass that, not
    this); :func:`~branchagent.strategy.run_candidate` recognises a strategy
    standing as a candidate by it.
    """

    __slots__ = ()

    @abc.abstractmethod
    async def run(self, target: Target) -> Outcome:
        """Run on ``target`` and say what happened."""
