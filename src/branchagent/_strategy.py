"""Strategies: the contract every strategy and candidate follows, and the registry.

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
- a :class:`Strategy` instance, run on the candidate's branch: success is
  "it committed", the score is its winner's.

Anything else returned makes a failed candidate with a :class:`CandidateError`
recorded (never a success); an exception makes a failed candidate with the
exception's type name and message recorded.

Candidates are executed through one seam, an :class:`Executor`
(:class:`LocalExecutor` by default: the candidate runs in this process, in a
task of the strategy's task group). A remote executor would ship the
branch's content to a worker and bring the delta back; the strategies do
not change.

Built-in strategies live in the ``branchagent_strategies`` package and are
registered in the ``branchagent.strategies`` entry-point group, the same
group third-party plugins use: :func:`get_strategy` finds both by name.
"""

from __future__ import annotations

import abc
import contextlib
import functools
import inspect
import itertools
import json
import math
import numbers
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeAlias, TypeVar, runtime_checkable

import anyio
import anyio.lowlevel
import anyio.to_thread
import attrs
import structlog
import structlog.contextvars

from ._branch import Branch, BranchState
from ._limits import Limits
from .exceptions import (
    BranchAgentError,
    BranchExists,
    CandidateError,
    StrategyError,
    StrategyNotFound,
)

if TYPE_CHECKING:
    from ._workspace import Workspace

__all__ = [
    "GROUP",
    "SCORE_FILE_ENV",
    "Arena",
    "Candidate",
    "Command",
    "Executor",
    "Isolated",
    "LocalExecutor",
    "Outcome",
    "Result",
    "Strategy",
    "Target",
    "Trial",
    "Verdict",
    "VerdictLike",
    "available_strategies",
    "check_max_parallel",
    "check_timeout",
    "deadline_after",
    "describe_error",
    "get_strategy",
    "open_arena",
    "pick_best",
    "run_candidate",
    "to_verdict",
]

log = structlog.get_logger("branchagent.strategy")

#: The entry-point group strategies (built-in and third-party) register in.
GROUP = "branchagent.strategies"

#: Environment variable naming the file a :class:`Command` may write its score to.
SCORE_FILE_ENV = "BRANCHAGENT_SCORE_FILE"

_T = TypeVar("_T")

_CLEANUP_TIMEOUT = 60.0
_TAIL_BYTES = 8192
_SCORE_BYTES = 4096

# Runs the command with fd 3 open (append) on the score file, so a program may
# write its score to either; ``exec`` keeps the pid and the process tree flat.
_SCORE_FD_SCRIPT = 'exec 3>>"$' + SCORE_FILE_ENV + '" && exec "$@"'


# -- values -------------------------------------------------------------------------


def _to_score(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"a score must be a number or None, not {type(value).__name__}")
    score = float(value)
    if math.isnan(score):
        raise ValueError("a score must not be NaN")
    return score


