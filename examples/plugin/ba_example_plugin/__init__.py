"""An example third-party branchagent strategy: try candidates in turn, keep the first success."""

from __future__ import annotations

import time
from collections.abc import Sequence

import anyio

import branchagent as ba

__all__ = ["FirstSuccess"]


class FirstSuccess(ba.Strategy):
    """Run the candidates one after another; commit the first that succeeds.

    Each candidate gets a fresh branch of the target; a failure is aborted
    before the next one starts, so at most one branch of this strategy is
    open at any time. Later candidates never run once one has succeeded.
    """

    name = "first_success"

    def __init__(self, candidates: Sequence[ba.Candidate]) -> None:
        self.candidates = tuple(candidates)

    async def run(self, target: ba.Workspace | ba.Branch) -> ba.Outcome:
        started = time.monotonic()
        results: list[ba.Result] = []
        winner: ba.Result | None = None
        for index, candidate in enumerate(self.candidates):
            branch = await target.fork()
            t0 = time.monotonic()
            try:
                error: str | None = None
                try:
                    verdict = await ba.run_candidate(candidate, branch)
                except Exception as exc:
                    verdict, error = ba.Verdict(False), f"{type(exc).__name__}: {exc}"
                changes = tuple(c.path for c in await branch.changes())
                success = verdict.success and error is None
                if success:
                    with anyio.CancelScope(shield=True):
                        await branch.commit()
                result = ba.Result(
                    index=index, success=success, score=verdict.score,
                    duration=time.monotonic() - t0, error=error, branch=branch.name,
                    changes=changes, info=verdict.info,
                )
            finally:
                with anyio.CancelScope(shield=True):
                    await branch.abort()  # a no-op once committed
            results.append(result)
            if success:
                winner = result
                break
        return ba.Outcome(
            committed=winner is not None, winner=winner, results=tuple(results),
            strategy=self.name, duration=time.monotonic() - started,
        )
