"""Tournament: run every candidate, then single elimination by a pairwise judge."""

from __future__ import annotations

import numbers
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias

import anyio
import attrs

from branchagent.exceptions import StrategyError
from branchagent.strategy import (
    Arena,
    Branch,
    Candidate,
    Outcome,
    Strategy,
    Target,
    Trial,
    call,
    check_timeout,
    describe_error,
    get_logger,
    to_candidates,
)

from ._options import callable_as

__all__ = ["Judge", "Tournament"]

log = get_logger("branchagent.strategy")

Judge: TypeAlias = Callable[[Branch, Branch], Awaitable[int | Branch] | int | Branch]
"""``judge(branch_a, branch_b)`` (async or sync) returning ``0``, ``1`` or the winning branch."""

_UNDECIDED = "TimeoutError: the strategy's timeout expired during the match"


@attrs.define(kw_only=True, eq=False)
class Tournament(Strategy):
    """Every candidate runs; the successes play a single-elimination bracket; the champion commits.

    Candidates run as in :class:`~branchagent.BestOfN` (each in its own
    child branch of the target, at most ``max_parallel`` at a time); the
    ones that fail are eliminated before any judging. The rest are paired in
    candidate order, round after round; with an odd number standing the
    last one gets a bye and opens the next round (so byes rotate). The
    matches of a round are judged concurrently (at most ``max_parallel`` at
    once).

    ``judge(a, b)`` (async or sync) returns ``0`` or ``1``, or one of the two
    branches it was given; ``a`` is the one first in the bracket (candidate
    order, except that the holder of a bye opens its next round). The judge
    never touches the contestants: it gets a fresh fork of each, aborted
    after the match, so whatever it runs or writes there cannot reach the
    champion's commit. A judge that raises, returns anything else or takes
    longer than ``judge_timeout`` seconds costs BOTH contestants the match:
    neither advances, and each result's ``error`` says what the judge did.

    The champion (the last one standing) is committed; when nobody is left
    standing nothing is. ``timeout`` bounds the wall time of the whole run,
    candidates and judging together: a match still running when it expires
    is lost by both, nothing more is judged, and only an already decided
    champion is committed. Each result's ``info["matches"]`` lists the
    matches it played: ``round``, ``opponent`` (``None`` for a bye),
    ``won``, ``error``, ``duration``; ``Outcome.info`` says how many
    ``rounds`` were played, whether the bracket was ``decided`` and the
    ``champion``'s index (``None`` when nobody was left standing).
    """

    name = "tournament"

    candidates: tuple[Candidate, ...] = attrs.field(converter=to_candidates, kw_only=False)
    judge: Judge = attrs.field(validator=callable_as("a callable taking two branches"))
    judge_timeout: float | None = attrs.field(default=None, converter=check_timeout)

    async def run(self, target: Target) -> Outcome:
        async with self.open_arena(target) as arena:
            trials = await arena.run(self.candidates)
            standing = [t for t in trials if t.success]
            for t in trials:
                if t.success:
                    t.info["matches"] = []
                else:  # eliminated before judging; free its branch now
                    await arena.abort(t)
            round_no = 0
            decided = True
            while len(standing) > 1:
                if arena.timed_out:  # the deadline passed with the bracket still open
                    decided = False
                    break
                round_no += 1
                standing, complete = await self._round(arena, round_no, standing)
                if not complete:  # a match was cut by the strategy's timeout
                    decided = False
                    break
            champion = standing[0] if len(standing) == 1 and decided else None
            if champion is not None:
                await arena.commit(champion)
            return arena.outcome({"rounds": round_no, "decided": decided,
                                  "champion": champion.index if champion is not None else None})

    async def _round(
        self, arena: Arena, round_no: int, standing: list[Trial]
    ) -> tuple[list[Trial], bool]:
        """Play one round: who goes on (a bye first, then the winners in order), and
        whether every match ended (``False``: the strategy's timeout cut one).
        """
        pairs = [(standing[i], standing[i + 1]) for i in range(0, len(standing) - 1, 2)]
        bye = standing[-1] if len(standing) % 2 else None
        decided: dict[int, Trial | None] = {}
        slots = anyio.Semaphore(self.max_parallel or len(pairs))
        with arena.deadline_scope():
            async with anyio.create_task_group() as tg:
                for k, (a, b) in enumerate(pairs):
                    tg.start_soon(self._match, arena, round_no, k, a, b, decided, slots)
        if bye is not None:
            bye.info["matches"].append(
                {"round": round_no, "opponent": None, "won": True, "error": None,
                 "duration": 0.0})
        for k, (a, b) in enumerate(pairs):
            if k not in decided:  # cut by the strategy's timeout: lost by both
                for t, other in ((a, b), (b, a)):
                    t.error = _UNDECIDED
                    t.info["matches"].append(
                        {"round": round_no, "opponent": other.index, "won": False,
                         "error": _UNDECIDED, "duration": None})
        winners = [w for k in range(len(pairs)) if (w := decided.get(k)) is not None]
        for a, b in pairs:
            for t in (a, b):
                if t not in winners:
                    await arena.abort(t)
        return ([bye] if bye is not None else []) + winners, len(decided) == len(pairs)

    async def _match(
        self, arena: Arena, round_no: int, k: int, a: Trial, b: Trial,
        decided: dict[int, Trial | None], slots: anyio.Semaphore,
    ) -> None:
        async with slots:
            started = time.monotonic()
            winner: Trial | None = None
            error: str | None = None
            with anyio.move_on_after(self.judge_timeout) as bound:
                try:
                    winner = await self._judge(arena, a, b)
                except Exception as exc:
                    error = describe_error(exc)
            if bound.cancelled_caught:
                error = (f"TimeoutError: the judge took longer than "
                         f"judge_timeout={self.judge_timeout:g} s")
            duration = time.monotonic() - started
        # Recorded only for a match that ended (no checkpoint from here on): one cut by
        # the strategy's timeout is not in ``decided``.
        decided[k] = winner
        for t, other in ((a, b), (b, a)):
            if error is not None:
                t.error = f"{error} (the judge, round {round_no}, against candidate {other.index})"
            t.info["matches"].append({"round": round_no, "opponent": other.index,
                                      "won": t is winner, "error": error, "duration": duration})
        log.info("match_judged", strategy=self.name, round=round_no, a=a.index, b=b.index,
                 winner=winner.index if winner is not None else None, error=error,
                 duration_ms=round(duration * 1e3, 3))

    async def _judge(self, arena: Arena, a: Trial, b: Trial) -> Trial:
        """The judge's pick between ``a`` and ``b``, judged on throwaway forks of both."""
        async with arena.open_scratch(a) as view_a, arena.open_scratch(b) as view_b:
            value: Any = await call(self.judge, view_a, view_b)
        if value is view_a:
            return a
        if value is view_b:
            return b
        if not isinstance(value, bool) and isinstance(value, numbers.Integral) and value in (0, 1):
            return (a, b)[int(value)]
        raise StrategyError(
            f"the judge returned {type(value).__name__} {repr(value)[:200]}; "
            "expected 0, 1 or one of the two branches it was given"
        )
