"""An example third-party branchagent strategy: try candidates in turn, keep the first success."""

from __future__ import annotations

import attrs

from branchagent.strategy import Candidate, Outcome, Strategy, Target, to_candidates

__all__ = ["FirstSuccess"]


@attrs.define(kw_only=True, eq=False)
class FirstSuccess(Strategy):
    """Run the candidates one after another; commit the first that succeeds.

    Each candidate gets a fresh branch of the target; a failure is aborted
    before the next one starts, so at most one branch of this strategy is
    open at any time. Later candidates never run once one has succeeded.
    ``timeout``, ``max_parallel`` and ``executor`` come from the base class:
    ``timeout`` bounds the whole run.
    """

    name = "first_success"

    candidates: tuple[Candidate, ...] = attrs.field(converter=to_candidates, kw_only=False)

    async def run(self, target: Target) -> Outcome:
        async with self.open_arena(target) as arena:
            for candidate in self.candidates:
                (trial,) = await arena.run([candidate])
                if trial.success and await arena.commit(trial):
                    break
                await arena.abort(trial)
                if arena.timed_out:
                    break
            return arena.outcome()
