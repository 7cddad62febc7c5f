"""Forkable Python sessions: a live interpreter in a branch, forked with its branch.

``session = await branch.session()`` starts one isolated interpreter in the
branch's sandbox (the branch at the workspace's own path in a private mount
namespace, PID namespace, cgroups under :class:`Limits`); the child side is
:mod:`._sandbox._session_child`. ``child = await session.fork()`` forks the
branch, then the interpreter: the new process binds the child branch's view
over the workspace path in a mount namespace of its own, so both files and
memory are the parent's at that instant, and writes on either side stay there.

A session and the sessions forked from it share one sandbox (one PID
namespace, whose PID 1 is a reaper); each interpreter has cgroups of its own.
Inside the sandbox the state directory is hidden as for any isolated run,
except ``<state_dir>/views``: the branches' views (the FUSE mount, or the copy
backend's branch directories), where a fork finds its child branch.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import anyio
import anyio.abc
import anyio.to_thread
import cloudpickle  # type: ignore[import-untyped]

from ._limits import Limits
from ._log import get_logger
from ._sandbox import _cgroup
from ._sandbox._child import dumps
from ._sandbox._spawn import (
    _CGROUP_RO_ROOT,
    _CGROUP_RO_USERNS,
    _DROP,
    _FAIL,
    _SETPRIV,
    BRANCH_PATH_ENV,
    ISOLATION_MARKER,
    WORKSPACE_ENV,
    _unshare_argv,
    isolation_available,
    isolation_problem,
)
from .exceptions import (
    BranchClosed,
    IsolationUnavailable,
    ProcessKilled,
    RemoteError,
    SandboxError,
    SessionClosed,
    SessionForkError,
)

if TYPE_CHECKING:
    from ._workspace import Workspace, WorkspaceBranch

__all__ = ["Session"]

T = TypeVar("T")

log = get_logger("branchagent.session")

_CHILD = os.fspath(Path(__file__).with_name("_sandbox") / "_session_child.py")
_REHOME = os.fspath(Path(__file__).with_name("_sandbox") / "_rehome.py")
_REHOME_TIMEOUT = 10.0
_HEADER = struct.Struct(">Q")
_START_TIMEOUT = 60.0


def _script(cgroup_ro: str, fd: int) -> str:
    """The script between ``unshare`` and the interpreter: the branch over the workspace
    path, the state directory covered by a tmpfs that holds only ``views`` (the
    branches' views), the cgroup tree read-only, capabilities dropped. ``fd`` (one
    digit, not the session's socket) holds the views while the state directory is
    covered: their path is under it, and a bind from the descriptor still reaches them."""
    return (
        f'b="$1"; w="$2"; v="$3"; s="$4"; shift 4; mount --bind "$b" "$w" || {_FAIL}; '
        f'exec {fd}<"$v" || {_FAIL}; '
        f'mount -t tmpfs -o size=64k,mode=0755 tmpfs "$s" || {_FAIL}; '
        f'mkdir "$s/views" || {_FAIL}; '
        f'mount --no-canonicalize --rbind /proc/self/fd/{fd} "$s/views" || {_FAIL}; '
        f'exec {fd}<&-; '
        + cgroup_ro + f'cd "$w" || {_FAIL}; ' + _DROP
    )


def views_root(branch: WorkspaceBranch) -> Path:
    """The directory under the state directory that holds every branch's view."""
    backend = branch._ws._backend
    root = getattr(backend, "views_root", None)
    if not isinstance(root, Path):
        raise SandboxError(
            f"the {backend.name!r} backend does not say where its branches' views are "
            "(no views_root): sessions need it to fork")
    return root


def _check_forkable(branch: WorkspaceBranch) -> None:
    """A fork finds its child branch's view under the views a session saw when it
    started: a backend that mounts each branch on its own (overlay) adds mounts the
    session's private mount namespace never sees."""
    backend = branch._ws._backend
    if getattr(backend, "mount_per_branch", False):
        raise SessionForkError(
            f"sessions cannot fork on the {backend.name!r} backend yet: it mounts each "
            "branch on its own, and a running session's private mount namespace does not "
            "see mounts made after it started; use backend='fuse' or 'copy' for forking "
            "sessions (a session that does not fork works on every backend)")


def _view_in_sandbox(branch: WorkspaceBranch) -> str:
    rel = branch.path.relative_to(views_root(branch))
    return os.fspath(branch._ws.state_dir / "views" / rel)


def _ns_pid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return int(line.split()[-1])
    except (OSError, ValueError):
        return None
    return None


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(p) for p in f.read().split())
        except OSError:
            pass
    return out


