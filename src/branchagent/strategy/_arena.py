"""The arena: the branches of one strategy run, and the trials run in them."""

from __future__ import annotations

import contextlib
import itertools
import math
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any, TypeAlias

import anyio
import anyio.lowlevel
import attrs
import structlog
import structlog.contextvars

from .._branch import Branch, BranchState
from .._events import emit
from .._log import get_logger
from .._workspace import Workspace, WorkspaceBranch
from ..exceptions import BranchAgentError, BranchExists, StrategyError
from ._candidates import Candidate, Target
from ._executor import Executor, LocalExecutor
from ._root import check_max_parallel
from ._values import Outcome, Result, Verdict, best, describe_error

__all__ = ["AfterHook", "Arena", "StopRule", "Trial", "open_arena", "pick_best", "rank_key"]

log = get_logger("branchagent.strategy")

_CLEANUP_TIMEOUT = 60.0

#: Most characters of a node's diff kept in its :class:`Result` (for the report);
#: a longer diff is cut there, with a last line saying so.
DIFF_LIMIT = 32_000


def _bounded(diff: str, limit: int = DIFF_LIMIT) -> str:
    if len(diff) <= limit:
        return diff
    cut = diff.rfind("\n", 0, limit) + 1 or limit
    return diff[:cut] + f"... (diff cut at {cut} of {len(diff)} characters)\n"


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
    diff: str | None = None

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

    def result(self, t0: float | None = None) -> Result:
        """This trial as a :class:`Result`; ``t0`` (a ``time.monotonic()`` reading, the
        run's start) turns ``started``/``finished`` into the result's offsets."""
        info: dict[str, Any] = dict(self.verdict.info) if self.verdict is not None else {}
        info.update(self.info)
        start = end = None
        if t0 is not None and self.started is not None:
            start = self.started - t0
            end = (self.finished if self.finished is not None else time.monotonic()) - t0
        return Result(
            index=self.index, success=self.success, score=self.score, duration=self.duration,
            error=self.error, branch=self.branch.name if self.branch is not None else None,
            changes=self.changes, info=info, parent=self.parent, depth=self.depth,
            start=start, end=end, diff=self.diff,
        )


def pick_best(trials: Sequence[Trial]) -> Trial | None:
    """The highest-scoring trial (a number beats no score), ties to the lowest index."""
    return best(trials, lambda t: (t.score, t.index))


def rank_key(trial: Trial) -> tuple[bool, float, int]:
    """Sort key, best first: a number beats no score, then higher, then the lower index."""
    score = trial.score
    return (score is None, -score if score is not None else 0.0, trial.index)


AfterHook: TypeAlias = Callable[[Trial], Awaitable[None]]
StopRule: TypeAlias = Callable[[Trial], bool]


