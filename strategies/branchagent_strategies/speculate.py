"""Speculate: run every candidate at once; the first success commits, the rest vanish."""

from __future__ import annotations

from collections.abc import Sequence

from branchagent._strategy import (
    Candidate,
    Executor,
    Outcome,
    Strategy,
    Target,
    check_max_parallel,
    check_timeout,
    deadline_after,
    open_arena,
)

__all__ = ["Speculate"]


class Speculate(Strategy):
    """First success wins.

    Every candidate runs in its own child branch of the target (at most
    ``max_parallel`` at a time). The first candidate to succeed is committed
    into the target; every other candidate is cancelled at that instant and
    the processes it started are killed, so the outcome arrives when the
    winner finishes, not when the slowest loser would have. ``timeout``
    bounds the wall time of the whole run (all candidates together); when it
    expires with no success, nothing is committed. Exactly one commit or
    none; no branch of the run is left open on any path.
    """

    name = "speculate"

    def __init__(
        self,
        candidates: Sequence[Candidate],
        *,
        max_parallel: int | None = None,
        timeout: float | None = None,
        executor: Executor | None = None,
    ) -> None:
        self.candidates: tuple[Candidate, ...] = tuple(candidates)
        self.max_parallel = check_max_parallel(max_parallel)
        self.timeout = check_timeout(timeout)
        self.executor = executor

    def __repr__(self) -> str:
        return (f"Speculate(<{len(self.candidates)} candidates>, max_parallel={self.max_parallel},"
                f" timeout={self.timeout})")

    async def run(self, target: Target) -> Outcome:
        deadline = deadline_after(self.timeout)
        async with open_arena(target, strategy=self.name, executor=self.executor,
                              max_parallel=self.max_parallel) as arena:
            await arena.run(self.candidates, deadline=deadline, stop=lambda t: t.success)
            if arena.stopped_by is not None:
                await arena.commit(arena.stopped_by)
            return arena.outcome()