def _check_bool(_inst: object, attr: attrs.Attribute[bool], value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{attr.name} must be a bool, not {type(value).__name__}")


@attrs.frozen
class Verdict:
    """What a candidate says about its own branch: did it succeed, and how well.

    ``score`` is any number (higher is better) or ``None``; ``info`` is free
    form and is carried into the candidate's :class:`Result`.
    """

    success: bool = attrs.field(validator=_check_bool)
    score: float | None = attrs.field(default=None, converter=_to_score)
    info: Mapping[str, Any] = attrs.field(factory=dict)


def _to_argv(argv: Sequence[str | os.PathLike[str]]) -> tuple[str, ...]:
    if isinstance(argv, str | bytes) or not argv:
        raise ValueError("argv must be a non-empty sequence of strings, e.g. ['pytest', '-q']")
    return tuple(os.fspath(a) for a in argv)


@attrs.frozen
class Command:
    """A candidate that runs ``argv`` in the branch (see ``Branch.run``).

    Success is exit status 0 (and not killed). The process may report a
    score by writing a number to the file named by ``$BRANCHAGENT_SCORE_FILE``
    (a fresh path outside the branch and the workspace) or to file descriptor 3,
    which is open on the same file; the last non-empty line counts.
    """

    argv: tuple[str, ...] = attrs.field(converter=_to_argv)
    limits: Limits | None = attrs.field(default=None, kw_only=True)
    isolate: bool = attrs.field(default=True, kw_only=True)
    env: Mapping[str, str] | None = attrs.field(default=None, kw_only=True)


@attrs.frozen(kw_only=True)
class Result:
    """What became of one candidate in a strategy run.

    ``error`` is ``"TypeName: message"`` when the candidate raised, returned
    something that is not a verdict, was cancelled (``"Cancelled: ..."``) or
    timed out (``"TimeoutError: ..."``), else ``None``. ``branch`` is the
    name of the branch it ran in (gone by now unless it won), ``changes`` the
    paths it changed there, ``duration`` seconds from its start to its end.

    ``index`` is unique within an :class:`Outcome`. Strategies that search a
    tree (``TreeSearch``, ``Beam``) fork a node's branch from its parent
    node's branch: ``parent`` is the index of the parent node's result
    (``None`` for a child of the strategy's target) and ``depth`` its
    distance from the target's children (``0`` for them), so the results
    carry the whole tree.
    """

    index: int
    success: bool
    score: float | None = None
    duration: float = 0.0
    error: str | None = None
    branch: str | None = None
    changes: tuple[str, ...] = ()
    info: Mapping[str, Any] = attrs.field(factory=dict)
    parent: int | None = None
    depth: int = 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "index": self.index,
            "parent": self.parent,
            "depth": self.depth,
            "success": self.success,
            "score": _jsonable(self.score),
            "duration": self.duration,
            "error": self.error,
            "branch": self.branch,
            "changes": list(self.changes),
            "info": _jsonable(self.info),
        }


