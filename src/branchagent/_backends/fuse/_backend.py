"""The agent side of the FUSE backend: start, talk to and stop the filesystem process."""

from __future__ import annotations

import base64
import contextlib
import fcntl
import importlib.util
import json
import os
import pwd
import re
import shutil
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
from anyio.abc import Process

from ... import _journal
from ..._branch import Change, Usage
from ..._log import get_logger
from ..._protocols import SavedBranches
from ...exceptions import BackendError, BackendUnavailable, BranchNotFound, WorkspaceClosed
from ._protocol import change_from_json, encode, error_from_json

__all__ = ["FuseBackend"]

log = get_logger("branchagent.fuse")

_INSTALL = ("pip install 'branchagent[fuse]' (it builds pyfuse3 against libfuse3: "
            "apt-get install fuse3 libfuse3-dev pkg-config)")


def _user() -> str:
    uid = os.geteuid()
    try:
        return f"{pwd.getpwuid(uid).pw_name!r} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def check_available() -> None:
    """Raise ``BackendUnavailable`` (saying what is missing) unless FUSE can work here."""
    if importlib.util.find_spec("pyfuse3") is None:
        raise BackendUnavailable(f"the FUSE backend needs pyfuse3: {_INSTALL}")
    try:
        st = os.stat("/dev/fuse")
    except OSError:
        raise BackendUnavailable("the FUSE backend needs /dev/fuse, which this machine lacks "
                                 "(modprobe fuse; in a container: --device /dev/fuse); "
                                 "use backend='copy'") from None
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        try:
            owner = pwd.getpwuid(st.st_uid).pw_name
        except KeyError:
            owner = str(st.st_uid)
        raise BackendUnavailable(
            f"/dev/fuse is not accessible to user {_user()} (mode "
            f"{stat.S_IMODE(st.st_mode):04o}, owner {owner}); on most distributions it is "
            "0666: as root, `chmod 0666 /dev/fuse` (a udev rule keeps it), or use "
            "backend='copy'")
    if os.geteuid() != 0:
        exe = shutil.which("fusermount3")
        if exe is None:
            raise BackendUnavailable("the FUSE backend needs fusermount3 to mount as a non-root "
                                     "user (apt-get install fuse3), or use backend='copy'")
        fm = os.stat(exe)
        if fm.st_uid != 0 or not fm.st_mode & stat.S_ISUID:
            raise BackendUnavailable(
                f"{exe} is not setuid root (mode {stat.S_IMODE(fm.st_mode):04o}), so a non-root "
                f"user cannot mount FUSE: as root, `chown root {exe} && chmod u+s {exe}` "
                "(or reinstall fuse3), or use backend='copy'")


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def is_mounted(path: Path) -> bool:
    """Whether ``path`` is a mount point (also a dead FUSE mount, which stat cannot see)."""
    target = os.fspath(path)
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4 and _unescape(fields[4]) == target:
                    return True
    except OSError:
        return os.path.ismount(path)
    return False


def unmount(path: Path) -> None:
    """Detach a FUSE mount, lazily (busy is fine); no error when it is already gone."""
    for argv in (["fusermount3", "-u", "-z", os.fspath(path)], ["umount", "-l", os.fspath(path)]):
        if not is_mounted(path):
            return
        if shutil.which(argv[0]) is None:
            continue
        subprocess.run(argv, check=False, capture_output=True, timeout=30)


def _wait_unlocked(lock: Path, timeout: float) -> None:
    """Wait until no filesystem process holds ``lock`` (a previous one winding down)."""
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise BackendError(
                        f"another FUSE server still holds {lock}; is the workspace served "
                        "by a process that outlived its agent?") from None
                time.sleep(0.05)
                continue
            fcntl.flock(fd, fcntl.LOCK_UN)
            return
    finally:
        os.close(fd)


