"""Child side of a forkable session: ``python _session_child.py SOCK_FD WS_PATH``.

Run by :mod:`branchagent._session` inside the branch's sandbox (mount and PID
namespaces, the branch bound over the workspace path, cgroups). It answers
requests on the Unix socket SOCK_FD, one at a time, each an 8-byte length and
a pickle (see :func:`send` / :func:`recv`)::

    ("exec", code)          -> ("ok", None)
    ("eval", expr)          -> ("ok", value)
    ("call", fn, args, kw)  -> ("ok", fn(*args, **kw))
    ("fork", view)          -> the child's socket end (SCM_RIGHTS) + ("ok", child_ns_pid)
    ("chdir", path)         -> ("ok", the directory now current): after the session moved
                               to its committed branch's parent, ``path`` again (WS_PATH
                               if it is gone there)
    ("close",)              -> ("ok", None), then exit

Errors come back as ``("err", exc, traceback)`` or ``("err_raw", type, msg, tb)``
(the same shapes as an isolated call, :mod:`._child`).

A fork: ``os.fork()``; the new process makes a user namespace of its own (no
capability is needed for that, and it holds every capability over it), with a
fresh copy of the mount namespace, binds ``view`` (the child branch as seen
under the state directory's stand-in, ``<state>/views``) over WS_PATH, goes
back to its working directory (now in the child branch), and drops every
capability again. Its memory is the parent's, page for page (copy-on-write).

PID 1 of the session's PID namespace is a reaper (the first process forks the
interpreter and waits); so a session whose parent session closed keeps running,
and the namespace ends when the last session of the tree has exited.
"""

from __future__ import annotations

import ctypes
import errno
import os
import pickle
import socket
import struct
import sys
import threading
import traceback
from typing import Any

import cloudpickle  # type: ignore[import-untyped]

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _child import dumps  # type: ignore[import-not-found]

del sys.path[0]

_HEADER = struct.Struct(">Q")
CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
PR_CAPBSET_DROP = 24
CAP_SETFCAP = 31
PR_SET_NO_NEW_PRIVS = 38
_libc = ctypes.CDLL(None, use_errno=True)


def send(sock: socket.socket, obj: Any) -> None:
    data = dumps(obj)
    sock.sendall(_HEADER.pack(len(data)) + data)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise EOFError("the other side closed the session's socket")
        buf += chunk
    return bytes(buf)


def recv(sock: socket.socket) -> Any:
    (n,) = _HEADER.unpack(_recv_exactly(sock, _HEADER.size))
    return cloudpickle.loads(_recv_exactly(sock, n))


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _drop_caps() -> None:
    """Every capability dropped but CAP_SETFCAP, and none to be gained by exec (what
    setpriv did at the start). CAP_SETFCAP is what mapping our user in the next fork's
    user namespace takes (Linux 5.12 and later); it grants nothing over mounts."""
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    for cap in range(last + 1):
        if cap != CAP_SETFCAP:
            _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
    keep = 1 << CAP_SETFCAP
    data = (ctypes.c_uint32 * 6)(keep, keep, 0, 0, 0, 0)  # effective, permitted, inheritable
    _check(_libc.capset(header, data), "capset")


def enter_view(view: str, ws: str) -> None:
    """See ``view`` at ``ws`` from now on, in a mount namespace of our own."""
    cwd = os.getcwd()
    uid, gid = os.geteuid(), os.getegid()
    if _libc.unshare(CLONE_NEWUSER | CLONE_NEWNS) != 0:
        err = ctypes.get_errno()
        if err == errno.ENOSPC:  # user.max_user_namespaces, or the nesting limit
            raise OSError(err, "unshare(user, mount): no user namespace left: Linux nests "
                          "at most 32 (each fork of a session is one level deeper, so a "
                          "session forks about 32 levels deep) and user.max_user_namespaces "
                          "caps them all; fork a shallower session instead")
        raise OSError(err, f"unshare(user, mount): {os.strerror(err)}")
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"{uid} {uid} 1")
    _write("/proc/self/gid_map", f"{gid} {gid} 1")
    _check(_libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "mount(private)")
    _check(_libc.mount(view.encode(), ws.encode(), None, MS_BIND | MS_REC, None),
           f"bind {view} over {ws}")
    _drop_caps()
    try:
        os.chdir(cwd)  # the same path, now in the new view
    except OSError:
        os.chdir(ws)


def _our_children(known: set[int]) -> list[int]:
    out: list[int] = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/children") as f:
                out.extend(int(p) for p in f.read().split())
        except OSError:
            pass
    return [p for p in out if p not in known]