@attrs.frozen(kw_only=True)
class Outcome:
    """What a strategy run did: whether it committed, which candidate won, every result.

    ``winner`` is the committed candidate's result (``None`` when nothing was
    committed): it never names an aborted candidate. ``results`` are in
    candidate order (node order, parents first, for tree searches).
    ``timed_out`` says the strategy's ``timeout`` expired. ``info`` is what
    the strategy says about the run as a whole (a search's node count, why
    it stopped, ...).
    """

    committed: bool
    winner: Result | None
    results: tuple[Result, ...]
    strategy: str = ""
    duration: float = 0.0
    timed_out: bool = False
    info: Mapping[str, Any] = attrs.field(factory=dict)

    @property
    def best(self) -> Result | None:
        """The highest-scoring success (ties: lowest index), committed or not."""
        return _best([r for r in self.results if r.success], lambda r: (r.score, r.index))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "strategy": self.strategy,
            "committed": self.committed,
            "winner": self.winner.to_dict() if self.winner is not None else None,
            "results": [r.to_dict() for r in self.results],
            "duration": self.duration,
            "timed_out": self.timed_out,
            "info": _jsonable(self.info),
        }

    def to_json(self, *, indent: int | None = None) -> str:
        """The outcome as JSON text (``info`` values JSON cannot hold become strings)."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)


def _jsonable(value: object) -> Any:
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    if isinstance(value, Outcome | Result):
        return value.to_dict()
    return repr(value)


def _best(items: Sequence[_T], key: Callable[[_T], tuple[float | None, int]]) -> _T | None:
    """The item with the highest score (a number beats None), ties to the lowest index."""
    best: _T | None = None
    best_key: tuple[bool, float, int] | None = None
    for item in items:
        score, index = key(item)
        k = (score is not None, score if score is not None else 0.0, -index)
        if best_key is None or k > best_key:
            best, best_key = item, k
    return best


# -- strategies -----------------------------------------------------------------------


class Strategy(abc.ABC):
    """Base class of every strategy, built-in or plugin.

    ``await strategy.run(target)`` forks ``target`` (a workspace or a
    branch), runs candidates, commits at most one winner into ``target`` and
    leaves no branch of its own open on any path (success, failure, timeout,
    cancellation, exceptions). A strategy instance is also a candidate.
    """

    #: The name the strategy logs under (its entry-point name by convention).
    name: ClassVar[str] = "strategy"

    @abc.abstractmethod
    async def run(self, target: Target) -> Outcome:
        """Run on ``target`` and say what happened."""


VerdictLike: TypeAlias = bool | float | tuple[bool, float] | Verdict
"""What a candidate callable may return."""

@attrs.frozen
class Isolated:
    """A callable candidate run in a child process inside the branch's sandbox.

    Plain callables run in the agent process and act on ``branch.path``.
    Wrapped in ``Isolated``, the callable runs through :meth:`Branch.call`:
    in private namespaces where the branch is at the workspace's path, under
    ``limits``, killed with the branch. It receives a stand-in branch
    (``name``, ``path``, ``depth``) and returns what a candidate returns; it
    and its result travel with cloudpickle.
    """

    fn: Callable[..., Any]
    limits: Limits | None = attrs.field(default=None, kw_only=True)
    isolate: bool = attrs.field(default=True, kw_only=True)
    env: Mapping[str, str] | None = attrs.field(default=None, kw_only=True)


Candidate: TypeAlias = (
    Callable[[Branch], Awaitable[VerdictLike]]
    | Callable[[Branch], VerdictLike]
    | Command
    | Isolated
    | Strategy
)
"""An async or sync callable taking the branch, a :class:`Command`, an
:class:`Isolated` callable, or a :class:`Strategy`."""

Target: TypeAlias = "Workspace | Branch"
"""What a strategy runs on: a workspace, or a branch (nesting)."""


def describe_error(exc: BaseException) -> str:
    """``"TypeName: message"`` for a result's ``error``."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def to_verdict(value: object) -> Verdict:
    """Normalise what a candidate returned; raise :class:`CandidateError` for anything else."""
    if isinstance(value, Verdict):
        return value
    if isinstance(value, bool):
        return Verdict(value)
    if isinstance(value, numbers.Real):  # int, float, numpy scalars, ...
        if math.isnan(value):
            raise CandidateError("candidate returned NaN as its score")
        return Verdict(True, float(value))
    if (
        isinstance(value, tuple)
        and len(value) == 2
        and isinstance(value[0], bool)
        and isinstance(value[1], numbers.Real)
        and not isinstance(value[1], bool)
    ):
        if math.isnan(value[1]):
            raise CandidateError("candidate returned NaN as its score")
        return Verdict(value[0], float(value[1]))
    shown = repr(value)
    if len(shown) > 200:
        shown = shown[:200] + "..."
    raise CandidateError(
        f"candidate returned {type(value).__name__} {shown}; "
        "expected bool, a number, (bool, float) or Verdict"
    )


async def run_candidate(candidate: Candidate, branch: Branch) -> Verdict:
    """Run one candidate in ``branch`` here, in this process, and return its verdict.

    Raises what the candidate raised, or :class:`CandidateError` for a
    return value that is not a verdict (or a candidate that is no candidate).
    A sync callable runs in a worker thread; it cannot be interrupted, so when
    the strategy is cancelled its result is dropped and the thread finishes in
    the background.
    """
    if isinstance(candidate, Strategy):
        outcome = await candidate.run(branch)
        winner = outcome.winner
        return Verdict(
            outcome.committed,
            winner.score if winner is not None else None,
            {"outcome": outcome.to_dict()},
        )
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
    fn: Callable[[Branch], object] = candidate
    if _is_async_callable(fn):
        value = fn(branch)
    else:
        value = await anyio.to_thread.run_sync(fn, branch, abandon_on_cancel=True)
    if inspect.isawaitable(value):
        value = await value
    return to_verdict(value)


def _is_async_callable(fn: object) -> bool:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 (an object with an async __call__)
    )


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
        raw = await anyio.to_thread.run_sync(_read_tail, score_file, _SCORE_BYTES)
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(shutil.rmtree, score_dir, True)
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


# -- the executor seam ------------------------------------------------------------------


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


# -- the arena: the branches of one strategy run ------------------------------------------