def _host_pid(root: int, ns_pid: int) -> int:
    """The PID (here) of the process of the sandbox under ``root`` whose own PID is
    ``ns_pid``."""
    todo = [root]
    seen = 0
    while todo and seen < 100_000:
        pid = todo.pop()
        seen += 1
        if pid != root and _ns_pid(pid) == ns_pid:
            return pid
        todo.extend(_children(pid))
    raise SandboxError(f"session process {ns_pid} not found in its sandbox")


class _Mover:
    """The helper that moves a workspace's sessions after commits (``_rehome.py
    --serve``), started at the first move: each move then costs a fork of it, not a
    Python start. It runs in the agent's namespaces; each fork enters a session's."""

    def __init__(self, popen: subprocess.Popen[bytes], stream: anyio.abc.SocketStream) -> None:
        self.popen = popen
        self.stream = stream
        self.lock = anyio.Lock()
        self.buf = bytearray()

    @classmethod
    async def start(cls) -> _Mover:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            popen = await anyio.to_thread.run_sync(lambda: subprocess.Popen(
                [sys.executable, "-I", "-S", _REHOME, "--serve", str(theirs.fileno())],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                cwd="/", pass_fds=(theirs.fileno(),), start_new_session=True))
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        return cls(popen, await anyio.abc.UNIXSocketStream.from_socket(mine))

    async def move(self, pid: int, view: str, ws: str) -> list[str]:
        """The mover's reply: ``["ok", how, cwd]`` (how the view was swapped, the
        session's working directory) or ``["err", why]``."""
        async with self.lock:
            with anyio.fail_after(_REHOME_TIMEOUT):
                await self.stream.send(json.dumps([pid, view, ws]).encode() + b"\n")
                while b"\n" not in self.buf:
                    try:
                        chunk = await self.stream.receive()
                    except (anyio.EndOfStream, anyio.BrokenResourceError) as exc:
                        raise OSError(f"the session mover exited (status "
                                      f"{self.popen.poll()})") from exc
                    self.buf += chunk
            line, _, rest = bytes(self.buf).partition(b"\n")
            self.buf[:] = rest
        return [str(x) for x in json.loads(line)]

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            await self.stream.aclose()  # it exits at end of stream
            try:
                await anyio.to_thread.run_sync(self.popen.wait, 5)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                await anyio.to_thread.run_sync(self.popen.wait)


async def _start_mover(ws: Workspace) -> _Mover:
    """The workspace's mover, started if it is not (closed with the workspace)."""
    async with ws._mover_lock:
        if ws._mover is None:
            ws._mover = await _Mover.start()
        mover = ws._mover
    assert isinstance(mover, _Mover)
    return mover


async def _move(ws: Workspace, pid: int, view: str, path: str) -> tuple[str, str]:
    """Move session ``pid`` to ``view`` with the workspace's mover (started with its
    first session); a mover that failed is replaced at the next move."""
    mover = await _start_mover(ws)
    try:
        reply = await mover.move(pid, view, path)
    except BaseException:
        if ws._mover is mover:  # gone, or out of step: start afresh next time
            ws._mover = None
        await mover.aclose()
        raise
    if reply[0] != "ok":
        raise OSError(reply[1])  # that move failed; the mover is fine
    return reply[1], reply[2]


