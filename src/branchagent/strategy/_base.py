"""The base class of every strategy: the common options, declared once."""

from __future__ import annotations

import abc
import contextlib
from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING, ClassVar

import attrs

from ._arena import Arena, open_arena
from ._root import AbstractStrategy, check_max_parallel, check_timeout, deadline_after

if TYPE_CHECKING:
    from ._candidates import Candidate, Target
    from ._executor import Executor
    from ._values import Outcome

__all__ = ["Strategy", "to_candidates"]


def to_candidates(candidates: Iterable[Candidate]) -> tuple[Candidate, ...]:
    """A converter for a strategy's candidates field: any iterable, kept as a tuple."""
    return tuple(candidates)


def _options_repr(self: Strategy) -> str:
    options = ", ".join(f"{a.name}={getattr(self, a.name, None)!r}"
                        for a in attrs.fields(Strategy))
    return f"{type(self).__name__}({options})"


@attrs.define(kw_only=True, eq=False, repr=False)
class Strategy(AbstractStrategy):
    """Base class of every strategy, built-in or plugin.

    ``await strategy.run(target)`` forks ``target`` (a workspace or a
    branch), runs candidates, commits at most one winner into ``target`` and
    leaves no branch of its own open on any path (success, failure, timeout,
    cancellation, exceptions). A strategy instance is also a candidate.

    Subclasses are attrs classes (``@attrs.define(kw_only=True, eq=False)``:
    a strategy, like this base, compares and hashes by identity) that
    declare only their own fields; the options every strategy shares are
    declared here, keyword-only and validated once:

    - ``timeout``: seconds of wall time for the whole run (``None``: none);
    - ``max_parallel``: how many candidates run at once (``None``: all);
    - ``executor``: where candidates execute (``None``: in this process).

    :meth:`open_arena` opens an :class:`~branchagent.strategy.Arena` on the
    target that applies all three.
    """

    #: The name the strategy logs under (its entry-point name by convention).
    name: ClassVar[str] = "strategy"

    timeout: float | None = attrs.field(default=None, converter=check_timeout)
    max_parallel: int | None = attrs.field(default=None, converter=check_max_parallel)
    executor: Executor | None = None

    __repr__ = _options_repr  # for subclasses that are not attrs classes

    @abc.abstractmethod
    async def run(self, target: Target) -> Outcome:
        """Run on ``target`` and say what happened."""

    @contextlib.asynccontextmanager
    async def open_arena(self, target: Target) -> AsyncIterator[Arena]:
        """An arena on ``target`` with this strategy's name, executor, parallelism and deadline.

        The deadline is ``timeout`` seconds from now: every
        :meth:`Arena.run <branchagent.strategy.Arena.run>` is bounded by it.
        On exit, on every path, no branch of the arena is left open.
        """
        async with open_arena(
            target, strategy=self.name, executor=self.executor,
            max_parallel=self.max_parallel, deadline=deadline_after(self.timeout),
        ) as arena:
            yield arena