@attrs.define
class Trial:
    """One candidate during a strategy run (mutable; becomes a :class:`Result`).

    ``done`` is true once the candidate (and any follow-up of the strategy)
    ran to the end, whatever its verdict; a trial cancelled midway is not done
    and never wins. ``parent`` is the index of the trial whose branch this
    one forked from (``None``: forked from the arena's target) and ``depth``
    its depth in that tree (``0`` for a child of the target).
    """

    index: int
    candidate: Candidate
    branch: Branch | None = None
    verdict: Verdict | None = None
    error: str | None = None
    done: bool = False
    started: float | None = None
    finished: float | None = None
    changes: tuple[str, ...] = ()
    info: dict[str, Any] = attrs.field(factory=dict)
    parent: int | None = None
    depth: int = 0

    @property
    def success(self) -> bool:
        ok = self.done and self.error is None
        return ok and self.verdict is not None and self.verdict.success

    @property
    def score(self) -> float | None:
        return self.verdict.score if self.verdict is not None else None

    @property
    def duration(self) -> float:
        if self.started is None:
            return 0.0
        end = self.finished if self.finished is not None else time.monotonic()
        return end - self.started

    def result(self) -> Result:
        info: dict[str, Any] = dict(self.verdict.info) if self.verdict is not None else {}
        info.update(self.info)
        return Result(
            index=self.index, success=self.success, score=self.score, duration=self.duration,
            error=self.error, branch=self.branch.name if self.branch is not None else None,
            changes=self.changes, info=info, parent=self.parent, depth=self.depth,
        )


def pick_best(trials: Sequence[Trial]) -> Trial | None:
    """The highest-scoring trial (a number beats no score), ties to the lowest index."""
    return _best(trials, lambda t: (t.score, t.index))


AfterHook: TypeAlias = Callable[[Trial], Awaitable[None]]
StopRule: TypeAlias = Callable[[Trial], bool]


