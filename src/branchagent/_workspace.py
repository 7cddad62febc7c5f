"""open_workspace() and the Workspace: a backend plus the tree of branches."""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
import signal
import sys
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import asynccontextmanager
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Unpack

import anyio
import anyio.to_thread
import attrs
import sniffio

from ._backends import default_backend, load_backend
from ._branch import (
    Backend,
    Branch,
    BranchState,
    Change,
    Usage,
    check_branch_name,
    resolve_inside,
)
from ._diff import render_diff
from ._doctor import log_host_capabilities
from ._events import emit
from ._limits import Limits, parse_size
from ._log import get_logger
from ._protocols import RunOptions, check_run_options
from ._rwlock import RWLock
from ._sandbox._cgroup import RunCgroup
from ._sandbox._pycall import call_in
from ._sandbox._run import RunResult, run_in
from ._sandbox._spawn import BRANCH_PATH_ENV, WORKSPACE_ENV
from .exceptions import (
    BackendNotFound,
    BackendUnavailable,
    BranchAgentError,
    BranchClosed,
    BranchExists,
    BranchInvalidated,
    BranchNotFound,
    InvalidWorkspace,
    WorkspaceAlreadyOpen,
    WorkspaceClosed,
    WorkspaceCorrupt,
    WorkspaceLocked,
)

if TYPE_CHECKING:
    from contextlib import AbstractAsyncContextManager

    from ._session import Session

__all__ = ["Workspace", "WorkspaceBranch", "open_workspace"]

log = get_logger("branchagent")

_CLOSE_TIMEOUT = 60.0

#: The workspaces this process has open: state directory -> (pid, where it was opened,
#: as ``file:line``). The pid tells a forked child's inherited copy from its own.
_OPEN_HERE: dict[Path, tuple[int, str]] = {}


def _disk_size(value: int | str | None, what: str) -> int | None:
    """:func:`parse_size`, with errors naming the keyword ``what``."""
    try:
        return parse_size(value)
    except TypeError as exc:
        raise TypeError(f"{what}: {exc}") from None
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None


def _no_disk_limits(backend: Backend, what: str) -> BackendUnavailable:
    return BackendUnavailable(
        f"backend {backend.name!r} cannot enforce a per-branch disk limit ({what}): its "
        "branches are plain directories on the workspace's filesystem, with nothing to "
        "count or refuse writes; use backend='fuse', or pass run(limits=Limits(disk=...)) "
        "to have it reported as not enforced")