def fork_problems(sock: socket.socket, known: set[int]) -> list[str]:
    """What a fork would share or lose silently: threads, child processes, open files."""
    problems = []
    threads = threading.enumerate()
    n_tasks = len(os.listdir("/proc/self/task"))
    if len(threads) > 1 or n_tasks > 1:
        names = [t.name for t in threads if t is not threading.main_thread()]
        problems.append(f"{n_tasks - 1} other thread(s) running {names}: a fork copies only "
                        "the calling thread; join them first")
    kids = _our_children(known)
    if kids:
        problems.append(f"child process(es) {kids} (PIDs in the session's namespace): a fork "
                        "does not copy them; wait for them or kill them first")
    ours = {0, 1, 2, sock.fileno()}
    files = []
    for fd in sorted(int(x) for x in os.listdir("/proc/self/fd")):
        if fd in ours:
            continue
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # the descriptor listdir itself used
        files.append(f"{fd} -> {target}")
    if files:
        problems.append(f"open file descriptor(s) {files}: the child would share them with "
                        "this session (a file stays in this session's branch); close them "
                        "first")
    return problems


def _reply_error(sock: socket.socket, exc: BaseException) -> None:
    tb = "".join(traceback.format_exception(exc))
    try:
        data: tuple[Any, ...] = ("err", exc, tb)
        dumps(data)
    except Exception:
        data = ("err_raw", f"{type(exc).__module__}.{type(exc).__qualname__}", str(exc), tb)
    send(sock, data)


def _fork(sock: socket.socket, ws: str, ns: dict[str, Any], forks: set[int],
          view: str) -> int:
    """Fork this interpreter into ``view``; the new process serves its own socket, whose
    other end goes to the parent (SCM_RIGHTS) before this one's reply."""
    problems = fork_problems(sock, forks)
    if problems:
        raise RuntimeError("cannot fork this session: " + "; ".join(problems))
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:  # the child session: never returns into the parent's loop
        rc = 1
        try:
            sock.close()
            mine.close()
            try:
                enter_view(view, ws)
            except BaseException as exc:
                _reply_error(theirs, exc)
                raise
            send(theirs, ("ok", os.getpid()))
            rc = serve(theirs, ws, ns)
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(rc)
    forks.add(pid)
    theirs.close()
    socket.send_fds(sock, [b"F"], [mine.fileno()])
    mine.close()
    return pid


def _handle(req: tuple[Any, ...], sock: socket.socket, ws: str, ns: dict[str, Any],
            forks: set[int]) -> Any:
    op = req[0]
    if op == "exec":
        exec(compile(req[1], "<session>", "exec"), ns)
        return None
    if op == "eval":
        return eval(compile(req[1], "<session>", "eval"), ns)
    if op == "call":
        return req[1](*req[2], **req[3])
    if op == "fork":
        return _fork(sock, ws, ns, forks, req[1])
    if op == "chdir":
        try:
            os.chdir(req[1])
        except OSError:
            os.chdir(ws)
        return os.getcwd()
    raise ValueError(f"unknown session request {op!r}")


def serve(sock: socket.socket, ws: str, ns: dict[str, Any]) -> int:
    forks: set[int] = set()
    while True:
        for pid in list(forks):  # reap forks that ended (they are our children)
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                forks.discard(pid)
        try:
            req = recv(sock)
        except EOFError:
            return 0
        if req[0] == "close":
            send(sock, ("ok", None))
            return 0
        try:
            value = _handle(req, sock, ws, ns, forks)
        except BaseException as exc:
            _reply_error(sock, exc)
            continue
        try:
            data = dumps(("ok", value))
        except Exception as exc:
            data = dumps(("err_raw", "TypeError",
                          f"the result {type(value).__name__} cannot be pickled: {exc}", ""))
        sock.sendall(_HEADER.pack(len(data)) + data)


def main(argv: list[str]) -> int:
    fd, ws = int(argv[1]), argv[2]
    if os.getpid() == 1:  # PID 1 of the namespace: stay as the reaper, serve in a child
        pid = os.fork()
        if pid != 0:
            os.close(fd)
            while True:
                try:
                    os.wait()
                except ChildProcessError:
                    return 0
                except InterruptedError:
                    continue
    sock = socket.socket(fileno=fd)
    (n,) = _HEADER.unpack(_recv_exactly(sock, _HEADER.size))
    for entry in pickle.loads(_recv_exactly(sock, n)):  # the caller's sys.path, first and
        if entry not in sys.path:                        # alone: its modules import here
            sys.path.append(entry)
    send(sock, ("ok", os.getpid()))
    return serve(sock, ws, {"__name__": "__session__", "__builtins__": __builtins__})


if __name__ == "__main__":
    sys.exit(main(sys.argv))
