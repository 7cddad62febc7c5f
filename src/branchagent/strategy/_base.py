"""The base class of every strategy: the common options, declared once."""

from __future__ import annotations

import abc
import contextlib
from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING, ClassVar

import attrs

from ..exceptions import InvalidCandidates
from ._arena import Arena, open_arena
from ._root import AbstractStrategy, check_max_parallel, check_timeout, deadline_after
from ._values import Command, Isolated

if TYPE_CHECKING:
    from ._candidates import Candidate, Target
    from ._executor import Executor
    from ._values import Outcome

__all__ = ["Strategy", "check_candidates", "to_candidates", "to_candidates_or_empty"]


def _is_candidate(value: object) -> bool:
    return isinstance(value, Command | Isolated | AbstractStrategy) or callable(value)


def check_candidates(candidates: object, *, allow_empty: bool = False) -> tuple[Candidate, ...]:
    """``candidates`` as a tuple, checked: a collection (not a string), whose every item is
    a candidate (a callable, a :class:`Command`, an :class:`Isolated` or a strategy), and
    not empty unless ``allow_empty``. Raises :class:`~branchagent.InvalidCandidates`
    naming the problem and the fix; the checks every strategy gets from
    :func:`to_candidates`."""
    if isinstance(candidates, str | bytes):
        raise InvalidCandidates(
            f"candidates must be a list of candidates, not the string {candidates!r:.60}: "
            "a string would be taken one character at a time; for one command pass "
            f"[Command([...])], e.g. [Command({_argv_hint(candidates)})]")
    if isinstance(candidates, Command | Isolated | AbstractStrategy) or (
            callable(candidates) and not isinstance(candidates, Iterable)):
        raise InvalidCandidates(
            f"candidates must be a list of candidates, not one candidate {candidates!r:.60}; "
            "wrap it in a list: [candidate]")
    if not isinstance(candidates, Iterable):
        raise InvalidCandidates(
            f"candidates must be a list (or other iterable) of candidates, not "
            f"{type(candidates).__name__} {candidates!r:.60}")
    items = tuple(candidates)
    for i, item in enumerate(items):
        if not _is_candidate(item):
            hint = (f"; for a command pass Command({_argv_hint(item)})"
                    if isinstance(item, str | bytes | list | tuple) else "")
            raise InvalidCandidates(
                f"candidates[{i}] is not a candidate: {type(item).__name__} {item!r:.60}; "
                "a candidate is a callable taking the branch, a Command, an Isolated or a "
                f"Strategy{hint}")
    if not items and not allow_empty:
        raise InvalidCandidates(
            "no candidates: the strategy would fork nothing and commit nothing; "
            "pass at least one candidate")
    return items


def _argv_hint(value: object) -> str:
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    if isinstance(value, str):
        return repr(value.split() or ["true"])
    return repr(list(value)) if isinstance(value, list | tuple) else "[...]"


def to_candidates(candidates: Iterable[Candidate]) -> tuple[Candidate, ...]:
    """A converter for a strategy's candidates field: a non-empty collection of
    candidates, kept as a tuple (:func:`check_candidates`)."""
    return check_candidates(candidates)


def to_candidates_or_empty(candidates: Iterable[Candidate]) -> tuple[Candidate, ...]:
    """:func:`to_candidates` for a strategy that may start with no candidates (its
    candidates come from elsewhere too, e.g. an ``expand`` callback)."""
    return check_candidates(candidates, allow_empty=True)


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
    - ``executor``: where candidates execute (``None``: in this process);
    - ``commit``: ``False`` makes the run a dry run: the winner is chosen as
      usual (``Outcome.info["uncommitted_winner"]`` is its index), then every
      branch is aborted and the target never changes.

    :meth:`open_arena` opens an :class:`~branchagent.strategy.Arena` on the
    target that applies all four.
    """

    #: The name the strategy logs under (its entry-point name by convention).
    name: ClassVar[str] = "strategy"

    timeout: float | None = attrs.field(default=None, converter=check_timeout)
    max_parallel: int | None = attrs.field(default=None, converter=check_max_parallel)
    executor: Executor | None = None
    commit: bool = attrs.field(default=True, validator=attrs.validators.instance_of(bool))

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
            commit=self.commit,
        ) as arena:
            yield arena
