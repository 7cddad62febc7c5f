"""The executor seam: where candidates execute.

The :class:`Executor` protocol is defined with the other seams' protocols in
:mod:`branchagent._protocols` and re-exported here.
"""

from __future__ import annotations

from .._branch import Branch
from .._protocols import Executor
from ._candidates import Candidate, run_candidate
from ._values import Verdict

__all__ = ["Executor", "LocalExecutor"]


class LocalExecutor:
    """The default executor: run the candidate in this process (:func:`run_candidate`)."""

    async def execute(self, candidate: Candidate, branch: Branch) -> Verdict:
        return await run_candidate(candidate, branch)

    def __repr__(self) -> str:
        return "LocalExecutor()"