class WorkspaceBranch:
    """A branch of a :class:`Workspace` (implements the :class:`Branch` protocol)."""

    def __init__(
        self, ws: Workspace, name: str, parent: WorkspaceBranch | None, path: Path
    ) -> None:
        self._ws = ws
        self._name = name
        self._parent = parent
        self._path = path
        self._state = BranchState.OPEN
        self._why_closed = ""
        self._children: list[WorkspaceBranch] = []
        self._lock = RWLock()
        self._runs: set[anyio.CancelScope] = set()
        self._sessions: set[Session] = set()  # live sessions seeing this branch
        self._active: dict[anyio.CancelScope, tuple[RunCgroup | None, int]] = {}
        self._disk: int | None = None  # its own disk limit (fork's, inherited, the workspace's)
        self._run_disks: list[int] = []  # Limits.disk of the runs in progress
        self._disk_sent: int | None = None  # the limit the backend has now
        self._disk_lock = anyio.Lock()
        self.depth: int = 0 if parent is None else parent.depth + 1
        self.created = time.time()

    # -- properties ----------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def path(self) -> Path:
        return self._path

    @property
    def parent(self) -> WorkspaceBranch | None:
        return self._parent

    @property
    def state(self) -> BranchState:
        return self._state

    @property
    def workspace(self) -> Workspace:
        return self._ws

    @property
    def disk_limit(self) -> int | None:
        """The cap on the bytes this branch's own storage may hold now (``None``: none):
        the smallest of its own limit and those of the runs in progress."""
        caps = [c for c in (self._disk, *self._run_disks) if c is not None]
        return min(caps) if caps else None

    @property
    def children(self) -> list[WorkspaceBranch]:
        """Open children of this branch."""
        return [c for c in self._children if c._state is BranchState.OPEN]

    def __repr__(self) -> str:
        return f"<Branch {self._name!r} {self._state.value} depth={self.depth}>"

    def _check_open(self) -> None:
        self._ws._check_open()
        if self._state is BranchState.INVALIDATED:
            raise BranchInvalidated(f"branch {self._name!r} is invalidated: {self._why_closed}")
        if self._state is not BranchState.OPEN:
            raise BranchClosed(f"branch {self._name!r} is {self._state.value}: {self._why_closed}")

    # -- operations ----------------------------------------------------------

    async def fork(self, name: str | None = None, *,
                   disk_limit: int | str | None = None) -> WorkspaceBranch:
        """A new branch seeing this one exactly as it is now.

        ``disk_limit`` (bytes or ``"1G"``) caps what the child's own storage may
        hold; by default it gets this branch's own limit (not a run's).
        """
        return await self._ws._fork(self, name, disk_limit)

    def branch(self, name: str | None = None) -> AbstractAsyncContextManager[Branch]:
        """Fork a child; commit it on clean exit, abort it on exception."""
        return _branch_cm(self.fork, name)

    async def commit(self) -> None:
        """Merge into the parent (the base for a top-level branch); siblings are invalidated."""
        await self._ws._commit(self)

    async def abort(self) -> None:
        """Discard this branch and its descendants. Aborting a closed branch is a no-op."""
        if self._state is not BranchState.OPEN:
            return
        await self._ws._abort(self, BranchState.ABORTED, "aborted")

    async def changes(self) -> list[Change]:
        """What this branch changed since its fork."""
        self._check_open()
        async with self._lock.shared():
            self._check_open()
            return await self._ws._backend.changes(self._name, self._parent_name())

    async def diff(self) -> str:
        """Unified diff of this branch against its parent at the fork."""
        changes = await self.changes()
        parent = self._parent_name()

        async def old(path: str) -> bytes | None:
            return await self._ws._backend.old_content(self._name, parent, path)

        return await render_diff(changes, self._path, old)

    async def usage(self) -> Usage:
        """What this branch's own copy-on-write storage holds, and its disk limit.

        FUSE backend: the files of the branch's own layers (made or changed since
        its fork, at their whole size). Copy backend: the files of its copy that
        differ from the fork. See :class:`Usage`.
        """
        self._check_open()
        async with self._lock.shared():
            self._check_open()
            u = await self._ws._backend.usage(self._name)
        return attrs.evolve(u, disk_limit=self.disk_limit)

    async def _send_disk_limit(self) -> str | None:
        """Tell the backend the limit in force now; return how it enforces it."""
        async with self._disk_lock:
            limit = self.disk_limit
            how = self._ws._backend.disk_limits
            if limit != self._disk_sent and self._state is BranchState.OPEN:
                how = await self._ws._backend.set_disk_limit(self._name, limit)
                self._disk_sent = limit
            return how

    @asynccontextmanager
    async def _run_disk(self, limits: Limits | None) -> AsyncIterator[str | None]:
        """Hold ``limits.disk`` on this branch while a run runs; yield how it is enforced
        (``None``: not enforced, and logged as such)."""
        disk = limits.disk if limits is not None else None
        if disk is None:
            yield None
            return
        self._run_disks.append(disk)
        try:
            how = await self._send_disk_limit()
            if how is None:
                log.warning("limits_not_enforced", limits=["disk"], branch=self._name,
                            backend=self._ws._backend.name,
                            reason="the backend cannot cap a branch's storage")
            yield how
        finally:
            self._run_disks.remove(disk)
            with anyio.CancelScope(shield=True):
                if self._state is BranchState.OPEN:
                    try:
                        await self._send_disk_limit()
                    except (BranchNotFound, WorkspaceClosed):
                        pass  # committed or closed meanwhile: nothing left to limit

    def resolve(self, path: str | os.PathLike[str]) -> Path:
        """``path`` (relative, or absolute under the workspace path) inside this branch.

        Raises ``PathEscapeError`` when it resolves outside the branch (``..``, symlinks).
        """
        self._check_open()
        raw = os.fspath(path)
        if os.path.isabs(raw):
            ws_root = self._ws.path
            try:
                raw = os.path.relpath(raw, ws_root)
            except ValueError:
                raw = os.fspath(path)
            if raw == os.pardir or raw.startswith(os.pardir + os.sep):  # not "..foo"
                raw = os.fspath(path)
        return resolve_inside(self._path, raw)

    async def run(self, argv: Sequence[str], **options: Unpack[RunOptions]) -> RunResult:
        """Run ``argv`` in this branch (options: :class:`RunOptions`; see
        :mod:`branchagent._sandbox._run`).

        With ``isolate=True`` the process sees this branch at the workspace's
        original path, in private mount and PID namespaces where the state
        directory (other branches, the journal) is hidden. Its tree runs in
        its own cgroup where the host allows. Aborting the branch kills the
        tree; the result then says ``killed="aborted"``.
        """
        check_run_options(options, f"{type(self).__name__}.run")
        self._check_open()
        limits = options.get("limits")
        scope = anyio.CancelScope()
        self._runs.add(scope)
        started = time.monotonic()
        try:
            with scope:
                async with self._run_disk(limits) as how:
                    r = await run_in(
                        self._path, self._ws.path, argv, scratch=self._ws._scratch,
                        hide=(self._ws.state_dir,), on_cgroup=self._track(scope), **options,
                    )
                if limits is None or limits.disk is None:
                    return r
                if how is None:
                    return attrs.evolve(r, not_enforced=r.not_enforced | {"disk"})
                return attrs.evolve(r, enforced=r.enforced | {f"disk:{how}"})
        finally:
            self._runs.discard(scope)
            self._active.pop(scope, None)
        return RunResult(
            argv=tuple(argv), returncode=-9, stdout="", stderr="",
            duration=time.monotonic() - started, killed="aborted",
            isolated=options.get("isolate", True),
        )

    async def call(
        self,
        fn: Callable[..., Any],
        *args: Any,
        limits: Limits | None = None,
        isolate: bool = True,
        env: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Call ``fn(branch, *args, **kwargs)`` in a child process inside this branch's sandbox.

        The child gets a read-only stand-in branch (``name``, ``path``,
        ``depth``; ``path`` is the workspace's path when isolated). The value
        comes back whatever its size; an exception is re-raised with its
        original type and the child's traceback as a note. ``fn``, its
        arguments and its result travel with cloudpickle. A child that dies
        without a result raises ``ProcessKilled``.
        """
        self._check_open()
        scope = anyio.CancelScope()
        self._runs.add(scope)
        try:
            with scope:
                async with self._run_disk(limits):
                    return await call_in(
                        self._path, self._ws.path, fn, args, kwargs, name=self._name,
                        depth=self.depth, limits=limits, isolate=isolate, env=env,
                        scratch=self._ws._scratch, hide=(self._ws.state_dir,),
                        on_cgroup=self._track(scope),
                        async_backend=sniffio.current_async_library(),
                    )
        finally:
            self._runs.discard(scope)
            self._active.pop(scope, None)
        raise BranchClosed(f"branch {self._name!r} was aborted while {fn!r} ran")

    async def session(self, *, limits: Limits | None = None,
                      env: Mapping[str, str] | None = None,
                      fork_of: Session | None = None) -> Session:
        """A live, isolated Python interpreter in this branch; ``await session.fork()``
        forks it together with the branch. See :class:`~branchagent.Session`.

        It runs in this branch's sandbox (the branch at the workspace's path, private
        mount and PID namespaces, its own cgroups under ``limits``). It ends with
        ``session.close()``, or when this branch is committed, aborted or invalidated.

        ``fork_of``: a session of this branch's parent; the new session is a fork of it
        (its memory, its limits) instead of a fresh interpreter. Use it when the child
        branch already exists (a strategy forked it); else ``await fork_of.fork()``.
        """
        from ._session import start_session

        self._check_open()
        if fork_of is None:
            return await start_session(self, limits=limits, env=env)
        if limits is not None or env is not None:
            raise ValueError("session(fork_of=...) takes the forked session's limits and "
                             "environment; pass neither limits nor env")
        if fork_of.branch is not self._parent:
            raise ValueError(f"session(fork_of=...): that session is in branch "
                             f"{fork_of.branch.name!r}, not in this branch's parent "
                             f"({self._parent_name()!r})")
        return await fork_of._fork_into(self)

    async def pause(self) -> None:
        """Freeze every process running in this branch (cgroup freezer, else SIGSTOP)."""
        self._check_open()
        await anyio.to_thread.run_sync(self._signal_all, True)

    async def resume(self) -> None:
        """Thaw what :meth:`pause` froze."""
        self._check_open()
        await anyio.to_thread.run_sync(self._signal_all, False)

    def _track(self, scope: anyio.CancelScope) -> Callable[[RunCgroup | None, int], None]:
        def on_cgroup(cg: RunCgroup | None, pid: int) -> None:
            if pid:
                self._active[scope] = (cg, pid)
            else:
                self._active.pop(scope, None)

        return on_cgroup

    def _signal_all(self, freeze: bool) -> None:
        for cg, pid in list(self._active.values()):
            if cg is not None and cg.freeze(freeze):
                continue
            try:
                os.killpg(pid, signal.SIGSTOP if freeze else signal.SIGCONT)
            except ProcessLookupError:
                pass

    # -- internals -------------------------------------------------------------

    def _parent_name(self) -> str | None:
        return self._parent._name if self._parent is not None else None

    def _descendants(self) -> list[WorkspaceBranch]:
        out: list[WorkspaceBranch] = []
        for c in self._children:
            if c._state is BranchState.OPEN:
                out.extend(c._descendants())
                out.append(c)
        return out  # deepest first


@asynccontextmanager
async def _branch_cm(
    fork: Callable[[str | None], Awaitable[WorkspaceBranch]], name: str | None
) -> AsyncIterator[Branch]:
    b = await fork(name)
    try:
        yield b
    except BaseException:
        with anyio.CancelScope(shield=True):
            await b.abort()
        raise
    if b.state is BranchState.OPEN:
        try:
            await b.commit()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await b.abort()
            raise


async def _sessions_after_commit(b: WorkspaceBranch, losers: Sequence[WorkspaceBranch]) -> None:
    """The sessions of the branches the commit of ``b`` invalidated end with them; those of
    ``b`` follow its files into its parent (a top-level branch's, into a new top-level
    branch that sees the base as just committed: the base itself is written only by
    commits). Called holding the parent's tree lock, after the commit's point of no
    return: a session that cannot move ends, and the commit stands."""
    for loser in losers:
        for s in list(loser._sessions):
            await s._terminate(f"branch {loser._name!r} was invalidated")
    movers = []
    for s in list(b._sessions):
        why = s._cannot_move()
        if why:
            log.warning("session_move_failed", branch=b._name, pid=s.pid, error=why)
            await s._terminate(f"branch {b._name!r} was committed and its session cannot "
                               f"follow: {why}")
        elif not s.closed:
            movers.append(s)
    if not movers:
        return
    target = b._parent
    if target is None:
        try:
            target = await b._ws._fork_held()
        except Exception as exc:
            log.warning("session_move_failed", branch=b._name, into=None, error=str(exc))
            for s in movers:
                await s._terminate(f"branch {b._name!r} was committed and no branch could be "
                                   f"made for its session in the base: {exc}")
            return
    for s in movers:
        await s._move(target)


def _ancestors(b: WorkspaceBranch) -> Iterator[WorkspaceBranch]:
    p = b._parent
    while p is not None:
        yield p
        p = p._parent


class Workspace:
    """A directory whose branches a backend manages. Get one from :func:`open_workspace`."""

    def __init__(self, path: Path, state_dir: Path, backend: Backend, *,
                 disk_limit: int | None = None) -> None:
        self.path = path
        self.state_dir = state_dir
        #: Every new top-level branch's disk limit (children inherit their parent's).
        self.disk_limit = disk_limit
        self._backend = backend
        self._closed = False
        self._lock = anyio.Lock(fast_acquire=True)
        self._base_lock = RWLock()
        self._persist_lock = anyio.Lock()  # one writer of branches.json at a time
        self._open: dict[str, WorkspaceBranch] = {}
        self._top: list[WorkspaceBranch] = []
        # Aborts under way (a branch closed, its processes still dying): closing waits for them.
        self._aborting: set[anyio.Event] = set()
        self._counter = itertools.count(1)
        self._scratch = state_dir / "runs"
        self._lock_fd: int | None = None
        self._mover: Any = None  # moves sessions after commits (_session._Mover), if started
        self._mover_lock = anyio.Lock()

    @property
    def backend(self) -> Backend:
        return self._backend

    def __repr__(self) -> str:
        return (f"<Workspace {str(self.path)!r} backend={self._backend.name!r} "
                f"open={len(self._open)}>")

    def _check_open(self) -> None:
        if self._closed:
            raise WorkspaceClosed(f"workspace {self.path} is closed")

    # -- public ----------------------------------------------------------------

    async def fork(self, name: str | None = None, *,
                   disk_limit: int | str | None = None) -> WorkspaceBranch:
        """A new top-level branch seeing the base exactly as it is now.

        ``disk_limit`` (bytes or ``"1G"``) caps what the branch's own storage may
        hold (writes past it fail with ``EDQUOT``); by default the workspace's.
        """
        return await self._fork(None, name, disk_limit)

    def branch(self, name: str | None = None) -> AbstractAsyncContextManager[Branch]:
        """Fork a top-level branch; commit it on clean exit, abort it on exception."""
        return _branch_cm(self.fork, name)

    def branches(self) -> list[WorkspaceBranch]:
        """Every open branch, parents before children."""
        return sorted(self._open.values(), key=lambda b: (b.depth, b.created, b.name))

    def get(self, name: str) -> WorkspaceBranch:
        """The open branch called ``name``."""
        check_branch_name(name)
        try:
            return self._open[name]
        except KeyError:
            raise BranchNotFound(f"no open branch named {name!r} in {self.path}") from None

    # -- lifecycle internals --------------------------------------------------------

    def _tree_lock(self, parent: WorkspaceBranch | None) -> RWLock:
        return self._base_lock if parent is None else parent._lock

    def _new_name(self) -> str:
        while True:
            name = f"b{next(self._counter)}"
            if name not in self._open and not self._backend.exists(name):
                return name

    async def _fork(self, parent: WorkspaceBranch | None, name: str | None,
                    disk_limit: int | str | None = None) -> WorkspaceBranch:
        self._check_open()
        if parent is not None:
            parent._check_open()
        disk = _disk_size(disk_limit, "disk_limit")
        if disk is not None and self._backend.disk_limits is None:
            raise _no_disk_limits(self._backend, f"fork(disk_limit={disk_limit!r})")
        if disk is None:
            disk = parent._disk if parent is not None else self.disk_limit
        started = time.perf_counter()
        async with self._lock:
            if name is None:
                name = self._new_name()
            else:
                check_branch_name(name)
                if name in self._open or self._backend.exists(name):
                    raise BranchExists(f"a branch named {name!r} already exists in {self.path}")
            placeholder = WorkspaceBranch(self, name, parent, Path())
            self._open[name] = placeholder  # reserve the name
        try:
            async with self._tree_lock(parent).shared():
                if parent is not None:
                    parent._check_open()
                path = await self._backend.create(name, parent._name if parent else None)
            b = placeholder
            b._disk = disk
            if disk is not None:
                await b._send_disk_limit()
        except BaseException:
            self._open.pop(name, None)
            if self._backend.exists(name):  # made, but its limit could not be set
                with anyio.CancelScope(shield=True):
                    try:
                        await self._backend.abort(name)
                    except Exception as exc:  # cleaned at the next open; keep the first error
                        log.warning("branch_release_failed", branch=name, error=str(exc))
            raise
        b._path = path
        (parent._children if parent is not None else self._top).append(b)
        await self._persist()
        log.info("branch_forked", branch=name, parent=parent.name if parent else None,
                 depth=b.depth, duration_ms=round((time.perf_counter() - started) * 1e3, 3))
        emit("branch_forked", branch=name, parent=parent.name if parent else None,
             depth=b.depth)
        return b

    async def _fork_held(self) -> WorkspaceBranch:
        """A new top-level branch, made while the caller holds the base's tree lock
        exclusively (a commit into the base whose branch had sessions: they move here)."""
        async with self._lock:
            name = self._new_name()
            b = WorkspaceBranch(self, name, None, Path())
            self._open[name] = b
        try:
            b._path = await self._backend.create(name, None)
            b._disk = self.disk_limit
            if b._disk is not None:
                await b._send_disk_limit()
        except BaseException:
            self._open.pop(name, None)
            if self._backend.exists(name):
                with anyio.CancelScope(shield=True):
                    with contextlib.suppress(Exception):
                        await self._backend.abort(name)
            raise
        self._top.append(b)
        log.info("branch_forked", branch=name, parent=None, depth=0, why="session moved")
        emit("branch_forked", branch=name, parent=None, depth=0)
        return b

    async def _commit(self, b: WorkspaceBranch) -> None:
        b._check_open()
        started = time.perf_counter()
        parent = b._parent
        async with self._tree_lock(parent).exclusive(), b._lock.exclusive():
            b._check_open()
            if parent is not None:
                parent._check_open()
            changes = await self._backend.commit(b._name)
            # Point of no return: the data is in the parent.
            with anyio.CancelScope(shield=True):
                b._state = BranchState.COMMITTED
                b._why_closed = "committed"
                self._open.pop(b._name, None)
                siblings = parent._children if parent is not None else self._top
                losers: list[WorkspaceBranch] = []
                for s in siblings:
                    if s is not b and s._state is BranchState.OPEN:
                        losers.extend(s._descendants())
                        losers.append(s)
                losers = b._descendants() + losers
                for loser in losers:
                    loser._state = BranchState.INVALIDATED
                    into = repr(parent._name) if parent is not None else "the base"
                    loser._why_closed = f"{b._name!r} committed first into {into}"
                    self._open.pop(loser._name, None)
                    for scope in loser._runs:
                        scope.cancel()
                siblings[:] = [s for s in siblings if s is not b and s._state is BranchState.OPEN]
                await _sessions_after_commit(b, losers)
                await self._release(losers)
                await self._persist()
        log.info("branch_committed", branch=b._name, parent=parent.name if parent else None,
                 depth=b.depth, changes=len(changes),
                 invalidated=[x._name for x in losers],
                 duration_ms=round((time.perf_counter() - started) * 1e3, 3))
        emit("branch_committed", branch=b._name, parent=parent.name if parent else None,
             depth=b.depth, invalidated=[x._name for x in losers])

    async def _abort(self, b: WorkspaceBranch, state: BranchState, why: str) -> None:
        await self._abort_many([b], state, why)

    async def _abort_many(self, roots: Sequence[WorkspaceBranch], state: BranchState,
                          why: str) -> None:
        """Close ``roots`` and their descendants; their storage goes in one backend request."""
        done = anyio.Event()
        self._aborting.add(done)
        try:
            with anyio.CancelScope(shield=True):
                await self._abort_shielded(roots, state, why)
        finally:
            self._aborting.discard(done)
            done.set()

    async def _abort_shielded(self, roots: Sequence[WorkspaceBranch], state: BranchState,
                              why: str) -> None:
        started = time.perf_counter()
        victims_of: list[list[WorkspaceBranch]] = []
        for b in roots:
            victims = [*b._descendants(), b]
            victims_of.append(victims)
            for v in victims:
                if v._state is BranchState.OPEN:
                    v._state = state
                    v._why_closed = why
                    self._open.pop(v._name, None)
                    for scope in v._runs:
                        scope.cancel()
                    for session in list(v._sessions):
                        await session._terminate(f"branch {v._name!r} {why}")
            siblings = b._parent._children if b._parent is not None else self._top
            if b in siblings:
                siblings.remove(b)
        async with contextlib.AsyncExitStack() as held:
            for b in roots:  # each one's runs have ended (they were cancelled above)
                await held.enter_async_context(b._lock.exclusive())
            await self._release([v for victims in victims_of for v in victims])
        await self._persist()
        duration_ms = round((time.perf_counter() - started) * 1e3, 3)
        for b, victims in zip(roots, victims_of, strict=True):
            log.info("branch_aborted", branch=b._name,
                     parent=b._parent.name if b._parent else None, depth=b.depth,
                     descendants=len(victims) - 1, duration_ms=duration_ms)
            emit("branch_aborted", branch=b._name, depth=b.depth)

    async def _release(self, victims: list[WorkspaceBranch]) -> None:
        """Release the storage of ``victims`` (children first) in one backend request."""
        if not victims:
            return
        started = time.perf_counter()
        try:
            await self._backend.abort_many([v._name for v in victims])
        except OSError as exc:  # storage left behind is cleaned at the next open
            log.warning("branch_release_failed", branches=[v._name for v in victims],
                        error=str(exc))
        duration_ms = round((time.perf_counter() - started) * 1e3, 3)
        for v in victims:
            if v._state is BranchState.INVALIDATED:
                log.info("branch_invalidated", branch=v._name, parent=v._parent_name(),
                         depth=v.depth, reason=v._why_closed, duration_ms=duration_ms)
                emit("branch_invalidated", branch=v._name, depth=v.depth)

    # -- persistence -----------------------------------------------------------------

    def _meta_path(self) -> Path:
        return self.state_dir / "branches.json"

    async def _persist(self, *, force: bool = False) -> None:
        path = self._meta_path()
        kept = self._backend.keeps_branches
        if kept and not force:
            return

        def write(data: dict[str, dict[str, object]]) -> None:
            tmp = path.with_suffix(".tmp")
            doc: dict[str, object] = {"version": 1, "backend": self._backend.name,
                                      "branches": data}
            if kept:
                doc["branches_kept_by_backend"] = True
            tmp.write_text(json.dumps(doc))
            os.replace(tmp, path)

        # Serialised: concurrent forks/commits each persist, and two threads sharing
        # branches.tmp made one os.replace fail (FileNotFoundError) after the branch
        # was made. The tree is read under the lock, so the last write is the newest.
        with anyio.CancelScope(shield=True):
            async with self._persist_lock:
                data: dict[str, dict[str, object]] = {} if kept else {
                    b.name: {"parent": b._parent_name(), "created": b.created}
                    for b in self.branches()
                }
                await anyio.to_thread.run_sync(write, data)

    async def _restore(self) -> None:
        """Rebuild the branch tree left by a crashed process."""
        path = self._meta_path()
        entries: dict[str, dict[str, object]]
        saved = self._backend.saved_branches() if self._backend.keeps_branches else None
        if saved is not None:
            entries = saved
            await self._persist(force=True)  # names the backend, for `branchagent status`
        elif not path.exists():
            return
        else:
            entries = _read_meta(path)["branches"]
        pending = dict(entries)
        while pending:
            progressed = False
            for name, meta in list(pending.items()):
                pname = meta.get("parent")
                if pname is not None and pname not in self._open:
                    if pname in pending:
                        continue
                    pending.pop(name)  # parent gone: orphan
                    await self._backend.abort(name)
                    progressed = True
                    continue
                pending.pop(name)
                progressed = True
                if not self._backend.exists(name):
                    log.warning("branch_lost", branch=name, reason="its storage is gone")
                    continue
                parent = self._open.get(pname) if isinstance(pname, str) else None
                b = WorkspaceBranch(self, name, parent, self._backend.path(name))
                b._disk = self.disk_limit
                if b._disk is not None:
                    await b._send_disk_limit()
                created = meta.get("created")
                b.created = float(created) if isinstance(created, int | float) else time.time()
                (parent._children if parent else self._top).append(b)
                self._open[name] = b
            if not progressed:
                break
        if self._open:
            log.info("branches_restored", count=len(self._open), names=sorted(self._open))

    async def abort_many(self, branches: Iterable[Branch]) -> None:
        """Abort each of ``branches`` that is still open, and its descendants, releasing
        their storage in one backend request: N losers cost one round trip, not N.

        Closed branches are skipped. A branch that is not this workspace's raises
        :class:`~branchagent.BranchNotFound` before anything is aborted.
        """
        chosen: list[WorkspaceBranch] = []
        for b in branches:
            if not isinstance(b, WorkspaceBranch) or b._ws is not self:
                raise BranchNotFound(f"{b!r} is not a branch of the workspace {self.path}")
            if b._state is BranchState.OPEN and all(b is not c for c in chosen):
                chosen.append(b)
        ids = {id(b) for b in chosen}
        roots = [b for b in chosen if not any(id(a) in ids for a in _ancestors(b))]
        if roots:
            await self._abort_many(roots, BranchState.ABORTED, "aborted")

    # -- open / close -------------------------------------------------------------------

    async def aclose(self) -> None:
        """Abort every open branch, close the backend, release the lock. Idempotent."""
        if self._closed:
            return
        with anyio.move_on_after(_CLOSE_TIMEOUT, shield=True):
            for b in list(reversed(self.branches())):
                if b.state is BranchState.OPEN:
                    try:
                        await self._abort(b, BranchState.ABORTED, "workspace closed")
                    except Exception as exc:  # keep closing; log what we could not release
                        log.warning("close_abort_failed", branch=b.name, error=str(exc))
            await self._wait_for_aborts()
            self._closed = True
            await self._close_mover()
            try:
                await self._backend.aclose()
            finally:
                self._unlock()

    async def _close_mover(self) -> None:
        mover, self._mover = self._mover, None
        if mover is not None:
            await mover.aclose()

    async def _detach(self) -> None:
        """Close without aborting: branches survive for the next open (used after errors)."""
        if self._closed:
            return
        self._closed = True
        with anyio.move_on_after(_CLOSE_TIMEOUT, shield=True):
            await self._wait_for_aborts()
            await self._close_mover()
            try:
                await self._backend.aclose()
            finally:
                self._unlock()

    async def _wait_for_aborts(self) -> None:
        """Until every abort begun elsewhere (another task) has released its storage."""
        while self._aborting:
            await next(iter(self._aborting)).wait()

    def _lock_state(self, opened_at: str = "?") -> None:
        _check_not_open_here(self.path, self.state_dir)
        fd = os.open(self.state_dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise WorkspaceLocked(
                f"workspace {self.path} is open in another process (lock {self.state_dir}/lock)"
            ) from None
        self._lock_fd = fd
        _OPEN_HERE[self.state_dir] = (os.getpid(), opened_at)

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
            _OPEN_HERE.pop(self.state_dir, None)


def _check_not_open_here(path: Path, state_dir: Path) -> None:
    """WorkspaceAlreadyOpen when this process has ``state_dir``'s workspace open already."""
    held = _OPEN_HERE.get(state_dir)
    if held is not None and held[0] == os.getpid():
        raise WorkspaceAlreadyOpen(
            f"workspace {path} is already open in this process (opened at {held[1]}); "
            "use that Workspace object, or leave its `async with` before opening it again"
        )


def _opened_at() -> str:
    """``file:line`` of the code that called :func:`open_workspace` (the first frame outside
    this module and contextlib)."""
    frame: FrameType | None = sys._getframe(1)
    skip = {__file__, _contextlib_file}
    while frame is not None and frame.f_code.co_filename in skip:
        frame = frame.f_back
    if frame is None:
        return "?"
    return f"{frame.f_code.co_filename}:{frame.f_lineno}"


_contextlib_file = asynccontextmanager.__code__.co_filename


def default_state_dir(path: Path) -> Path:
    """``<parent>/.<name>.branchagent``: beside the workspace, on the same filesystem."""
    return path.parent / f".{path.name}.branchagent"


@attrs.frozen
class SavedState:
    """What a workspace's state directory records, read without opening the workspace."""

    #: The backend the workspace was last opened with (None: no record).
    backend: str | None
    #: Its branches: name -> ``{"parent": name or None, "created": epoch seconds}``.
    branches: Mapping[str, Mapping[str, object]]


def read_saved_state(state_dir: Path, *, branches: bool = True) -> SavedState:
    """The backend and branches recorded in ``state_dir``, read from disk and touching
    nothing, so it is safe while another process holds the workspace (``branchagent
    status``). Where the backend keeps its branches itself, they are read through its
    ``read_saved_branches``. ``branches=False``: only the backend. Unreadable records
    read as none."""
    try:
        raw = _read_meta(state_dir / "branches.json")
    except (OSError, WorkspaceCorrupt):
        return SavedState(backend=None, branches={})
    backend = raw.get("backend")
    name = backend if isinstance(backend, str) else None
    entries: Mapping[str, Mapping[str, object]] = raw["branches"] if branches else {}
    if branches and name is not None and raw.get("branches_kept_by_backend"):
        try:
            kept = load_backend(name).read_saved_branches(state_dir)
        except BranchAgentError:
            kept = None
        if kept is not None:
            entries = kept
    return SavedState(backend=name, branches=entries)


def _read_meta(path: Path) -> dict[str, Any]:
    """``branches.json`` as :meth:`Workspace._persist` writes it (WorkspaceCorrupt if not)."""
    try:
        raw = json.loads(path.read_text())
    except ValueError as exc:
        raise WorkspaceCorrupt(f"cannot read {path}: {exc}") from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("branches"), dict):
        raise WorkspaceCorrupt(f"cannot read {path}: not a branch record: {raw!r:.80}")
    return raw


