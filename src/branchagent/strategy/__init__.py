"""The strategy kit: what every strategy is built with, built-in or plugin.

A *strategy* forks a target (a :class:`~branchagent.Workspace` or a
:class:`~branchagent.Branch`) into one branch per *candidate*, runs the
candidates, and commits at most one winner into the target while every
other branch is aborted. Running on a branch makes strategies nest: the
forks are children of that branch and the winner commits into it, so a
strategy can stand where a candidate stands.

A candidate is one of:

- an async or sync callable taking the :class:`~branchagent.Branch` and
  returning ``bool``, a number (success with that score), ``(bool, float)``
  or a :class:`Verdict`. Sync callables run in a worker thread;
- a :class:`Command`: success is exit status 0; a score may be written to
  the file named by ``$BRANCHAGENT_SCORE_FILE`` or to file descriptor 3;
- an :class:`Isolated` callable, run in a sandboxed child process;
- an :class:`InSession` callable, run on the live interpreter of its node (a fork
  of its parent node's session: see the "Stateful agents" page);
- a :class:`Strategy` instance, run on the candidate's branch: success is
  "it committed", the score is its winner's.

Anything else returned makes a failed candidate with a
:class:`~branchagent.CandidateError` recorded (never a success); an
exception makes a failed candidate with the exception's type name and
message recorded.

The kit, the same one the built-in strategies use:

- :class:`Strategy`: the base class; subclasses are attrs classes declaring
  their own fields (``@attrs.define(kw_only=True, eq=False)``: strategies
  compare and hash by identity), and inherit ``timeout``, ``max_parallel`` and
  ``executor`` (validated here) and :meth:`Strategy.open_arena`;
- :func:`to_candidates` (or :func:`to_candidates_or_empty`), the converter of a
  strategy's candidates field: a non-empty collection of candidates, else
  :class:`~branchagent.InvalidCandidates` (:func:`check_candidates` does the checks);
- :class:`Arena` and :class:`Trial`: the branches of one run and the
  candidates run in them (:meth:`Arena.run`, :meth:`Arena.commit`,
  :meth:`Arena.open_scratch`, :meth:`Arena.outcome`); every trial emits
  ``candidate_started`` / ``candidate_finished`` events and a commit
  ``winner_committed`` (see :func:`branchagent.observe`);
- values: :class:`Verdict`, :class:`Command`, :class:`Isolated`,
  :class:`Result`, :class:`Outcome`; the environment variables a
  :class:`Command` gets (:data:`SCORE_FILE_ENV`, :data:`FEEDBACK_ENV`,
  :data:`ATTEMPT_ENV`);
- candidate adapters: :func:`run_candidate`, :func:`to_verdict`,
  :func:`from_outcome`, :func:`call` (user callbacks, sync or async);
- the executor seam: :class:`Executor`, :class:`LocalExecutor`;
- what a strategy works on: :class:`~branchagent.Branch` and
  :class:`~branchagent.BranchState` (the same classes as ``branchagent``'s);
- the registry: :func:`get_strategy`, :func:`available_strategies`,
  :data:`GROUP` (the ``branchagent.strategies`` entry-point group);
- :func:`get_logger`: the library's logger (silent until the application
  configures :mod:`logging` or structlog).

See the "Writing a strategy" page of the documentation for a walk-through.
"""

from __future__ import annotations

from .._branch import Branch, BranchState
from .._log import get_logger
from ._arena import AfterHook, Arena, StopRule, Trial, open_arena, pick_best, rank_key
from ._base import Strategy, check_candidates, to_candidates, to_candidates_or_empty
from ._candidates import (
    Candidate,
    Target,
    call,
    from_outcome,
    is_async_callable,
    run_candidate,
)
from ._executor import Executor, LocalExecutor
from ._in_session import InSession, node_session, session_of
from ._registry import GROUP, available_strategies, get_strategy
from ._root import check_max_parallel, check_timeout, deadline_after
from ._values import (
    ATTEMPT_ENV,
    FEEDBACK_ENV,
    SCORE_FILE_ENV,
    Command,
    Isolated,
    Outcome,
    Result,
    Verdict,
    VerdictLike,
    describe_error,
    to_verdict,
)

__all__ = [
    "ATTEMPT_ENV",
    "FEEDBACK_ENV",
    "GROUP",
    "SCORE_FILE_ENV",
    "AfterHook",
    "Arena",
    "Branch",
    "BranchState",
    "Candidate",
    "Command",
    "Executor",
    "InSession",
    "Isolated",
    "LocalExecutor",
    "Outcome",
    "Result",
    "StopRule",
    "Strategy",
    "Target",
    "Trial",
    "Verdict",
    "VerdictLike",
    "available_strategies",
    "call",
    "check_candidates",
    "check_max_parallel",
    "check_timeout",
    "deadline_after",
    "describe_error",
    "from_outcome",
    "get_logger",
    "get_strategy",
    "is_async_callable",
    "node_session",
    "open_arena",
    "pick_best",
    "rank_key",
    "run_candidate",
    "session_of",
    "to_candidates",
    "to_candidates_or_empty",
    "to_verdict",
]
