"""Reflexion: try, critique the failure, try again with the critique; commit the first success."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias

import attrs

from branchagent.exceptions import CandidateError
from branchagent.strategy import (
    FEEDBACK_ENV,
    Arena,
    Branch,
    BranchState,
    Candidate,
    Command,
    Outcome,
    Result,
    Strategy,
    Target,
    Trial,
    Verdict,
    VerdictLike,
    call,
    describe_error,
    get_logger,
)

from ._tasks import bind, describe_failure, env_text

__all__ = ["Critique", "Reflexion", "ReflexionTask"]

log = get_logger("branchagent.strategy")

ReflexionTask: TypeAlias = (
    Callable[[Branch, str | None], Awaitable[VerdictLike | Outcome] | VerdictLike | Outcome]
    | Command
)
"""``task(branch, feedback)`` (async or sync), or a Command reading ``$BRANCHAGENT_FEEDBACK``."""

Critique: TypeAlias = Callable[[Branch, Result], Awaitable[str] | str] | Command
"""``critique(branch, result)`` returning text (async or sync), or a Command whose output is it."""


@attrs.define(kw_only=True, eq=False)
class Reflexion(Strategy):
    """Sequential attempts, each told why the previous one failed.

    Attempt ``k`` runs ``task(branch, feedback)`` in a fresh child branch of
    the target; ``feedback`` is ``None`` the first time, then the feedback of
    attempt ``k - 1``. The first attempt that succeeds is committed and the
    run stops; a failed attempt's branch is aborted before the next starts,
    so attempts never see each other's changes.

    The feedback of a failed attempt is what ``critique(branch, result)``
    returns. The critique runs in the failed attempt's own branch (it sees
    exactly what the attempt left; what it writes vanishes with the branch)
    and goes through the executor like a candidate; wrap heavy or untrusted
    work in ``branch.call`` to run it in a sandboxed process. A
    :class:`~branchagent.Command` critique runs in that branch too, with the
    failure's own description in ``$BRANCHAGENT_FEEDBACK``; its stdout and
    stderr are the feedback, whatever its exit status. A critique that
    raises (or returns something other than text) is recorded in the
    attempt's ``info["critique"]`` and the next attempt gets the error text.
    Without a critique the feedback is the failure's own description (see
    ``describe_failure``: the candidate's ``Verdict.info["feedback"]``, its
    error, a command's exit status and output). The last attempt is not
    critiqued.

    A :class:`~branchagent.Command` task gets the feedback in
    ``$BRANCHAGENT_FEEDBACK`` (empty the first time, at most 64 KiB, the end
    kept). A task may also run a strategy on its branch and return the
    :class:`~branchagent.Outcome` (success: it committed).

    A success whose commit is refused (a conflict with the target) counts as
    a failure: the next attempt gets the error. ``timeout`` bounds the wall
    time of the whole run, attempts and critiques together; when it expires
    nothing more is committed. Each attempt's ``info`` holds the feedback it
    received (``received_feedback``) and, when it was critiqued, the
    ``critique`` record (``feedback``, ``error``, ``duration``).
    """

    name = "reflexion"

    task: ReflexionTask = attrs.field(kw_only=False)
    max_attempts: int = attrs.field()
    critique: Critique | None = attrs.field(default=None)

    @task.validator
    def _check_task(self, _attr: object, task: object) -> None:
        if not (isinstance(task, Command) or callable(task)):
            raise TypeError(
                f"task must be a callable taking (branch, feedback) or a Command, not "
                f"{type(task).__name__}"
            )

    @max_attempts.validator
    def _check_max_attempts(self, _attr: object, n: object) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"max_attempts must be a positive int, got {n!r}")

    @critique.validator
    def _check_critique(self, _attr: object, critique: object) -> None:
        if critique is not None and not (isinstance(critique, Command) or callable(critique)):
            raise TypeError(
                f"critique must be a callable taking (branch, result), a Command or None, not "
                f"{type(critique).__name__}"
            )

    async def run(self, target: Target) -> Outcome:
        async with self.open_arena(target) as arena:
            feedback: str | None = None
            for attempt in range(self.max_attempts):
                candidate = bind(self.task, (feedback,), {FEEDBACK_ENV: env_text(feedback)})
                (trial,) = await arena.run([candidate])
                trial.info["received_feedback"] = feedback
                if trial.success and await arena.commit(trial):
                    break
                if arena.timed_out or attempt == self.max_attempts - 1:
                    break
                feedback = await self._reflect(arena, trial)
                if arena.timed_out:
                    break
            return arena.outcome()

    async def _reflect(self, arena: Arena, trial: Trial) -> str:
        """The feedback of the failed ``trial``; its branch is aborted afterwards, on every path."""
        branch = trial.branch
        try:
            result = trial.result()
            fallback = describe_failure(result)
            if self.critique is None:
                return fallback
            if branch is None or branch.state is not BranchState.OPEN:
                trial.info["critique"] = {
                    "feedback": fallback, "error": None, "duration": 0.0,
                    "skipped": "the attempt's branch is closed",
                }
                return fallback
            started = time.monotonic()
            record: dict[str, Any] = {"feedback": None, "error": None}
            with arena.deadline_scope() as scope:
                try:
                    verdict = await arena.executor.execute(self._critic(result, fallback), branch)
                except Exception as exc:
                    record["error"] = describe_error(exc)
                else:
                    record.update(_critique_record(verdict))
            record["duration"] = time.monotonic() - started
            if scope.cancelled_caught:
                record["error"] = "TimeoutError: the strategy's timeout expired during the critique"
            trial.info["critique"] = record
            log.info("critique_finished", strategy=self.name, index=trial.index,
                     branch=branch.name, error=record["error"],
                     duration_ms=round(record["duration"] * 1e3, 3))
            text = record["feedback"] if record["error"] is None else record["error"]
            return str(text)
        finally:
            await arena.abort(trial)

    def _critic(self, result: Result, fallback: str) -> Candidate:
        """The critique as a candidate-like callable (or Command) for the executor."""
        critique = self.critique
        if isinstance(critique, Command):
            return bind(critique, (), {FEEDBACK_ENV: env_text(fallback)})
        assert critique is not None

        async def critic(branch: Branch) -> Verdict:
            text = await call(critique, branch, result)
            if not isinstance(text, str):
                shown = repr(text)[:200]
                raise CandidateError(
                    f"the critique returned {type(text).__name__} {shown}; expected text"
                )
            return Verdict(True, None, {"feedback": text})

        return critic


def _critique_record(verdict: Verdict) -> dict[str, Any]:
    info = verdict.info
    if "returncode" not in info:  # a callable critique: its text
        return {"feedback": info["feedback"]}
    # A Command critique: its output is the feedback, whatever its exit status
    # (a test run that fails is exactly the feedback wanted).
    out = [str(info.get(k) or "").rstrip() for k in ("stdout_tail", "stderr_tail")]
    return {"feedback": "\n".join(t for t in out if t), "returncode": info["returncode"],
            "killed": info.get("killed")}