class _Tree:
    """One sandbox (namespaces) shared by a session and its forks."""

    def __init__(self, proc: anyio.abc.Process, cg: _cgroup.RunCgroup | None,
                 log_path: Path, tmp: Path) -> None:
        self.proc = proc
        self.cg = cg
        self.log_path = log_path
        self.tmp = tmp
        self.sessions: set[Session] = set()
        self.ended = False

    def log_tail(self) -> str:
        try:
            with self.log_path.open("rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 4000))
                return f.read().decode("utf-8", errors="replace")
        except OSError:
            return ""

    async def release(self, session: Session) -> None:
        """Forget ``session``; end the sandbox after its last session."""
        self.sessions.discard(session)
        if self.sessions or self.ended:
            return
        self.ended = True
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(5):
                await self.proc.wait()  # the reaper exits once its last session is gone
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            if self.cg is not None:
                await anyio.to_thread.run_sync(self.cg.kill)
            await self.proc.wait()
            await self.proc.aclose()
            if self.cg is not None:
                await anyio.to_thread.run_sync(self.cg.remove)
            await anyio.to_thread.run_sync(_rmtree, self.tmp)


def _rmtree(p: Path) -> None:
    import shutil

    shutil.rmtree(p, ignore_errors=True)


def _join(cg: _cgroup.RunCgroup, pid: int) -> None:
    for f in cg.procs_files():
        cg.fs.write(Path(f), str(pid))


class Session:
    """A live Python interpreter in a branch. Get one from ``await branch.session()``.

    Requests run one at a time, in the order they come. ``exec``, ``eval`` and
    ``call`` return pickled values (cloudpickle) and raise what the code raised,
    with the same mapping as :meth:`Branch.call`. A session ends with
    :meth:`close`, or when its branch is aborted or invalidated. When its branch is
    committed, it goes on in the branch's parent (:attr:`branch` changes; a top-level
    branch's session goes on in a new top-level branch that sees the base as just
    committed): see ``docs/sessions.md``.
    """

    def __init__(self, branch: WorkspaceBranch, tree: _Tree, stream: anyio.abc.SocketStream,
                 pid: int, ns_pid: int, cg: _cgroup.RunCgroup | None, limits: Limits) -> None:
        self._branch = branch
        self._tree = tree
        self._stream = stream
        self._buf = bytearray()
        self.pid = pid  #: the interpreter's PID on this host
        self.ns_pid = ns_pid  #: its PID inside the session's PID namespace
        self._cg = cg
        self._limits = limits
        self._lock = anyio.Lock()
        self._closed: str | None = None
        self._cleaned = False
        self._node = False  # the node session of its branch (strategy.InSession)
        self._cwd_pending: str | None = None  # moved: where to chdir before the next request
        self.moves = 0  #: how many commits this session has followed into a parent
        self._forked = False  # made by fork(): its namespace holds its parent's view, locked
        tree.sessions.add(self)
        branch._sessions.add(self)

    @property
    def branch(self) -> WorkspaceBranch:
        """The branch this session sees at the workspace's path (after a commit of it,
        the branch it moved into)."""
        return self._branch

    @property
    def closed(self) -> bool:
        return self._closed is not None

    def __repr__(self) -> str:
        state = f"closed: {self._closed}" if self._closed else "open"
        return f"<Session in {self._branch.name!r} pid={self.pid} {state}>"

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- requests -------------------------------------------------------------------

    async def exec(self, code: str) -> None:
        """Run ``code`` (statements) in the session's global namespace."""
        if not isinstance(code, str):
            raise TypeError(f"code must be a str of Python statements, not {type(code).__name__}")
        await self._request(("exec", code), "exec")

    async def eval(self, expr: str) -> Any:
        """The value of the expression ``expr`` in the session's global namespace."""
        if not isinstance(expr, str):
            raise TypeError(f"expr must be a str (a Python expression), not {type(expr).__name__}")
        return await self._request(("eval", expr), "eval")

    async def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` in the session (``fn`` travels with cloudpickle; a
        function of ``__main__`` sees the session's globals only through what it is given)."""
        if not callable(fn):
            raise TypeError(f"fn must be callable, not {type(fn).__name__}")
        return await self._request(("call", fn, args, kwargs), getattr(fn, "__qualname__", "call"))

    async def fork(self, name: str | None = None) -> Session:
        """A child branch of this session's branch, with a copy of this interpreter in it.

        The child's memory is this interpreter's at this instant (a ``fork()``); it sees
        the child branch at the workspace's path. Refused (:class:`SessionForkError`,
        nothing changed) when the interpreter runs other threads, has child processes
        or holds open files: a fork would lose the first two and share the third.
        """
        self._check_open()
        self._branch._check_open()
        _check_forkable(self._branch)
        child_branch = await self._branch.fork(name)
        try:
            return await self._fork_into(child_branch)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await child_branch.abort()
            raise

    async def _fork_into(self, child_branch: WorkspaceBranch) -> Session:
        _check_forkable(child_branch)
        view = _view_in_sandbox(child_branch)
        made: list[_cgroup.RunCgroup | None] = []

        async def make_cgroup() -> None:
            made.append(await anyio.to_thread.run_sync(_cgroup.host().create, self._limits))

        # The child's cgroups are made while the interpreter forks (both take a few ms).
        try:
            sock, ns_pid = await _beside(make_cgroup, self._fork_round_trip(view))
        except BaseException:
            with anyio.CancelScope(shield=True):
                for cg in made:
                    if cg is not None:
                        await anyio.to_thread.run_sync(cg.remove)
            raise
        cg = made[0]
        stream = await anyio.abc.UNIXSocketStream.from_socket(sock)
        try:
            pid = await anyio.to_thread.run_sync(_host_pid, self._tree.proc.pid, ns_pid)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await stream.aclose()  # the child ends when it reads end of stream
                if cg is not None:
                    await anyio.to_thread.run_sync(cg.remove)
            raise
        child = Session(child_branch, self._tree, stream, pid, ns_pid, cg, self._limits)
        child._forked = True
        try:
            # Moving it into its cgroups (a cgroup migration waits for an RCU grace period,
            # often the largest part of a fork) overlaps with the child's first reply.
            async def join() -> None:
                if cg is not None:
                    await anyio.to_thread.run_sync(_join, cg, pid)

            reply = await _beside(join, child._recv_reply("fork"))  # its word: view set
            child._unpack(reply, "fork")
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await child._terminate("the fork failed")
            if isinstance(exc, RemoteError | OSError):
                raise SessionForkError(f"the forked interpreter could not take its "
                                       f"branch's view: {exc}") from exc
            raise
        log.info("session_forked", branch=child_branch.name, parent=self._branch.name,
                 pid=pid)
        return child

    async def _fork_round_trip(self, view: str) -> tuple[socket.socket, int]:
        """Ask the interpreter to fork; the child's socket and its PID in the namespace."""
        async with self._lock:
            self._check_open()
            await self._chdir_if_moved()
            await self._send(("fork", view))
            try:
                first = await self._receive_fd_or_byte()
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError) as exc:
                raise await self._died("fork") from exc
            if isinstance(first, bytes):  # no descriptor: an error reply
                self._buf[:0] = first
                self._refused(await self._recv_reply("fork"))
            sock = socket.socket(fileno=first)
            try:
                reply = await self._recv_reply("fork")
                return sock, int(self._unpack(reply, "fork"))
            except BaseException:
                sock.close()
                raise

    def _refused(self, reply: Any) -> NoReturn:
        try:
            self._unpack(reply, "fork")
        except RuntimeError as exc:
            raise SessionForkError(str(exc)) from None
        raise SessionForkError(f"unexpected reply to fork: {reply!r}")

    async def close(self) -> None:
        """End the interpreter (and whatever it started). Idempotent."""
        if self._closed is None:
            with anyio.move_on_after(2, shield=True):
                async with self._lock:
                    if self._closed is None:
                        with contextlib.suppress(Exception):
                            await self._send(("close",))
                            await self._recv_reply("close")
        await self._terminate("closed")

    # -- the workspace's side -----------------------------------------------------------

    async def _move(self, target: WorkspaceBranch) -> None:
        """Follow this session's committed branch into ``target`` (its parent, or a new
        top-level branch): ``target``'s view replaces the committed one at the workspace
        path in the session's mount namespace, by a helper that enters the session's
        user and mount namespaces (:mod:`._sandbox._rehome`). The interpreter goes back
        to its working directory before its next request. Shielded; on failure the
        session ends (the commit stands), logged with the reason."""
        if self._cleaned:
            return
        old = self._branch
        started = time.perf_counter()
        with anyio.CancelScope(shield=True):
            why = self._cannot_move()
            if why:
                log.warning("session_move_failed", branch=old.name, into=target.name,
                            pid=self.pid, error=why)
                await self._terminate(f"branch {old.name!r} was committed and the session "
                                      f"could not move into {target.name!r}: {why}")
                return
            why = ""
            try:
                view = _view_in_sandbox(target)
                how, cwd = await _move(old._ws, self.pid, view, os.fspath(old._ws.path))
            except (OSError, SandboxError, TimeoutError, ValueError) as exc:
                why = str(exc)[-1000:] or type(exc).__name__
            if why or self._cleaned:
                why = why or "it ended meanwhile"
                log.warning("session_move_failed", branch=old.name, into=target.name,
                            pid=self.pid, error=why)
                await self._terminate(f"branch {old.name!r} was committed and the session "
                                      f"could not move into {target.name!r}: {why}")
                return
            old._sessions.discard(self)
            self._branch = target
            if self._node:  # the target's node state is now this one's (strategy.InSession)
                for other in target._sessions:
                    other._node = False
            target._sessions.add(self)
            self._cwd_pending = cwd.strip() or os.fspath(old._ws.path)
            self.moves += 1
        log.info("session_moved", branch=old.name, into=target.name, pid=self.pid, how=how,
                 duration_ms=round((time.perf_counter() - started) * 1e3, 3))

    def _cannot_move(self) -> str:
        """Why this session cannot follow its branch's commit ("": it can)."""
        backend = self._branch._ws._backend
        if getattr(backend, "mount_per_branch", False):
            return (f"sessions cannot follow a commit on the {backend.name!r} backend yet: "
                    "it mounts each branch on its own, and the session's private mount "
                    "namespace does not see mounts made after it started; use "
                    "backend='fuse' or 'copy'")
        if self._forked and self.moves:
            # Its view now sits on the view of the branch it moved into, which this commit
            # removed; under that lies its parent session's view, which it cannot unmount
            # (docs/sessions.md, "Why a fork follows only one commit").
            return ("a forked session follows one commit (its own branch's, into the branch "
                    "it was forked from); this was its second: its mount namespace holds "
                    "its parent session's view of the committed branch, locked (Linux lets "
                    "no one unmount a mount inherited into a nested user namespace)")
        return ""

    async def _chdir_if_moved(self) -> None:
        """After a move, the interpreter's working directory again (called holding the
        lock, before a request)."""
        cwd, self._cwd_pending = self._cwd_pending, None
        if cwd is not None:
            await self._send(("chdir", cwd))
            self._unpack(await self._recv_reply("chdir"), "chdir")

    async def _terminate(self, why: str) -> None:
        """Kill the interpreter and its processes, free its cgroups. Idempotent, shielded."""
        if self._closed is None:
            self._closed = why
        if self._cleaned:
            return
        self._cleaned = True
        with anyio.CancelScope(shield=True):
            _kill(self.pid)
            if self._cg is not None:
                await anyio.to_thread.run_sync(self._cg.kill)
                await anyio.to_thread.run_sync(self._cg.remove)
            await self._stream.aclose()
            self._branch._sessions.discard(self)
            await self._tree.release(self)

    # -- plumbing -------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed is not None:
            raise SessionClosed(f"session in branch {self._branch.name!r} is closed "
                                f"({self._closed}); start another with branch.session()")

    async def _request(self, req: tuple[Any, ...], what: str) -> Any:
        self._check_open()
        self._branch._check_open()
        try:
            blob = dumps(req)
        except Exception as exc:
            raise SandboxError(f"cannot send {what} to the session: {exc}") from exc
        async with self._lock:
            self._check_open()
            await self._chdir_if_moved()
            try:
                await self._stream.send(_HEADER.pack(len(blob)) + blob)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                raise await self._died(what) from exc
            except BaseException:
                # Cancelled mid-send: the stream is out of step; the session cannot go on.
                with anyio.CancelScope(shield=True):
                    await self._terminate(f"{what} was cancelled")
                raise
            reply = await self._recv_reply(what)
        return self._unpack(reply, what)

    async def _send(self, req: tuple[Any, ...]) -> None:
        blob = dumps(req)
        try:
            await self._stream.send(_HEADER.pack(len(blob)) + blob)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            raise await self._died(str(req[0])) from exc

    async def _receive_fd_or_byte(self) -> int | bytes:
        assert isinstance(self._stream, anyio.abc.UNIXSocketStream)
        if self._buf:
            return bytes(self._buf[:0])  # cannot happen: replies alternate with requests
        msg, fds = await self._stream.receive_fds(1, 1)
        if not msg:
            raise anyio.EndOfStream
        if fds:
            return fds[0]
        return msg

    async def _exactly(self, n: int) -> bytes:
        while len(self._buf) < n:
            self._buf += await self._stream.receive(max(65536, n - len(self._buf)))
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    async def _recv_reply(self, what: str) -> Any:
        try:
            (n,) = _HEADER.unpack(await self._exactly(_HEADER.size))
            data = await self._exactly(n)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError,
                OSError) as exc:
            raise await self._died(what) from exc
        except BaseException:
            # Cancelled mid-reply: the stream is out of step; the session cannot go on.
            with anyio.CancelScope(shield=True):
                await self._terminate(f"{what} was cancelled")
            raise
        return cloudpickle.loads(data)

    def _unpack(self, payload: Any, what: str) -> Any:
        if payload[0] == "ok":
            return payload[1]
        if payload[0] == "err":
            remote: BaseException = payload[1]
            remote.add_note(f"raised in session {self._branch.name!r}; its traceback:\n"
                            f"{payload[2]}")
            raise remote
        _, type_name, message, tb = payload
        raise RemoteError(type_name, message, tb)

    async def _died(self, what: str) -> BaseException:
        """The interpreter is gone: clean up, and the error that says why."""
        if self._closed is not None:
            err: BaseException = SessionClosed(
                f"session in branch {self._branch.name!r} ended during {what} "
                f"({self._closed})")
            if self._branch._state.value != "open":
                err = BranchClosed(f"branch {self._branch.name!r} is {self._branch.state.value}"
                                   f" and its session ended during {what}")
            return err
        killed = None
        if self._cg is not None:
            if await anyio.to_thread.run_sync(self._cg.oom_killed):
                killed = "memory"
            elif await anyio.to_thread.run_sync(self._cg.pids_limit_hit):
                killed = "pids"
        tail = self._tree.log_tail()
        await self._terminate(f"died during {what}")
        return ProcessKilled(
            f"the session's interpreter in branch {self._branch.name!r} died during {what}"
            f" (killed={killed!r}): {tail[-2000:]}")


async def _beside(side: Callable[[], Awaitable[None]], main: Awaitable[T]) -> T:
    """``await main`` while ``side()`` runs too; both finish. An error of either comes
    out as itself (the first one; not in an ExceptionGroup)."""
    errors: list[BaseException] = []
    out: list[T] = []

    async def run_side() -> None:
        try:
            await side()
        except Exception as exc:
            errors.append(exc)

    async def run_main() -> None:
        try:
            out.append(await main)
        except Exception as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(run_side)
        await run_main()
    if errors:
        raise errors[0]
    return out[0]


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


async def start_session(branch: WorkspaceBranch, *, limits: Limits | None = None,
                        env: Mapping[str, str] | None = None) -> Session:
    """Start an interpreter in ``branch``'s sandbox (see :meth:`Branch.session`)."""
    branch._check_open()
    limits = limits or Limits()
    if limits.disk is not None:
        raise NotImplementedError(
            "Limits.disk is not applied to sessions yet; cap the branch with "
            "fork(disk_limit=...) instead")
    network = limits.network
    if not await anyio.to_thread.run_sync(isolation_available, network):
        problem = isolation_problem(network) or "private mount/PID namespaces are not permitted"
        raise IsolationUnavailable(f"{problem}: a session needs them (it runs isolated)")
    ws = branch._ws
    views = views_root(branch)
    _view_in_sandbox(branch)  # (the backend says where its views are, or refuses)
    try:
        await _start_mover(ws)  # for commits to come; its Python starts while this one does
    except OSError as exc:  # tried again at the first move
        log.warning("session_mover_not_started", error=str(exc))
    ws._scratch.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="session-", dir=ws._scratch))
    log_path = tmp / "log"
    tree_cg = await anyio.to_thread.run_sync(_cgroup.host().create, Limits())
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    proc = None
    try:
        cmd: list[str] = [sys.executable, _CHILD, str(theirs.fileno()), os.fspath(ws.path)]
        if limits.memory is not None and _cgroup.host().mechanisms()["memory"] == "rlimit-as":
            cmd = ["prlimit", f"--as={limits.memory}", "--", *cmd]  # per process, inherited
        script = _script(_CGROUP_RO_ROOT if os.geteuid() == 0 else _CGROUP_RO_USERNS,
                         9 if theirs.fileno() != 9 else 8)
        cmd = [*_unshare_argv(network), "sh", "-c", script, "sh", os.fspath(branch.path),
               os.fspath(ws.path), os.fspath(views), os.fspath(ws.state_dir), *cmd]
        if tree_cg is not None:
            cmd = tree_cg.wrap(cmd)
        full_env = dict(os.environ)
        full_env["PYTHONUNBUFFERED"] = "1"
        full_env[WORKSPACE_ENV] = os.fspath(ws.path)
        full_env[BRANCH_PATH_ENV] = os.fspath(branch.path)
        if env:
            full_env.update(env)
        with log_path.open("wb") as logf:
            proc = await anyio.open_process(
                cmd, stdin=None, stdout=logf, stderr=logf, cwd="/", env=full_env,
                start_new_session=True, pass_fds=(theirs.fileno(),))
        theirs.close()
        tree = _Tree(proc, tree_cg, log_path, tmp)
        stream = await anyio.abc.UNIXSocketStream.from_socket(mine)
        blob = pickle.dumps(list(sys.path))
        await stream.send(_HEADER.pack(len(blob)) + blob)
        buf = bytearray()
        with anyio.move_on_after(_START_TIMEOUT):
            while len(buf) < _HEADER.size or len(buf) < _HEADER.size + _HEADER.unpack(
                    bytes(buf[:_HEADER.size]))[0]:
                try:
                    buf += await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    break
        complete = len(buf) >= _HEADER.size and len(buf) >= _HEADER.size + _HEADER.unpack(
            bytes(buf[:_HEADER.size]))[0]
        if not complete:
            await stream.aclose()
            tree.ended = True
            await _end(proc, tree_cg)
            _start_failed(tree.log_tail(), ws.path)
        ns_pid = cloudpickle.loads(bytes(buf[_HEADER.size:]))[1]
        pid = await anyio.to_thread.run_sync(_host_pid, proc.pid, ns_pid)
        cg = await anyio.to_thread.run_sync(_cgroup.host().create, limits)
        if cg is not None:
            await anyio.to_thread.run_sync(_join, cg, pid)
    except BaseException:
        with anyio.CancelScope(shield=True):
            theirs.close()
            mine.close()
            if proc is not None:
                await _end(proc, tree_cg)
            elif tree_cg is not None:
                await anyio.to_thread.run_sync(tree_cg.remove)
            await anyio.to_thread.run_sync(_rmtree, tmp)
        raise
    if not _SETPRIV:
        log.warning("limits_not_enforced", limits=["caps"], what="session")
    session = Session(branch, tree, stream, pid, ns_pid, cg, limits)
    log.info("session_started", branch=branch.name, pid=pid)
    return session


def _start_failed(tail: str, where: Path) -> None:
    if ISOLATION_MARKER in tail:
        raise IsolationUnavailable(
            f"could not set up the session's sandbox at {where}: {tail[-2000:]}")
    raise ProcessKilled(f"the session's interpreter did not start: {tail[-2000:]}")


async def _end(proc: anyio.abc.Process, cg: _cgroup.RunCgroup | None) -> None:
    with anyio.CancelScope(shield=True):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if cg is not None:
            await anyio.to_thread.run_sync(cg.kill)
        await proc.wait()
        await proc.aclose()
        if cg is not None:
            await anyio.to_thread.run_sync(cg.remove)

