"""Helper: ``python -I -S _rehome.py PID VIEW WS``: put VIEW over WS for the session PID
(or ``_rehome.py --serve FD``: the same for each request on the socket FD, see
:func:`serve`).

Run by :meth:`branchagent._session.Session._rehome` once the session's branch is
committed: the session follows its files into the parent. This process (started by
the agent, so it holds the agent's credentials) enters the session's user namespace
(the agent's user owns it, so it holds every capability there) and its mount
namespace, then swaps the view at WS: VIEW (the new branch, as seen under the
state directory's stand-in ``<state>/views``) is cloned and mounted *beneath* the
mount now at WS (``move_mount(MOVE_MOUNT_BENEATH)``, Linux 6.5), and the old one is
detached, so WS shows the old view or the new one at every instant, never what lies
under both. Where mounting beneath is not supported, VIEW is bound on top (the old
view stays covered until the session ends).

It prints ``beneath`` or ``stacked``, then the session's working directory as the
session's namespace names it (read before the swap), and exits 0; on failure, a
message on stderr and exit 1. Standard library only (``-I -S``: nothing imported from
the agent's environment); one thread, as ``setns`` into a user namespace requires.
"""

import ctypes
import errno
import os
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
MS_BIND = 4096
MS_REC = 16384
MNT_DETACH = 2
AT_FDCWD = -100
AT_RECURSIVE = 0x8000
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOVE_MOUNT_BENEATH = 0x200
# open_tree and move_mount have the same numbers on every architecture (the common
# syscall table from Linux 5.2 on): 428 and 429.
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _fail(what: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}")


def enter(pid: str) -> int:
    """Join the user and mount namespaces of ``pid``; a descriptor of its ``/proc``
    directory, opened before (``/proc`` there is its PID namespace's)."""
    proc = os.open(f"/proc/{pid}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    user = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    mnt = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    other = os.fstat(user).st_ino != os.stat("/proc/self/ns/user").st_ino  # else EINVAL
    if other and _libc.setns(user, CLONE_NEWUSER) != 0:
        raise _fail("setns(user)")
    if _libc.setns(mnt, CLONE_NEWNS) != 0:
        raise _fail("setns(mount)")
    return proc


def swap(view: str, ws: str) -> str:
    """``view`` at ``ws`` in place of what is there; how it was done."""
    fd = _libc.syscall(SYS_OPEN_TREE, AT_FDCWD, view.encode(),
                       OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_RECURSIVE)
    if fd >= 0:
        try:
            rc = _libc.syscall(SYS_MOVE_MOUNT, int(fd), b"", AT_FDCWD, ws.encode(),
                               MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_BENEATH)
            if rc == 0:
                if _libc.umount2(ws.encode(), MNT_DETACH) != 0:
                    raise _fail(f"detach the old view at {ws}")
                return "beneath"
            if ctypes.get_errno() not in (errno.EINVAL, errno.ENOSYS):
                raise _fail(f"move_mount({view} beneath {ws})")
        finally:
            os.close(int(fd))
    elif ctypes.get_errno() != errno.ENOSYS:
        raise _fail(f"open_tree({view})")
    if _libc.mount(view.encode(), ws.encode(), None, MS_BIND | MS_REC, None) != 0:
        raise _fail(f"bind {view} over {ws}")
    return "stacked"


def move(pid: str, view: str, ws: str) -> tuple[str, str]:
    """Enter ``pid``'s namespaces and swap the view; how, and its working directory."""
    try:
        proc = enter(pid)
        try:
            cwd = os.readlink("cwd", dir_fd=proc)  # named from its namespace's root
        except OSError:
            cwd = ws
        if cwd.endswith(" (deleted)"):  # the copy backend removed the committed directory
            cwd = cwd[: -len(" (deleted)")]
        return swap(view, ws), cwd
    except OSError as exc:
        raise OSError(exc.errno, f"cannot move session {pid} to {view}: "
                                 f"{exc.strerror or exc}") from None


def serve(fd: int) -> int:
    """Serve moves on the socket ``fd``: a JSON line ``[pid, view, ws]`` in, a JSON line
    ``["ok", how, cwd]`` or ``["err", message]`` out. Each move runs in a child of this
    process (``setns`` is for good), so a move costs a fork of this small process, not a
    Python start."""
    import json
    import socket

    sock = socket.socket(fileno=fd)
    reader = sock.makefile("rb")
    for line in reader:
        pid, view, ws = json.loads(line)
        child = os.fork()
        if child == 0:
            try:
                how, cwd = move(str(pid), view, ws)
                reply = json.dumps(["ok", how, cwd])
            except BaseException as exc:
                reply = json.dumps(["err", getattr(exc, "strerror", None) or str(exc)])
            try:
                sock.sendall(reply.encode() + b"\n")
            finally:
                os._exit(0)
        os.waitpid(child, 0)
    return 0


def main(argv: list[str]) -> int:
    if argv[1] == "--serve":
        return serve(int(argv[2]))
    pid, view, ws = argv[1], argv[2], argv[3]
    try:
        how, cwd = move(pid, view, ws)
    except OSError as exc:
        print(exc.strerror or str(exc), file=sys.stderr)
        return 1
    sys.stdout.write(f"{how}\n{cwd}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