class Arena:
    """The branches one strategy run forked from its target. Get one from :func:`open_arena`.

    :meth:`run` runs every candidate in its own child branch of the target
    (or of an earlier trial's branch: a tree) under one task group;
    :meth:`commit` commits one trial (with its ancestors, in a tree) and
    aborts the others; leaving :func:`open_arena` aborts whatever is still open.
    """

    def __init__(
        self, target: Target, *, strategy: str, executor: Executor | None = None,
        max_parallel: int | None = None,
    ) -> None:
        self.target = target
        self.strategy = strategy
        self.executor: Executor = executor if executor is not None else LocalExecutor()
        self.max_parallel = check_max_parallel(max_parallel)
        self.trials: list[Trial] = []
        self.stopped_by: Trial | None = None
        self.timed_out = False
        self.committed: Trial | None = None
        self.started = time.monotonic()
        safe = re.sub(r"[^A-Za-z0-9-]+", "-", strategy).strip("-")[:64] or "strategy"
        self._prefix = f"{safe}-{secrets.token_hex(3)}"
        self._names: list[str] = []
        self._scratches: list[Branch] = []
        self._scratch_ids = itertools.count()

    async def run(
        self,
        candidates: Sequence[Candidate],
        *,
        parents: Sequence[Trial | None] | None = None,
        deadline: float | None = None,
        after: AfterHook | None = None,
        stop: StopRule | None = None,
    ) -> list[Trial]:
        """Run every candidate; return the trials in candidate order.

        At most ``max_parallel`` trials run at once, admitted in candidate order.

        ``parents`` (one entry per candidate) grows a tree: candidate ``i``
        runs in a child of ``parents[i]``'s branch (``None``: of the target),
        and its trial records the parent's index and the parent's depth + 1.
        A parent whose branch is no longer open fails its children's trials.
        ``after(trial)`` runs in the trial's task once its candidate returned a
        verdict (exceptions it raises fail the trial). ``stop(trial)`` is asked
        about every trial that is done; the first ``True`` cancels every other
        trial at once (their processes are killed) and sets ``stopped_by``.
        ``deadline`` (on the :func:`anyio.current_time` clock, see
        :func:`deadline_after`) bounds the wall time of the whole run.
        """
        if parents is not None:
            if len(parents) != len(candidates):
                raise ValueError(
                    f"parents has {len(parents)} entries for {len(candidates)} candidates"
                )
            for p in parents:
                if p is not None and not (p.index < len(self.trials) and self.trials[p.index] is p):
                    raise ValueError(f"parent trial {p.index} is not a trial of this arena")
        first = len(self.trials)
        batch = []
        for i, c in enumerate(candidates):
            p = parents[i] if parents is not None else None
            batch.append(Trial(first + i, c, parent=None if p is None else p.index,
                               depth=0 if p is None else p.depth + 1))
        self.trials.extend(batch)
        if not batch:
            return batch
        # Admission in candidate order (candidates are often sorted best-first): the
        # slot is taken here, in order, and given back by the trial when it ends.
        slots = anyio.Semaphore(self.max_parallel or len(batch))
        with anyio.CancelScope(deadline=math.inf if deadline is None else deadline) as bound:
            async with anyio.create_task_group() as tg:
                for trial in batch:
                    await slots.acquire()
                    tg.start_soon(self._run_trial, trial, slots, tg.cancel_scope, after, stop)
        if bound.cancelled_caught:
            self.timed_out = True
        now = time.monotonic()
        for trial in batch:
            if trial.done:
                continue
            if trial.started is not None and trial.finished is None:
                trial.finished = now
            if self.stopped_by is not None:
                trial.error = f"Cancelled: candidate {self.stopped_by.index} succeeded first"
            elif self.timed_out:
                trial.error = "TimeoutError: the strategy's timeout expired"
            else:
                trial.error = "Cancelled"
            self._log(trial)
        return batch

    async def _run_trial(
        self, trial: Trial, slots: anyio.Semaphore, scope: anyio.CancelScope,
        after: AfterHook | None, stop: StopRule | None,
    ) -> None:
        trial.started = time.monotonic()
        try:
            await self._attempt(trial, after)
        finally:
            trial.finished = time.monotonic()
            slots.release()
        self._log(trial)
        if stop is not None and self.stopped_by is None and stop(trial):
            # No checkpoint between the test and the claim: exactly one trial stops the run.
            self.stopped_by = trial
            scope.cancel()

    async def _attempt(self, trial: Trial, after: AfterHook | None) -> None:
        try:
            # Nothing may await between fork() returning and the assignment, so that a
            # cancellation can never leave a branch we do not know about.
            trial.branch = await self._fork(trial)
        except Exception as exc:
            trial.error = describe_error(exc)
            trial.done = True
            return
        branch = trial.branch
        with structlog.contextvars.bound_contextvars(branch=branch.name):
            try:
                trial.verdict = await self.executor.execute(trial.candidate, branch)
            except Exception as exc:
                trial.error = describe_error(exc)
            else:
                if branch.state is not BranchState.OPEN:
                    trial.error = (
                        f"CandidateError: the candidate left its branch {branch.state.value}; "
                        "the strategy commits and aborts branches itself"
                    )
                elif after is not None:
                    try:
                        await after(trial)
                    except Exception as exc:
                        trial.error = describe_error(exc)
            if branch.state is BranchState.OPEN:
                try:
                    trial.changes = tuple(c.path for c in await branch.changes())
                except (BranchAgentError, OSError) as exc:
                    trial.info["changes_error"] = describe_error(exc)
            trial.done = True

    async def _fork(self, trial: Trial) -> Branch:
        on: Target = self.target
        if trial.parent is not None:
            parent = self.trials[trial.parent].branch
            if parent is None:
                raise StrategyError(f"candidate {trial.parent} has no branch to fork from")
            on = parent
        return await self._fork_named(on, f"{self._prefix}-{trial.index}")

    async def _fork_named(self, on: Target, name: str) -> Branch:
        self._names.append(name)
        try:
            return await on.fork(name)
        except BranchExists:
            return await on.fork(None)

    @contextlib.asynccontextmanager
    async def open_scratch(self, trial: Trial) -> AsyncIterator[Branch]:
        """A throwaway fork of ``trial``'s branch, aborted on exit on every path.

        For callbacks that look at a trial's state without being part of it (a
        proposer, a judge, a critic): they may read the scratch branch and run
        commands in it, and nothing they write reaches the trial's branch.
        """
        if trial.branch is None:
            raise StrategyError(f"candidate {trial.index} has no branch")
        name = f"{self._prefix}-{trial.index}-x{next(self._scratch_ids)}"
        scratch = await self._fork_named(trial.branch, name)
        self._scratches.append(scratch)
        try:
            yield scratch
        finally:
            with anyio.move_on_after(_CLEANUP_TIMEOUT, shield=True):
                await self._abort_one(scratch)

    def _log(self, trial: Trial) -> None:
        log.info(
            "candidate_finished", strategy=self.strategy, index=trial.index,
            branch=trial.branch.name if trial.branch is not None else None,
            parent=trial.parent, node_depth=trial.depth,
            success=trial.success, score=trial.score, error=trial.error,
            duration_ms=round(trial.duration * 1e3, 3),
        )

    def lineage(self, trial: Trial) -> list[Trial]:
        """``trial`` and its ancestors, the target's child first and ``trial`` last."""
        chain = [trial]
        while chain[-1].parent is not None:
            parent = chain[-1].parent
            assert parent is not None
            chain.append(self.trials[parent])
        chain.reverse()
        return chain

    async def commit(self, trial: Trial) -> bool:
        """Abort every branch off ``trial``'s lineage, then commit the lineage into the target.

        For a child of the target that is one commit. For a node of a tree the
        lineage commits upward one level at a time: the node into its parent,
        the parent into its own, ..., the target's child into the target. Each
        commit goes into a different branch, and the target changes only with
        the last one, so it receives all of the lineage's changes or none.

        The commit is not cut by cancellation once it starts (it is short and
        atomic). A commit refused by the backend (a conflict, a failed copy)
        is recorded in the ``error`` of the trial it failed on (and of
        ``trial``), what is left of the lineage is aborted, and the answer is
        ``False``.
        """
        if not trial.success or trial.branch is None:
            raise StrategyError(f"candidate {trial.index} did not succeed; it cannot be committed")
        if self.committed is not None:
            raise StrategyError(f"candidate {self.committed.index} is already committed")
        await anyio.lowlevel.checkpoint_if_cancelled()
        chain = self.lineage(trial)
        with anyio.CancelScope(shield=True):
            await self._abort_all(keep=chain)
            for node in reversed(chain):
                try:
                    if node.branch is None:
                        raise StrategyError(f"candidate {node.index} has no branch")
                    await node.branch.commit()
                except (BranchAgentError, OSError) as exc:
                    error = describe_error(exc)
                    node.error = error
                    if node is not trial:
                        trial.error = f"{error} (committing its ancestor {node.index})"
                    log.warning("winner_commit_failed", strategy=self.strategy,
                                index=trial.index, at=node.index,
                                branch=node.branch.name if node.branch is not None else None,
                                error=error)
                    for left in chain:
                        if left.branch is not None:
                            await self._abort_one(left.branch)
                    return False
        self.committed = trial
        log.info("winner_committed", strategy=self.strategy, index=trial.index,
                 branch=trial.branch.name, score=trial.score, levels=len(chain))
        return True

    async def abort(self, trial: Trial) -> None:
        """Abort ``trial``'s branch and every branch forked from it. Never cut short."""
        if trial.branch is not None:
            with anyio.move_on_after(_CLEANUP_TIMEOUT, shield=True):
                await self._abort_one(trial.branch)

    async def aclose(self) -> None:
        """Abort every branch of this run that is still open. Idempotent; never cut short."""
        await self._abort_all(keep=())

    async def _abort_all(self, keep: Sequence[Trial]) -> None:
        with anyio.move_on_after(_CLEANUP_TIMEOUT, shield=True):
            for scratch in self._scratches:
                await self._abort_one(scratch)
            for trial in self.trials:
                if trial.branch is not None and not any(trial is k for k in keep):
                    await self._abort_one(trial.branch)
            if not keep:
                await self._sweep()

    async def _abort_one(self, branch: Branch) -> None:
        if branch.state is not BranchState.OPEN:
            return
        try:
            await branch.abort()
        except Exception as exc:  # keep cleaning up; say what was left behind
            log.warning("branch_abort_failed", strategy=self.strategy, branch=branch.name,
                        error=describe_error(exc))

    async def _sweep(self) -> None:
        """Abort branches we asked for by name but never got back (belt and braces)."""
        get = getattr(self.target, "get", None)
        ws = getattr(self.target, "workspace", None)
        if get is None and ws is not None:
            get = getattr(ws, "get", None)
        if get is None:
            return
        # Ours hang off the target, a trial's branch (trees) or a scratch fork's trial.
        ours: list[Branch | None] = [_parent_of(self.target)]
        ours += [t.branch for t in self.trials if t.branch is not None]
        for name in self._names:
            try:
                branch = get(name)
            except (LookupError, BranchAgentError):
                continue
            if isinstance(branch, Branch) and any(branch.parent is p for p in ours):
                await self._abort_one(branch)

    def outcome(self, info: Mapping[str, Any] | None = None) -> Outcome:
        """The outcome so far: ``winner`` is the committed trial, if any."""
        winner = self.committed.result() if self.committed is not None else None
        return Outcome(
            committed=winner is not None, winner=winner,
            results=tuple(t.result() for t in self.trials), strategy=self.strategy,
            duration=time.monotonic() - self.started, timed_out=self.timed_out,
            info=dict(info) if info is not None else {},
        )


