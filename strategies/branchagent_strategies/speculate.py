"""Speculate: run every candidate at once; the first success commits, the rest vanish."""

from __future__ import annotations

import attrs

from branchagent.strategy import Candidate, Outcome, Strategy, Target, to_candidates

__all__ = ["Speculate"]


@attrs.define(kw_only=True, eq=False)
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

    candidates: tuple[Candidate, ...] = attrs.field(converter=to_candidates, kw_only=False)

    async def run(self, target: Target) -> Outcome:
        async with self.open_arena(target) as arena:
            await arena.run(self.candidates, stop=lambda t: t.success)
            if arena.stopped_by is not None:
                await arena.commit(arena.stopped_by)
            return arena.outcome()
