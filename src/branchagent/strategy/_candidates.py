"""Running one candidate in one branch, here: callables, commands, isolated calls, strategies."""

from __future__ import annotations

import functools
import inspect
import math
import os
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import anyio
import anyio.to_thread

from .._branch import Branch
from ..exceptions import CandidateError
from ._root import AbstractStrategy
from ._values import (
    SCORE_FILE_ENV,
    Command,
    Isolated,
    Outcome,
    Verdict,
    VerdictLike,
    to_verdict,
)

if TYPE_CHECKING:
    from .._workspace import Workspace

__all__ = [
    "Candidate",
    "Target",
    "call",
    "from_outcome",
    "is_async_callable",
    "run_candidate",
]

_TAIL_BYTES = 8192
_SCORE_BYTES = 4096

# Runs the command with fd 3 open (append) on the score file, so a program may
# write its score to either; ``exec`` keeps the pid and the process tree flat.
_SCORE_FD_SCRIPT = 'exec 3>>"$' + SCORE_FILE_ENV + '" && exec "$@"'

Candidate: TypeAlias = (
    Callable[[Branch], Awaitable[VerdictLike]]
    | Callable[[Branch], VerdictLike]
    | Command
    | Isolated
    | AbstractStrategy
)
"""An async or sync callable taking the branch, a :class:`Command`, an
:class:`Isolated` callable, or a :class:`Strategy`."""

Target: TypeAlias = "Workspace | Branch"
"""What a strategy runs on: a workspace, or a branch (nesting)."""


def is_async_callable(fn: object) -> bool:
    """Whether calling ``fn`` gives a coroutine (async def, a partial of one, async __call__)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 (an object with an async __call__)
    )


async def call(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` for user code: awaited when async, in a worker thread when sync.

    A sync callable cannot be interrupted: when the caller is cancelled its
    result is dropped and the thread finishes in the background. An awaitable
    returned by a sync callable is awaited here, on the loop.
    """
    if is_async_callable(fn):
        value = fn(*args)
    else:
        value = await anyio.to_thread.run_sync(
            functools.partial(fn, *args), abandon_on_cancel=True
        )
    if inspect.isawaitable(value):
        value = await value
    return value


def from_outcome(outcome: Outcome) -> Verdict:
    """A nested strategy's :class:`Outcome` as a verdict: success is "it committed"."""
    winner = outcome.winner
    return Verdict(
        outcome.committed,
        winner.score if winner is not None else None,
        {"outcome": outcome.to_dict()},
    )


async def run_candidate(candidate: Candidate, branch: Branch) -> Verdict:
    """Run one candidate in ``branch`` here, in this process, and return its verdict.

    Raises what the candidate raised, or :class:`CandidateError` for a
    return value that is not a verdict (or a candidate that is no candidate).
    A sync callable runs in a worker thread; it cannot be interrupted, so when
    the strategy is cancelled its result is dropped and the thread finishes in
    the background.
    """
    if isinstance(candidate, AbstractStrategy):
        return from_outcome(await candidate.run(branch))
    if isinstance(candidate, Command):
        return await _run_command(candidate, branch)
    if isinstance(candidate, Isolated):
        value = await branch.call(candidate.fn, limits=candidate.limits,
                                  isolate=candidate.isolate, env=candidate.env)
        return to_verdict(value)
    if not callable(candidate):
        raise CandidateError(
            f"{type(candidate).__name__} is not a candidate: pass a callable taking the "
            "branch, a Command or a Strategy"
        )
    return to_verdict(await call(candidate, branch))


async def _run_command(cmd: Command, branch: Branch) -> Verdict:
    # The system's temp dir: outside the branch, and visible to an isolated process (which
    # sees the branch over the workspace path and has the state dir hidden).
    score_dir = Path(await anyio.to_thread.run_sync(tempfile.mkdtemp, None, "branchagent-score-"))
    score_file = score_dir / "score"
    env = dict(cmd.env or {})
    env[SCORE_FILE_ENV] = os.fspath(score_file)
    argv = ["/bin/sh", "-c", _SCORE_FD_SCRIPT, "branchagent-command", *cmd.argv]
    try:
        r = await branch.run(argv, limits=cmd.limits, isolate=cmd.isolate, env=env)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(shutil.rmtree, score_dir, True)
        raise
    with anyio.CancelScope(shield=True):  # one worker-thread trip: read, then remove
        raw = await anyio.to_thread.run_sync(_take_tail, score_dir, score_file, _SCORE_BYTES)
    score = _parse_score(raw)
    info: dict[str, Any] = {
        "argv": list(cmd.argv),
        "returncode": r.returncode,
        "killed": r.killed,
        "isolated": r.isolated,
        "run_duration": r.duration,
        "stdout_tail": r.stdout[-_TAIL_BYTES:],
        "stderr_tail": r.stderr[-_TAIL_BYTES:],
        "stdout_chars": len(r.stdout),
        "stderr_chars": len(r.stderr),
    }
    return Verdict(r.ok, score, info)


def _take_tail(tmp: Path, path: Path, size: int) -> str:
    try:
        return _read_tail(path, size)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read_tail(path: Path, size: int) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - size))
            return f.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""


def _parse_score(raw: str) -> float | None:
    lines = [line.strip() for line in raw.splitlines() if line.strip()]
    if not lines:
        return None
    try:
        score = float(lines[-1])
    except ValueError:
        raise CandidateError(
            f"the command wrote {lines[-1][:100]!r} as its score; write a number"
        ) from None
    if math.isnan(score):
        raise CandidateError("the command wrote NaN as its score")
    return score