def check_timeout(timeout: float | None) -> float | None:
    """``timeout`` if it is a positive number of seconds or ``None``, else ``ValueError``."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout!r}")
    return float(timeout)


def check_max_parallel(max_parallel: int | None) -> int | None:
    """``max_parallel`` if it is a positive int or ``None``, else ``ValueError``."""
    if max_parallel is None:
        return None
    if isinstance(max_parallel, bool) or not isinstance(max_parallel, int) or max_parallel < 1:
        raise ValueError(f"max_parallel must be a positive int or None, got {max_parallel!r}")
    return max_parallel


def deadline_after(timeout: float | None) -> float | None:
    """The deadline ``timeout`` seconds from now on anyio's clock (``None``: no deadline)."""
    return None if timeout is None else anyio.current_time() + timeout


def _parent_of(target: Target) -> Branch | None:
    return target if isinstance(target, Branch) else None


@contextlib.asynccontextmanager
async def open_arena(
    target: Target, *, strategy: str, executor: Executor | None = None,
    max_parallel: int | None = None,
) -> AsyncIterator[Arena]:
    """An :class:`Arena` on ``target``; on exit, on every path, no branch of it is left open."""
    arena = Arena(target, strategy=strategy, executor=executor, max_parallel=max_parallel)
    depth = getattr(target, "depth", -1) + 1
    with structlog.contextvars.bound_contextvars(strategy=strategy, depth=depth):
        try:
            yield arena
        finally:
            await arena.aclose()
            log.info("strategy_finished", strategy=strategy,
                     committed=arena.committed.index if arena.committed else None,
                     candidates=len(arena.trials), timed_out=arena.timed_out,
                     duration_ms=round((time.monotonic() - arena.started) * 1e3, 3))