def read_saved_branches(state_dir: Path) -> dict[str, dict[str, object]]:
    """Branch records of a FUSE store (``<state>/fuse/branches/*/meta.json``), by name."""
    metas = []
    try:
        entries = sorted(os.listdir(state_dir / "fuse" / "branches"))
    except OSError:
        return {}
    for entry in entries:
        try:
            with open(state_dir / "fuse" / "branches" / entry / "meta.json") as f:
                metas.append(json.load(f))
        except (OSError, ValueError):
            continue
    names = {m.get("id"): m.get("name") for m in metas if isinstance(m, dict)}
    out: dict[str, dict[str, object]] = {}
    for m in metas:
        if isinstance(m, dict) and isinstance(m.get("name"), str):
            parent = m.get("parent")
            pname = None if parent is None else names.get(parent, "")  # "": an orphan
            out[m["name"]] = {"parent": pname, "created": m.get("created")}
    return out


async def _send(sock: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = sock.send(view)
        except BlockingIOError:
            await anyio.wait_writable(sock)
            continue
        view = view[n:]


class FuseBackend:
    """Branches as ``@<id>`` directories of one pyfuse3 copy-on-write mount.

    The filesystem runs in its own process (see ``_server``), started by
    :meth:`open` and stopped by :meth:`aclose`; it unmounts by itself when this
    process dies. Forks are O(1) (a new layer); commits into the base go
    through the journal and move files by rename.
    """

    name = "fuse"
    #: Top-level branches show the live base: writes made into it from outside show
    #: through (docs/design.md, "Outside writes"); they are still parent changes at commit.
    isolates_outside_writes = False
    #: The filesystem process records every branch (``saved_branches``) before it answers
    #: a fork, so the workspace need not rewrite ``branches.json`` at each one.
    keeps_branches = True

    def __init__(self, *, start_timeout: float = 60.0, stop_timeout: float = 10.0,
                 server: Sequence[str] | None = None) -> None:
        """``server``, for tests: the command that starts the filesystem process (the
        server's arguments are appended), such as a launcher that installs a fault hook
        and then calls ``branchagent._backends.fuse._server.main``. By default
        ``python -m branchagent._backends.fuse._server``."""
        self._server = list(server) if server is not None else [
            sys.executable, "-m", "branchagent._backends.fuse._server"]
        self._start_timeout = start_timeout
        self._stop_timeout = stop_timeout
        self._root: Path | None = None
        self._state: Path | None = None
        self._mnt: Path | None = None
        self._proc: Process | None = None
        self._stream: socket.socket | None = None  # non-blocking; see _send and _receive
        self._buf = b""
        self._rid = 0
        self._ids: dict[str, int] = {}
        self._lock = anyio.Lock(fast_acquire=True)  # (uncontended: no yield; see _call)
        #: How long the filesystem process spent on the last control request (its critical
        #: section, as the BranchFS paper reports it), in nanoseconds.
        self.last_server_ns: int | None = None

    # -- paths -----------------------------------------------------------------------------

    @property
    def mountpoint(self) -> Path:
        if self._mnt is None:
            raise WorkspaceClosed("the FUSE backend is not open")
        return self._mnt

    @property
    def views_root(self) -> Path:
        """The directory holding every branch's view (sessions bind views from here)."""
        return self.mountpoint

    @property
    def server_pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def _log_path(self) -> Path:
        assert self._state is not None
        return self._state / "fuse" / "server.log"

    def path(self, name: str | None) -> Path:
        if self._root is None:
            raise WorkspaceClosed("the FUSE backend is not open")
        if name is None:
            return self._root
        bid = self._ids.get(name)
        if bid is None:
            raise BranchNotFound(f"no branch named {name!r} in the FUSE backend")
        return self.mountpoint / f"@{bid}"

    def exists(self, name: str) -> bool:
        return name in self._ids

    def saved_branches(self) -> SavedBranches:
        """The branches the filesystem process kept: name -> {parent, created}.

        The server writes each branch's record before it answers a fork (and drops
        broken ones at open), so the workspace does not keep its own copy
        (``branches.json``) up to date.
        """
        if self._state is None:
            raise WorkspaceClosed("the FUSE backend is not open")
        return read_saved_branches(self._state)

    @staticmethod
    def read_saved_branches(state_dir: Path) -> SavedBranches:
        """The same, read from disk while another process serves the workspace."""
        return read_saved_branches(state_dir)

    # -- lifecycle ------------------------------------------------------------------------------

    def _prepare(self, state: Path) -> None:
        fuse_dir = state / "fuse"
        fuse_dir.mkdir(parents=True, exist_ok=True)
        # The server of an agent that died may still be applying a commit (it finishes the
        # request in hand, then sees the socket closed and exits); it holds server.lock
        # until it is gone. Recovering its journal before that would roll back a commit
        # that is still being written.
        _wait_unlocked(fuse_dir / "server.lock", self._start_timeout)
        if is_mounted(fuse_dir / "mnt"):
            log.warning("fuse_stale_mount", path=str(fuse_dir / "mnt"))
            unmount(fuse_dir / "mnt")
        (fuse_dir / "mnt").mkdir(exist_ok=True)
        _journal.recover(state / "journal")

    async def open(self, root: Path, state_dir: Path) -> None:
        check_available()
        if self._proc is not None:
            raise BackendError("this FUSE backend is already open")
        self._root, self._state = root, state_dir
        self._mnt = state_dir / "fuse" / "mnt"
        await anyio.to_thread.run_sync(self._prepare, state_dir)
        log_fd = await anyio.to_thread.run_sync(
            lambda: os.open(self._log_path(), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                            0o600))
        ours, theirs = socket.socketpair()  # (no await between here and the try below)
        try:
            self._proc = await anyio.open_process(
                [*self._server,
                 "--root", os.fspath(root), "--state", os.fspath(state_dir),
                 "--fd", str(theirs.fileno()), "--parent", str(os.getpid())],
                stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd,
                pass_fds=(theirs.fileno(),), start_new_session=True)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
            os.close(log_fd)
        ours.setblocking(False)
        self._stream = ours
        try:
            with anyio.fail_after(self._start_timeout):
                hello = await self._receive()
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await self._stop(graceful=False)
            if isinstance(exc, Exception):
                raise BackendUnavailable(
                    f"the FUSE server did not start: {exc}; its log says:\n{self._log_tail()}"
                ) from exc
            raise
        if not hello.get("ready"):
            with anyio.CancelScope(shield=True):
                await self._stop(graceful=False)
            raise BackendUnavailable(f"unexpected first message from the FUSE server: {hello}")
        self._ids = {str(k): int(v) for k, v in hello.get("branches", {}).items()}
        for name in hello.get("lost", []):
            log.warning("branch_lost", branch=name, reason="its layers are missing or broken")
        log.info("fuse_mounted", mountpoint=str(self._mnt), pid=self._proc.pid,
                 branches=len(self._ids))

    def _log_tail(self) -> str:
        try:
            return self._log_path().read_text(errors="replace")[-4000:]
        except OSError:
            return "(no log)"

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            await self._stop(graceful=True)
        self._ids.clear()
        self._root = self._state = None

    async def _stop(self, *, graceful: bool) -> None:
        proc, stream = self._proc, self._stream
        self._proc = self._stream = None
        if proc is None:
            return
        try:
            if graceful and stream is not None:
                with anyio.move_on_after(self._stop_timeout):
                    with contextlib.suppress(Exception):
                        await _send(stream, encode({"id": 0, "op": "shutdown"}))
                    await proc.wait()
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
                with anyio.move_on_after(self._stop_timeout):
                    await proc.wait()
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        finally:
            if stream is not None:
                anyio.notify_closing(stream)
                stream.close()
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                await proc.aclose()
            if self._mnt is not None:
                mnt = self._mnt
                await anyio.to_thread.run_sync(unmount, mnt)

    # -- requests ---------------------------------------------------------------------------------

    async def _receive(self) -> dict[str, Any]:
        # The raw socket and wait_readable: a request's round trip is most of a fork's
        # cost, and a SocketStream adds about 50-60 us to each.
        sock = self._stream
        assert sock is not None
        while b"\n" not in self._buf:
            try:
                data = sock.recv(1 << 16)
            except BlockingIOError:
                await anyio.wait_readable(sock)
                continue
            except OSError as exc:
                raise BackendError(
                    f"the FUSE server process went away (see {self._log_path()})") from exc
            if not data:
                raise BackendError(f"the FUSE server process went away (see {self._log_path()})")
            self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        return dict(json.loads(line))

    async def _call(self, op: str, **args: Any) -> Any:
        if self._stream is None:
            raise WorkspaceClosed("the FUSE backend is not open")
        async with self._lock:
            with anyio.CancelScope(shield=True):  # never leave an answer unread
                self._rid += 1
                rid = self._rid
                try:
                    await _send(self._stream, encode({"id": rid, "op": op, **args}))
                except OSError as exc:
                    raise BackendError(
                        f"the FUSE server process went away (see {self._log_path()})") from exc
                while True:
                    reply = await self._receive()
                    if reply.get("id") == rid:
                        break
        ns = reply.get("ns")
        self.last_server_ns = ns if isinstance(ns, int) else None
        if "err" in reply:
            raise error_from_json(reply["err"])
        return reply.get("ok")

    async def ping(self, timeout: float) -> float:
        """Seconds the filesystem process took to answer a no-op request.

        Raises ``BackendError`` when no answer came within ``timeout`` (the server is
        stuck or gone). Unlike the other requests, the wait is not shielded: the
        request is a few bytes, so only the wait for its answer can be cut short, and a
        late answer is skipped by the next request (replies are matched by id).
        """
        if self._stream is None:
            raise WorkspaceClosed("the FUSE backend is not open")
        started = time.perf_counter()
        async with self._lock:
            self._rid += 1
            rid = self._rid
            with anyio.CancelScope(shield=True):
                try:
                    await _send(self._stream, encode({"id": rid, "op": "ping"}))
                except OSError as exc:
                    raise BackendError(
                        f"the FUSE server process went away (see {self._log_path()})") from exc
            with anyio.move_on_after(timeout):
                while (await self._receive()).get("id") != rid:
                    pass
                return time.perf_counter() - started
        raise BackendError(f"the FUSE server did not answer a ping within {timeout} s")

    # -- Backend protocol -----------------------------------------------------------------------

    async def create(self, name: str, parent: str | None) -> Path:
        bid = await self._call("create", name=name, parent=parent)
        self._ids[name] = int(bid)
        return self.path(name)

    async def commit(self, name: str) -> list[Change]:
        raw = await self._call("commit", name=name)
        self._ids.pop(name, None)
        return [change_from_json(c) for c in raw]

    async def abort(self, name: str) -> None:
        if self._stream is None:
            self._ids.pop(name, None)
            return
        await self._call("abort", name=name)
        self._ids.pop(name, None)

    async def abort_many(self, names: Sequence[str]) -> None:
        """One request for all of ``names`` (the losers of a commit, a subtree)."""
        if not names:
            return
        if self._stream is not None:
            await self._call("abort_many", names=list(names))
        for name in names:
            self._ids.pop(name, None)

    async def changes(self, name: str, parent: str | None) -> list[Change]:
        raw = await self._call("changes", name=name, parent=parent)
        return [change_from_json(c) for c in raw]

    async def old_content(self, name: str, parent: str | None, path: str) -> bytes | None:
        raw = await self._call("old_content", name=name, parent=parent, path=path)
        return None if raw is None else base64.b64decode(raw)


    async def usage(self, name: str) -> Usage:
        raw = await self._call("usage", name=name)
        limit = raw.get("disk_limit")
        return Usage(bytes=int(raw["bytes"]), files=int(raw["files"]),
                     disk_limit=None if limit is None else int(limit))

    async def set_disk_limit(self, name: str, limit: int | None) -> str | None:
        """Enforced in the filesystem process: writes past it fail with EDQUOT."""
        await self._call("set_disk_limit", name=name, limit=limit)
        return "fuse"

    #: How this backend enforces disk limits (``Backend.set_disk_limit``): in the filesystem.
    disk_limits: str | None = "fuse"
