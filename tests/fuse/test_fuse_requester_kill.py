"""Requesters SIGKILLed mid-request never stall the filesystem process.

When a process is killed while its FUSE request waits in the kernel's queue, the
kernel withdraws the request. If the filesystem process had already been told the
device was readable, its read then waits for the next request, and nothing else
runs in its one thread meanwhile: the control socket goes unanswered, and an
abort of the busy branch (which kills its processes) hangs the agent.

Here a forking "factory" process runs rounds: a few children hammer one branch with
every kind of operation, then all of them are SIGKILLed at a random instant, and
the test immediately asks the server for an answer (ping, fork, abort) with a
bound. Control requests also keep flowing while the children run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import anyio
import pytest

import branchagent as ba
from _support import requires_fuse, tree_state
from branchagent._backends.fuse import FuseBackend

pytestmark = [pytest.mark.anyio, requires_fuse]

#: Every control request must be answered within this many seconds (the watchdog
#: unblocks a stuck read after 0.25 s; the rest is headroom for a loaded machine).
BOUND = 5.0
ROUNDS = int(os.environ.get("BRANCHAGENT_KILL_ROUNDS", "1000"))

# The factory: reads a line ("go <seed>") per round from stdin, forks CHILDREN
# requesters into the branch, SIGKILLs them all after a random 0-6 ms, reaps them,
# and answers with a line of JSON. Each child loops over one operation kind.
FACTORY = textwrap.dedent(r'''
    import json, os, random, signal, sys, time

    root = sys.argv[1]
    children = int(sys.argv[2])
    KINDS = ["stat", "read", "listdir", "write", "create_unlink", "mkdir_rmdir", "rename",
             "chmod", "symlink", "truncate", "fsync", "xattr", "link", "big_write",
             "walk", "utime"]

    def op(kind, me, i):
        p = os.path.join(root, f"f{i % 8}")
        mine = os.path.join(root, f"c{me}-{i}")
        if kind == "stat":
            os.stat(p); os.lstat(os.path.join(root, "nope-%d" % i)) if i % 2 else None
        elif kind == "read":
            with open(p, "rb") as f: f.read()
        elif kind == "listdir":
            os.listdir(root); os.listdir(os.path.join(root, "d"))
        elif kind == "write":
            with open(p, "r+b") as f: f.write(b"x" * 4096)
        elif kind == "create_unlink":
            with open(mine, "wb") as f: f.write(b"y")
            os.unlink(mine)
        elif kind == "mkdir_rmdir":
            os.mkdir(mine); os.rmdir(mine)
        elif kind == "rename":
            with open(mine, "wb"): pass
            os.rename(mine, mine + ".r"); os.unlink(mine + ".r")
        elif kind == "chmod":
            os.chmod(p, 0o644 if i % 2 else 0o600)
        elif kind == "symlink":
            os.symlink("f0", mine); os.readlink(mine); os.unlink(mine)
        elif kind == "truncate":
            os.truncate(p, 4096 * (i % 4))
        elif kind == "fsync":
            fd = os.open(p, os.O_RDWR)
            try: os.write(fd, b"z"); os.fsync(fd)
            finally: os.close(fd)
        elif kind == "xattr":
            try: os.listxattr(p); os.getxattr(p, "user.x")
            except OSError: pass
        elif kind == "link":
            os.link(p, mine); os.unlink(mine)
        elif kind == "big_write":
            with open(mine, "wb") as f: f.write(os.urandom(1 << 20))
            os.unlink(mine)
        elif kind == "walk":
            for _ in os.walk(root): pass
        elif kind == "utime":
            os.utime(p)

    def child(kind, me):
        i = 0
        while True:
            try:
                op(kind, me, i)
            except OSError:
                pass
            i += 1

    serial = 0
    for line in sys.stdin:
        rng = random.Random(line)
        pids = []
        for _ in range(children):
            serial += 1
            kind = rng.choice(KINDS)
            pid = os.fork()
            if pid == 0:
                try:
                    child(kind, serial)
                finally:
                    os._exit(0)
            pids.append((pid, kind))
        time.sleep(rng.uniform(0, 0.006))
        for pid, _ in pids:
            os.kill(pid, signal.SIGKILL)
        for pid, _ in pids:
            os.waitpid(pid, 0)
        print(json.dumps([k for _, k in pids]), flush=True)
''')


def _seed_tree(root: Path) -> None:
    (root / "d").mkdir(exist_ok=True)
    for i in range(8):
        (root / f"f{i}").write_bytes(os.urandom(16384))
        (root / "d" / f"g{i}").write_text(str(i))


@pytest.fixture
def anyio_backend() -> str:
    return "trio"  # one event loop is enough: the filesystem process is the subject


async def test_killed_requesters_never_stall_control_requests(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    _seed_tree(repo)
    before = tree_state(repo)
    backend = FuseBackend()
    latencies: list[float] = []
    kinds_killed: dict[str, int] = {}
    async with ba.open_workspace(repo, backend=backend, state_dir=tmp_path / "state") as ws:
        branch = await ws.fork("busy")
        factory = await anyio.open_process(
            [sys.executable, "-c", FACTORY, os.fspath(branch.path), "3"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None)
        assert factory.stdin is not None
        assert factory.stdout is not None
        done = anyio.Event()

        async def ping(what: str) -> None:
            try:
                latencies.append(await backend.ping(BOUND))
            except ba.BackendError as exc:
                # Free everything blocked on the stuck mount, so the test fails, not hangs.
                if backend.server_pid is not None:
                    os.kill(backend.server_pid, signal.SIGKILL)
                pytest.fail(f"{what}: {exc} (after {len(latencies)} answered requests)")

        async def keep_asking() -> None:
            n = 0
            while not done.is_set():
                await ping("control request while requesters run")
                n += 1
                if n % 25 == 0:  # real work too: a fork and an abort of a sibling
                    started = time.perf_counter()
                    other = await ws.fork()
                    await other.abort()
                    latencies.append(time.perf_counter() - started)
                await anyio.sleep(0.003)

        buf = b""
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(keep_asking)
                for r in range(ROUNDS):
                    await factory.stdin.send(f"go {r}\n".encode())
                    while b"\n" not in buf:
                        with anyio.fail_after(60):
                            buf += await factory.stdout.receive()
                    line, buf = buf.split(b"\n", 1)
                    for kind in json.loads(line):
                        kinds_killed[kind] = kinds_killed.get(kind, 0) + 1
                    await ping(f"control request right after the kills of round {r}")
                done.set()
        finally:
            with anyio.CancelScope(shield=True):
                await factory.stdin.aclose()
                with anyio.move_on_after(10):
                    await factory.wait()
                if factory.returncode is None:
                    factory.kill()
                    await factory.wait()
        # The busy branch is still fully usable: an abort is answered too.
        await ping("control request after the last round")
        await branch.abort()
        assert tree_state(repo) == before, "the base changed behind an aborted branch"
    kills = sum(kinds_killed.values())
    assert kills == 3 * ROUNDS
    assert len(kinds_killed) >= 12, f"too few operation kinds exercised: {kinds_killed}"
    assert max(latencies) < BOUND, max(latencies)
    latencies.sort()
    print(f"{kills} requesters killed over {ROUNDS} rounds; {len(latencies)} control requests, "
          f"median {latencies[len(latencies) // 2] * 1e3:.2f} ms, max {latencies[-1] * 1e3:.1f} ms")