def _is_state_dir(path: Path) -> bool:
    """Whether ``path`` is the state directory of a workspace (what open_workspace makes
    there first: its ``lock`` and its ``runs`` directory)."""
    try:
        return (path / "lock").is_file() and (path / "runs").is_dir()
    except OSError:
        return False


def _within(path: Path, top: Path) -> bool:
    return path == top or top in path.parents


def _resolve_paths(
    path: str | os.PathLike[str], state_dir: str | os.PathLike[str] | None
) -> tuple[Path, Path]:
    """The workspace's real path and its state directory, checked (touching nothing)."""
    root = Path(os.path.abspath(path))
    if not root.is_dir():
        raise FileNotFoundError(f"workspace {root} is not a directory")
    root = Path(os.path.realpath(root))
    if root == root.parent:
        raise InvalidWorkspace(
            f"cannot open {root} as a workspace: it is the root of the filesystem, so its "
            "state directory would be inside it and a branch would cover the whole system; "
            "open a project directory instead (e.g. the directory of your repository)"
        )
    for name in (WORKSPACE_ENV, BRANCH_PATH_ENV):
        outer = os.environ.get(name)
        if outer and os.path.isabs(outer) and _within(root, Path(outer)):
            raise InvalidWorkspace(
                f"cannot open {root} as a workspace: this process runs inside a branch of "
                f"the workspace {os.environ.get(WORKSPACE_ENV) or outer} (${name}={outer}), "
                "and a workspace opened there would write its state into that branch as a "
                f"change; open a directory outside {outer}, or fork a nested branch with "
                "Branch.fork() instead"
            )
    for top in (root, *root.parents):
        if _is_state_dir(top):
            raise InvalidWorkspace(
                f"cannot open {root} as a workspace: it is inside {top}, the state directory "
                "of another workspace (its branches and records); open that workspace and "
                "fork a nested branch with Branch.fork(), or open a directory outside "
                f"{top}"
            )
    # realpath, like root: a state_dir reached through a symlink must not hide inside root.
    sdir = Path(os.path.realpath(state_dir)) if state_dir is not None else default_state_dir(root)
    if sdir == root or root in sdir.parents:
        raise InvalidWorkspace(
            f"state_dir {sdir} must not be inside the workspace {root}: it would be one of "
            "the workspace's own files; pass a state_dir outside it (the default sits "
            "beside the workspace)"
        )
    for top in sdir.parents:
        if _is_state_dir(top):
            raise InvalidWorkspace(
                f"state_dir {sdir} is inside {top}, the state directory of another "
                "workspace; pass a state_dir outside it"
            )
    return root, sdir