# -- the registry ---------------------------------------------------------------------------


def available_strategies() -> list[str]:
    """Names registered in the ``branchagent.strategies`` entry-point group."""
    return sorted({ep.name for ep in entry_points(group=GROUP)})


def get_strategy(name: str) -> type[Strategy]:
    """The strategy class registered under ``name`` (built-in or plugin).

    Raises :class:`StrategyNotFound` (a ``LookupError``) listing the known
    names, or :class:`StrategyError` when the entry point cannot be loaded or
    is not a :class:`Strategy` subclass.
    """
    found = {ep.value: ep for ep in entry_points(group=GROUP) if ep.name == name}
    if not found:
        known = ", ".join(available_strategies()) or "none"
        raise StrategyNotFound(f"no strategy named {name!r}; registered strategies: {known}")
    if len(found) > 1:
        raise StrategyError(
            f"several plugins register a strategy named {name!r}: {', '.join(sorted(found))}"
        )
    (ep,) = found.values()
    try:
        obj = ep.load()
    except Exception as exc:
        raise StrategyError(f"cannot load strategy {name!r} ({ep.value}): {exc}") from exc
    if not (isinstance(obj, type) and issubclass(obj, Strategy)):
        raise StrategyError(f"entry point {name!r} ({ep.value}) is not a Strategy subclass")
    return obj
