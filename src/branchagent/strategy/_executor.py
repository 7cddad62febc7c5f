"""The executor seam: where candidates execute."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from .._branch import Branch
from ._candidates import Candidate, run_candidate
from ._values import Verdict

__all__ = ["Executor", "LocalExecutor"]


@runtime_checkable
class Executor(Protocol):
    """Where candidates execute. The strategy forks and commits; the executor runs.

    ``execute`` runs ``candidate`` so that its effects land in ``branch`` and
    returns its verdict, raising what the candidate raised (see
    :func:`run_candidate`). Strategies call it from their own task group, so
    concurrency and cancellation stay structured: a remote executor awaits
    its worker and, when cancelled, must stop it before returning.
    """

    async def execute(self, candidate: Candidate, branch: Branch) -> Verdict: ...


class LocalExecutor:
    """The default executor: run the candidate in this process (:func:`run_candidate`)."""

    async def execute(self, candidate: Candidate, branch: Branch) -> Verdict:
        return await run_candidate(candidate, branch)

    def __repr__(self) -> str:
        return "LocalExecutor()"
