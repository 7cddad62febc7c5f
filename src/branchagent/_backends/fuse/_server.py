"""The filesystem process: ``python -m branchagent._backends.fuse._server``.

Started by :class:`FuseBackend` with one end of a Unix socket pair as
``--fd``. It mounts ``<state>/fuse/mnt``, serves it with pyfuse3 under trio
(one OS thread), answers control requests on the socket (see ._protocol),
and unmounts and exits when any of these happens: a ``shutdown`` request,
the socket closing (the agent died: the kernel closed its end), its parent
process changing (same reason, seen another way), SIGTERM/SIGINT/SIGHUP, or
an outside ``fusermount3 -u``. It never leaves a dead mount behind unless it
is killed with SIGKILL; the next open then finds and clears that mount.
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import json
import logging
import os
import signal
import socket
import sys
import time
from typing import Any

import pyfuse3
import trio

from ._fs import BranchFS
from ._protocol import change_to_json, encode, error_to_json
from ._store import Store

log = logging.getLogger("branchagent.fuse")


def _dispatch(store: Store, req: dict[str, Any]) -> object:
    op = req.get("op")
    if op == "create":
        return store.create(str(req["name"]), req.get("parent"))
    if op == "abort":
        store.abort(str(req["name"]))
        return None
    if op == "abort_many":
        store.abort(*(str(n) for n in req["names"]))
        return None
    if op == "changes":
        return [change_to_json(c) for c in store.changes(str(req["name"]), req.get("parent"))]
    if op == "old_content":
        data = store.old_content(str(req["name"]), req.get("parent"), str(req["path"]))
        return None if data is None else base64.b64encode(data).decode()
    if op == "usage":
        return store.usage(str(req["name"]))
    if op == "set_disk_limit":
        limit = req.get("limit")
        store.set_disk_limit(str(req["name"]), None if limit is None else int(limit))
        return None
    if op == "list":
        return dict(store.by_name)
    if op == "ping":
        return "pong"
    raise ValueError(f"unknown request {op!r}")


async def _commit(store: Store, fs: BranchFS, req: dict[str, Any]) -> object:
    """A commit whose heavy part runs in a worker thread: requests for the branch and its
    parent wait for it, every other branch is served meanwhile."""
    job = store.commit_prepare(str(req["name"]))
    if not job.heavy:  # a few small files: less work than the hop to a thread
        store.commit_work(job)
        changes = store.commit_finish(job)
    else:
        async with fs.busy(job.busy):
            await trio.to_thread.run_sync(store.commit_work, job)
            changes = store.commit_finish(job)
    return [change_to_json(c) for c in changes]


async def _control(stream: trio.SocketStream, store: Store, fs: BranchFS) -> None:
    """Answer requests until the agent says shutdown or goes away."""
    buf = b""
    while True:
        try:
            data = await stream.receive_some(1 << 16)
        except trio.BrokenResourceError:
            data = b""
        if not data:
            log.info("control socket closed: the agent is gone")
            return
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            try:
                req = json.loads(line)
                rid = req.get("id")
            except ValueError as exc:
                await stream.send_all(encode({"id": None, "err": error_to_json(exc)}))
                continue
            if req.get("op") == "shutdown":
                await stream.send_all(encode({"id": rid, "ok": None}))
                return
            started = time.perf_counter_ns()
            try:
                if req.get("op") == "commit":
                    result = await _commit(store, fs, req)
                else:
                    result = _dispatch(store, req)
            except Exception as exc:
                if not isinstance(exc, (OSError, LookupError, ValueError)) and not type(
                    exc
                ).__module__.startswith("branchagent"):
                    log.exception("control request %r failed", req.get("op"))
                reply = {"id": rid, "err": error_to_json(exc)}
            else:
                reply = {"id": rid, "ok": result}
            await fs.flush_invalidations()  # the kernel forgot what changed before we answer
            reply["ns"] = time.perf_counter_ns() - started  # the in-server critical section
            try:
                await stream.send_all(encode(reply))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return


async def _watch_parent(ppid: int, scope: trio.CancelScope) -> None:
    """Backup for the socket: a forked child of the agent may hold its end open."""
    while os.getppid() == ppid:  # noqa: ASYNC110 - polling the kernel: no event to wait on
        await trio.sleep(0.5)
    log.info("parent %d is gone", ppid)
    scope.cancel()


async def _signals(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as it:
        async for signum in it:
            log.info("signal %d: unmounting", signum)
            scope.cancel()
            return


async def _watch_base(store: Store, fs: BranchFS) -> None:
    """Invalidate what outside writes into the base change in top-level branches."""
    while not store.watch.broken:
        await trio.lowlevel.wait_readable(store.watch.fd)
        store.watch.read()
        await fs.flush_invalidations()


# How long the event loop may stay inside one blocking call before SIGALRM interrupts it.
STALL_LIMIT = 0.25
_REARM_EVERY = 0.05


def _interrupted(_signum: int, _frame: object) -> None:
    """SIGALRM's handler: nothing to do; the point is the EINTR it gives a blocked read."""