@asynccontextmanager
async def open_workspace(
    path: str | os.PathLike[str],
    *,
    backend: str | Backend | None = None,
    state_dir: str | os.PathLike[str] | None = None,
    keep_branches: bool = False,
    disk_limit: int | str | None = None,
) -> AsyncIterator[Workspace]:
    """Open ``path`` as a workspace whose branches ``backend`` manages.

    ``backend`` is a name from the ``branchagent.backends`` entry points or a
    backend instance. By default it is ``"fuse"`` where FUSE can work for this
    user here, else ``"copy"`` (the reason is logged as ``backend_fallback``,
    with its fix); a backend asked for by name is never replaced. ``state_dir`` holds branch
    data and metadata; by default it sits beside the workspace, on the same
    filesystem, so commits move data by rename. On exit every open branch is
    aborted (``keep_branches=True`` leaves them for a later open instead) and
    the workspace holds exactly what was committed. Branches left by a
    crashed process are listed again by :meth:`Workspace.branches`.

    ``disk_limit`` (bytes or ``"1G"``) caps what each branch's own storage may
    hold (see :meth:`Branch.usage`): a write past it fails with ``EDQUOT`` inside
    the branch. Every branch gets it (a nested one its parent's limit; ``fork``
    can set another). A backend that cannot enforce it (``"copy"``) raises
    ``BackendUnavailable`` here.
    """
    opened_at = _opened_at()
    disk = _disk_size(disk_limit, "disk_limit")
    root, sdir = await anyio.to_thread.run_sync(_resolve_paths, path, state_dir)
    _check_not_open_here(root, sdir)  # before anything is created
    await log_host_capabilities()  # debug, once per process
    if backend is None:
        backend = await anyio.to_thread.run_sync(default_backend)
    if isinstance(backend, str):
        be = load_backend(backend)
    elif isinstance(backend, Backend):
        be = backend
    else:
        raise BackendNotFound(f"backend must be a name or a Backend instance, not {backend!r}")
    if disk is not None and be.disk_limits is None:
        raise _no_disk_limits(be, f"open_workspace(disk_limit={disk_limit!r})")
    precheck = getattr(be, "check_available", None)
    if callable(precheck):  # what the host lacks, said before anything is created
        await anyio.to_thread.run_sync(precheck)
    await anyio.to_thread.run_sync(lambda: (sdir / "runs").mkdir(parents=True, exist_ok=True))
    ws = Workspace(root, sdir, be, disk_limit=disk)
    ws._lock_state(opened_at)
    try:
        await be.open(root, sdir)
        await ws._restore()
    except BaseException:
        ws._unlock()
        raise
    log.info("workspace_opened", path=str(root), backend=be.name, state_dir=str(sdir),
             restored=len(ws._open))
    try:
        yield ws
    finally:
        if keep_branches:
            await ws._detach()
        else:
            await ws.aclose()