class Arena:
    """The branches one strategy run forked from its target. Get one from :func:`open_arena`.

    :meth:`run` runs every candidate in its own child branch of the target
    (or of an earlier trial's branch: a tree) under one task group;
    :meth:`commit` commits one trial (with its ancestors, in a tree) and
    aborts the others; leaving :func:`open_arena` aborts whatever is still open.

    ``deadline`` (on the :func:`anyio.current_time` clock) bounds every
    :meth:`run` and every :meth:`deadline_scope`; ``timed_out`` says it
    expired. Every trial emits ``candidate_started`` and ``candidate_finished``
    events, and a commit ``winner_committed`` (see :func:`branchagent.observe`).
    """

    def __init__(
        self, target: Target, *, strategy: str, executor: Executor | None = None,
        max_parallel: int | None = None, deadline: float | None = None, commit: bool = True,
    ) -> None:
        self.target = target
        #: False: :meth:`commit` only chooses (a dry run): the target never changes.
        self.commits = commit
        #: The trial :meth:`commit` chose while ``commits`` is False.
        self.chosen: Trial | None = None
        self.deadline = deadline
        self.depth: int = target.depth + 1 if isinstance(target, Branch) else 0
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
        self._announced: set[int] = set()

    async def run(
        self,
        candidates: Sequence[Candidate],
        *,
        parents: Sequence[Trial | None] | None = None,
        deadline: float | None = None,
        after: AfterHook | None = None,
        stop: StopRule | None = None,
        executor: Executor | None = None,
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
        ``deadline`` bounds the wall time of this run further (the arena's own
        deadline always applies); when a bound expires, ``timed_out`` is set.
        ``executor`` runs these candidates instead of the arena's own (for a
        candidate that must run here, reading other trials' branches).
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
        with self.deadline_scope(deadline):
            async with anyio.create_task_group() as tg:
                for trial in batch:
                    await slots.acquire()
                    tg.start_soon(self._run_trial, trial, slots, tg.cancel_scope, after, stop,
                                  executor or self.executor)
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
            self._finished(trial)
        return batch

    @contextlib.contextmanager
    def deadline_scope(self, deadline: float | None = None) -> Iterator[anyio.CancelScope]:
        """A cancel scope ending at the arena's deadline (or ``deadline``, if sooner).

        For the strategy's own work between runs (a judge, a critique, a
        proposer): when the scope's deadline cuts it, ``timed_out`` is set.
        """
        ends = [d for d in (self.deadline, deadline) if d is not None]
        with anyio.CancelScope(deadline=min(ends, default=math.inf)) as scope:
            yield scope
        if scope.cancelled_caught:
            self.timed_out = True

    async def _run_trial(
        self, trial: Trial, slots: anyio.Semaphore, scope: anyio.CancelScope,
        after: AfterHook | None, stop: StopRule | None, executor: Executor,
    ) -> None:
        trial.started = time.monotonic()
        try:
            await self._attempt(trial, after, executor)
        finally:
            trial.finished = time.monotonic()
            slots.release()
        self._finished(trial)
        if stop is not None and self.stopped_by is None and stop(trial):
            # No checkpoint between the test and the claim: exactly one trial stops the run.
            self.stopped_by = trial
            scope.cancel()

    async def _attempt(self, trial: Trial, after: AfterHook | None, executor: Executor) -> None:
        try:
            # Nothing may await between fork() returning and the assignment, so that a
            # cancellation can never leave a branch we do not know about.
            trial.branch = await self._fork(trial)
        except Exception as exc:
            trial.error = describe_error(exc)
            trial.done = True
            return
        branch = trial.branch
        self._started(trial)
        with structlog.contextvars.bound_contextvars(branch=branch.name):
            try:
                trial.verdict = await executor.execute(trial.candidate, branch)
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
                else:
                    trial.diff = await _diff_of(branch) if trial.changes else ""
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
    async def open_scratch(self, trial: Trial | None = None) -> AsyncIterator[Branch]:
        """A throwaway fork of ``trial``'s branch (``None``: of the target), aborted on exit.

        For callbacks that look at a state without being part of it (a
        proposer, a judge, a critic): they may read the scratch branch and run
        commands in it, and nothing they write reaches the trial or the target.
        """
        on: Target = self.target
        tag = "t"
        if trial is not None:
            if trial.branch is None:
                raise StrategyError(f"candidate {trial.index} has no branch")
            on, tag = trial.branch, str(trial.index)
        name = f"{self._prefix}-{tag}-x{next(self._scratch_ids)}"
        scratch = await self._fork_named(on, name)
        self._scratches.append(scratch)
        try:
            yield scratch
        finally:
            with anyio.move_on_after(_CLEANUP_TIMEOUT, shield=True):
                await self._abort_one(scratch)

    def _event_fields(self, trial: Trial) -> dict[str, Any]:
        return {"strategy": self.strategy, "index": trial.index,
                "branch": trial.branch.name if trial.branch is not None else None,
                "depth": self.depth + trial.depth}

    def _started(self, trial: Trial) -> None:
        self._announced.add(trial.index)
        emit("candidate_started", **self._event_fields(trial))

    def _finished(self, trial: Trial) -> None:
        if trial.index not in self._announced:  # never forked: it starts and ends here
            self._started(trial)
        log.info(
            "candidate_finished", strategy=self.strategy, index=trial.index,
            branch=trial.branch.name if trial.branch is not None else None,
            parent=trial.parent, node_depth=trial.depth,
            success=trial.success, score=trial.score, error=trial.error,
            duration_ms=round(trial.duration * 1e3, 3),
        )
        emit("candidate_finished", **self._event_fields(trial), success=trial.success,
             score=trial.score, error=trial.error, duration=trial.duration)

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
        if not self.commits:
            if self.chosen is not None:
                raise StrategyError(f"candidate {self.chosen.index} is already chosen")
            self.chosen = trial
            await self._abort_all(keep=())
            log.info("winner_not_committed", strategy=self.strategy, index=trial.index,
                     score=trial.score)
            return True
        chain = self.lineage(trial)
        with anyio.CancelScope(shield=True):
            await self._abort_all(keep=chain)
            if len(chain) > 1 or not isinstance(self.target, WorkspaceBranch):
                # A lineage commits a level at a time, and an interpreter forked for a node
                # (InSession) follows one commit only: the node sessions of a lineage end
                # here rather than leave in the target memory that is not the winner's.
                # (Into a workspace's base, the winner's would move to a new top-level
                # branch that nobody asked for: it ends too.)
                for node in chain:
                    if isinstance(node.branch, WorkspaceBranch):
                        for session in [x for x in node.branch._sessions if x._node]:
                            await session.close()
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
        emit("winner_committed", **self._event_fields(trial), score=trial.score)
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
            doomed = [*self._scratches, *(
                t.branch for t in self.trials
                if t.branch is not None and not any(t is k for k in keep))]
            await self._abort_together(doomed)
            if not keep:
                await self._sweep()

    async def _abort_together(self, branches: Sequence[Branch]) -> None:
        """Abort ``branches``: those of one workspace in one request (one round trip for
        all the losers), any other kind of branch one by one."""
        groups: dict[int, tuple[Workspace, list[Branch]]] = {}
        for b in branches:
            if b.state is not BranchState.OPEN:
                continue
            if isinstance(b, WorkspaceBranch):
                groups.setdefault(id(b.workspace), (b.workspace, []))[1].append(b)
            else:
                await self._abort_one(b)
        for ws, group in groups.values():
            try:
                await ws.abort_many(group)
            except Exception as exc:  # say so, then try each on its own
                log.warning("branch_abort_failed", strategy=self.strategy,
                            branches=[b.name for b in group], error=describe_error(exc))
                for b in group:
                    await self._abort_one(b)

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
        if isinstance(self.target, Workspace):
            ws = self.target
        elif isinstance(self.target, WorkspaceBranch):
            ws = self.target.workspace
        else:  # another kind of branch: nothing to look names up in
            return
        # Ours hang off the target, a trial's branch (trees) or a scratch fork's trial.
        ours: list[Branch | None] = [_parent_of(self.target)]
        ours += [t.branch for t in self.trials if t.branch is not None]
        for name in self._names:
            try:
                branch = ws.get(name)
            except (LookupError, BranchAgentError):
                continue
            if isinstance(branch, Branch) and any(branch.parent is p for p in ours):
                await self._abort_one(branch)

    def outcome(
        self, info: Mapping[str, Any] | None = None, *, merged: Sequence[Trial] = ()
    ) -> Outcome:
        """The outcome so far: ``winner`` is the committed trial, if any.

        ``merged`` names the trials whose changes the committed trial combines.
        """
        winner = self.committed.result(self.started) if self.committed is not None else None
        extra = {} if self.chosen is None else {"uncommitted_winner": self.chosen.index}
        return Outcome(
            committed=winner is not None, winner=winner,
            results=tuple(t.result(self.started) for t in self.trials),
            strategy=self.strategy,
            duration=time.monotonic() - self.started, timed_out=self.timed_out,
            info={**extra, **(info or {})},
            merged=tuple(t.index for t in merged),
        )


async def _diff_of(branch: Branch) -> str | None:
    """``branch``'s diff, cut to :data:`DIFF_LIMIT` (``None`` if it cannot be had)."""
    try:
        return _bounded(await branch.diff())
    except (BranchAgentError, OSError, UnicodeError) as exc:
        log.debug("diff_failed", branch=branch.name, error=describe_error(exc))
        return None


def _parent_of(target: Target) -> Branch | None:
    return target if isinstance(target, Branch) else None


@contextlib.asynccontextmanager
async def open_arena(
    target: Target, *, strategy: str, executor: Executor | None = None,
    max_parallel: int | None = None, deadline: float | None = None, commit: bool = True,
) -> AsyncIterator[Arena]:
    """An :class:`Arena` on ``target``; on exit, on every path, no branch of it is left open.

    Strategies get theirs from :meth:`Strategy.open_arena
    <branchagent.strategy.Strategy.open_arena>`, which fills in the options.
    """
    arena = Arena(target, strategy=strategy, executor=executor, max_parallel=max_parallel,
                  deadline=deadline, commit=commit)
    with structlog.contextvars.bound_contextvars(strategy=strategy, depth=arena.depth):
        try:
            yield arena
        finally:
            await arena.aclose()
            log.info("strategy_finished", strategy=strategy,
                     committed=arena.committed.index if arena.committed else None,
                     candidates=len(arena.trials), timed_out=arena.timed_out,
                     duration_ms=round((time.monotonic() - arena.started) * 1e3, 3))