async def _watchdog() -> None:
    """Keep the loop from staying blocked in ``read()`` on /dev/fuse.

    pyfuse3 waits until the FUSE fd is readable, then reads it with a blocking call.
    When the kernel withdraws the request in between (its process was SIGKILLed), the
    read waits for the next request, and with it the whole loop, control socket
    included. A one-shot ``ITIMER_REAL`` is pushed into the future every
    ``_REARM_EVERY`` seconds from the loop: it fires only when the loop has not run for
    ``STALL_LIMIT``, and its SIGALRM (installed without SA_RESTART) turns the stuck
    read into EINTR, on which pyfuse3 goes back to waiting. Python retries its own
    interrupted calls (PEP 475), so a long synchronous step elsewhere only loses a
    few microseconds to it.
    """
    signal.signal(signal.SIGALRM, _interrupted)
    signal.siginterrupt(signal.SIGALRM, True)
    try:
        while True:
            signal.setitimer(signal.ITIMER_REAL, STALL_LIMIT)
            await trio.sleep(_REARM_EVERY)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


async def _serve_fuse(scope: trio.CancelScope) -> None:
    await pyfuse3.main()
    log.info("unmounted from outside")
    scope.cancel()


async def serve(root: str, state: str, fd: int, ppid: int) -> None:
    store = Store(root, state)
    lock_fd = os.open(os.path.join(store.dir, "server.lock"),
                      os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(lock_fd, fcntl.LOCK_EX)
    sock = socket.socket(fileno=fd)
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
    lost = store.load()
    fs = BranchFS(store)
    mnt = os.path.join(store.dir, "mnt")
    options = set(pyfuse3.default_options) | {"fsname=branchagent", "subtype=branchagent"}
    # As a user, fusermount3 refuses allow_other unless fuse.conf says user_allow_other.
    try:
        with open("/etc/fuse.conf") as conf:  # noqa: ASYNC230 - start-up, nothing served yet
            user_allow_other = any(ln.strip() == "user_allow_other" for ln in conf)
    except OSError:
        user_allow_other = False
    if os.geteuid() == 0 or user_allow_other:  # without it, only the mounting user (also in
        options.add("allow_other")               # its own user namespaces) reaches the mount
    pyfuse3.init(fs, mnt, options)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watchdog)
            nursery.start_soon(_serve_fuse, nursery.cancel_scope)
            nursery.start_soon(_watch_parent, ppid, nursery.cancel_scope)
            nursery.start_soon(_signals, nursery.cancel_scope)
            await trio.lowlevel.checkpoint()
            await stream.send_all(encode({"ready": True, "branches": dict(store.by_name),
                                          "lost": lost, "pid": os.getpid()}))
            if not store.watch.broken:
                nursery.start_soon(_watch_base, store, fs)
            await _control(stream, store, fs)
            nursery.cancel_scope.cancel()
    finally:
        store.watch.close()
        pyfuse3.close(unmount=True)
        fs.close()
        store.close()
        sock.close()
        os.close(lock_fd)
        log.info("unmounted %s", mnt)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="branchagent-fuse")
    parser.add_argument("--root", required=True)
    parser.add_argument("--state", required=True)
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s fuse[%(process)d] %(levelname)s %(message)s")
    os.umask(0)
    trio.run(serve, args.root, args.state, args.fd, args.parent)


if __name__ == "__main__":
    main()
