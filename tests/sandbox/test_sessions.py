"""Forkable Python sessions (``branch.session()``): real interpreters in real namespaces
and cgroups, over the real backends.

Each test checks that nothing outlives it: no process whose command line names the
workspace (the session's sandbox carries the workspace path in its argv) and no
run cgroup left behind.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest

import branchagent as ba
from _support import processes_with, snapshot
from branchagent._sandbox import _cgroup
from branchagent._sandbox._run import isolation_available

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(not isolation_available(),
                       reason="sessions need private mount and PID namespaces "
                              "(unshare --mount --pid): not permitted here"),
]

NO_CGROUPS = _cgroup.CgroupHost(None, frozenset(), False, {})


def run_cgroups() -> list[Path]:
    h = _cgroup.detect()
    parents = [*([h.v2] if h.v2 is not None else []), *h.v1.values()]
    return [d for p in parents if p.is_dir() for d in p.iterdir() if d.name.startswith("run-")]


@asynccontextmanager
async def workspace(repo: Path, backend: str, within: float = 60) -> AsyncIterator[ba.Workspace]:
    with anyio.fail_after(within):
        async with ba.open_workspace(repo, backend=backend) as ws:
            yield ws
    assert processes_with(str(repo)) == [], "a session process outlived its workspace"
    assert run_cgroups() == [], "a session's cgroup was left behind"


def has_cgroup(controller: str) -> bool:
    h = _cgroup.host()
    return controller in h.v2_controllers or controller in h.v1


def require_cgroup(controller: str) -> None:
    if not has_cgroup(controller):
        pytest.skip(f"no cgroup {controller} controller here (neither cgroup v2 "
                    f"{controller}.max nor v1 {controller}); the fallback test covers "
                    "this host")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except OSError:
        return False


async def gone(pid: int, within: float = 5) -> bool:
    deadline = anyio.current_time() + within
    while _alive(pid):  # another process: nothing to wait on but /proc
        if anyio.current_time() > deadline:
            return False
        await anyio.sleep(0.02)
    return True


# -- exec / eval / call / close ---------------------------------------------------------


def add(a: int, b: int) -> int:
    return a + b


async def test_exec_eval_call_close(repo: Path, backend_name: str) -> None:
    async with workspace(repo, backend_name) as ws:
        b = await ws.fork()
        s = await b.session()
        assert s.branch is b
        await s.exec("import os\nrows = [{'a': i} for i in range(5)]")
        assert await s.eval("sum(r['a'] for r in rows)") == 10
        assert await s.call(add, 2, b=3) == 5
        # It sees the branch at the workspace's own path, and its writes land in the branch.
        assert await s.eval("os.getcwd()") == str(repo)
        assert await s.eval("open('README.md').read()") == "# demo\n"
        await s.exec(f"open({str(repo / 'new.txt')!r}, 'w').write('from the session')")
        assert (b.path / "new.txt").read_text() == "from the session"
        assert not (repo / "new.txt").exists()
        pid = s.pid
        await s.close()
        await s.close()  # idempotent
        assert s.closed
        assert await gone(pid)
        with pytest.raises(ba.SessionClosed, match="closed"):
            await s.exec("x = 1")
        await b.commit()
    assert (repo / "new.txt").read_text() == "from the session"


async def test_errors_come_back_as_themselves(repo: Path) -> None:
    async with workspace(repo, "copy") as ws:
        b = await ws.fork()
        s = await b.session()
        with pytest.raises(ZeroDivisionError) as info:
            await s.eval("1 / 0")
        assert any("raised in session" in n for n in info.value.__notes__)
        with pytest.raises(SyntaxError):
            await s.exec("def (")
        # An unpicklable result: a clear error, and the session goes on.
        with pytest.raises(ba.RemoteError, match="cannot be pickled"):
            await s.eval("(lambda: (yield))()")
        assert await s.eval("1 + 1") == 2
        with pytest.raises(TypeError, match="str"):
            await s.exec(b"x = 1")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="callable"):
            await s.call(42)  # type: ignore[arg-type]
        await s.close()


async def test_session_on_a_closed_branch_is_refused(repo: Path) -> None:
    async with workspace(repo, "copy") as ws:
        b = await ws.fork()
        await b.abort()
        with pytest.raises(ba.BranchClosed):
            await b.session()
        assert processes_with(str(repo)) == []


# -- fork -----------------------------------------------------------------------------


async def test_fork_copies_memory_and_isolates_both_ways(repo: Path, forking_backend: str) -> None:
    async with workspace(repo, forking_backend) as ws:
        b = await ws.fork()
        s = await b.session()
        await s.exec("import os\nbig = list(range(100_000))\nstate = {'n': 1}\n"
                     "open('shared.txt', 'w').write('before')")
        c = await s.fork()
        assert c.branch.parent is b
        assert c.pid != s.pid
        # An exact copy of memory at the fork...
        assert await c.eval("state") == {"n": 1}
        assert await c.eval("len(big), big[-1]") == (100_000, 99_999)
        assert await c.eval("os.getcwd()") == str(repo)
        assert await c.eval("open('shared.txt').read()") == "before"
        # ...and from then on, neither side's writes reach the other.
        await c.exec("state['n'] = 2\nopen('shared.txt', 'w').write('child')\n"
                     f"open({str(repo / 'child_only')!r}, 'w').write('c')")
        await s.exec("state['n'] = 3\nopen('shared.txt', 'w').write('parent')")
        assert await c.eval("state['n']") == 2
        assert await s.eval("state['n']") == 3
        assert await c.eval("open('shared.txt').read()") == "child"
        assert await s.eval("open('shared.txt').read()") == "parent"
        assert await s.eval("os.path.exists('child_only')") is False
        assert (c.branch.path / "shared.txt").read_text() == "child"
        assert (b.path / "shared.txt").read_text() == "parent"
        # Nested forks, each with its own value.
        g = await c.fork()
        await g.exec("state['n'] = 4")
        assert [await x.eval("state['n']") for x in (s, c, g)] == [3, 2, 4]
        assert g.branch.parent is c.branch
    assert not (repo / "shared.txt").exists()


async def test_overlay_refuses_to_fork_a_session(repo: Path) -> None:
    """On the overlay backend a session works, and its fork is refused with a clear error
    that changes nothing (no child branch, the session goes on)."""
    from branchagent._backends.overlay import check_available
    from branchagent.exceptions import BackendUnavailable

    try:
        check_available()
    except BackendUnavailable as exc:
        pytest.skip(str(exc))
    async with workspace(repo, "overlay") as ws:
        b = await ws.fork()
        s = await b.session()
        await s.exec("x = 41\nopen('f.txt', 'w').write('in b')")
        with pytest.raises(ba.SessionForkError, match="cannot fork on the 'overlay' backend"):
            await s.fork()
        assert ws.branches() == [b]
        assert await s.eval("x + 1") == 42
        assert (b.path / "f.txt").read_text() == "in b"
        child = await b.fork()
        with pytest.raises(ba.SessionForkError, match="backend='fuse' or 'copy'"):
            await child.session(fork_of=s)
        assert await s.eval("x") == 41
        # Nor does a session follow a commit there: it ends, saying why; the commit stands.
        await b.commit()
        assert s.closed
        with pytest.raises(ba.SessionClosed, match="cannot follow a commit on the 'overlay'"):
            await s.eval("x")
        assert ws.branches() == []
    assert (repo / "f.txt").read_text() == "in b"


async def test_commit_of_a_child_lands_its_files(repo: Path, forking_backend: str) -> None:
    async with workspace(repo, forking_backend) as ws:
        b = await ws.fork()
        s = await b.session()
        await s.exec("x = 'root'\nopen('parent.txt', 'w').write('p')")
        c1 = await s.fork()
        c2 = await s.fork()
        await c1.exec("x = 'one'\nopen('one.txt', 'w').write('1')")
        await c2.exec("import os\nx = 'two'\nopen('two.txt', 'w').write('2')\n"
                      "os.makedirs('sub', exist_ok=True)\nos.chdir('sub')\n"
                      "open('in_sub.txt', 'w').write('s')")
        c2_branch = c2.branch
        await c2.branch.commit()
        # The winner's files are in the parent; the invalidated sibling's session ends
        # with it; the winner's session goes on in the parent, its memory intact; the
        # parent's own session goes on.
        assert (b.path / "two.txt").read_text() == "2"
        assert not (b.path / "one.txt").exists()
        assert c1.closed
        assert await gone(c1.pid)
        with pytest.raises(ba.SessionClosed, match="invalidated"):
            await c1.eval("x")
        assert not c2.closed
        assert c2.branch is b
        assert c2_branch.state is ba.BranchState.COMMITTED
        assert c2.moves == 1
        assert c2 in b._sessions
        assert await c2.eval("x") == "two"
        # Its working directory (a subdirectory it made) re-resolved in the parent:
        assert await c2.eval("os.getcwd()") == str(repo / "sub")
        assert await c2.eval("open('in_sub.txt').read()") == "s"
        assert await c2.eval(f"open({str(repo / 'two.txt')!r}).read()") == "2"
        assert await c2.eval("open('../parent.txt').read()") == "p"  # the parent's own
        # What it writes now lands in the parent branch, seen by the parent's session.
        await c2.exec("open('../after.txt', 'w').write('a')")
        assert (b.path / "after.txt").read_text() == "a"
        assert await s.eval("open('after.txt').read()") == "a"
        await s.exec("open('from_s.txt', 'w').write('s')")
        assert await c2.eval("open('../from_s.txt').read()") == "s"
        assert await s.eval("x") == "root"
        assert await s.eval("open('two.txt').read()") == "2"
        # It can fork again from there: a child of b.
        g = await c2.fork()
        assert g.branch.parent is b
        assert await g.eval("x") == "two"
        await g.close()
        # Committing into the base: b's own session moves to a new top-level branch that
        # sees the base as just committed (the base itself changes only by commits). The
        # fork that moved into b already follows no second commit: it ends, saying why.
        await b.commit()
        assert not s.closed
        assert c2.closed
        with pytest.raises(ba.SessionClosed, match="follows one commit"):
            await c2.eval("x")
        top = s.branch
        assert top.parent is None
        assert top.state is ba.BranchState.OPEN
        assert top in ws.branches()
        assert (repo / "after.txt").read_text() == "a"
        assert await s.eval("x") == "root"
        assert await s.eval("open('two.txt').read() + open('after.txt').read()") == "2a"
        await s.exec("open('later.txt', 'w').write('l')")
        assert not (repo / "later.txt").exists()
        await top.commit()  # and again: a session that was never forked follows every commit
        assert (repo / "later.txt").read_text() == "l"
        assert await s.eval("x") == "root"
        assert s.moves == 2
        assert s.branch.parent is None
        assert s.branch is not top
    assert (repo / "two.txt").read_text() == "2"
    assert not (repo / "one.txt").exists()


async def test_nested_commit_depth_three(repo: Path, forking_backend: str) -> None:
    """A fork three levels deep committed into its parent (depth 2), then that one into
    its parent: the session follows each time, its memory intact."""
    async with workspace(repo, forking_backend) as ws:
        b = await ws.fork()
        s = await b.session()
        await s.exec("path = ['b']")
        c = await s.fork()
        await c.exec("path.append('c')\nopen('c.txt', 'w').write('c')")
        d = await c.fork()
        await d.exec("path.append('d')\nopen('d.txt', 'w').write('d')")
        e = await d.fork()
        await e.exec("path.append('e')\nopen('e.txt', 'w').write('e')")
        assert e.branch.depth == 3
        d_branch = d.branch
        await e.branch.commit()
        assert e.branch is d_branch
        assert not d.closed
        assert await e.eval("path") == ["b", "c", "d", "e"]
        assert await e.eval("[open(f).read() for f in ('c.txt', 'd.txt', 'e.txt')]") == \
            ["c", "d", "e"]
        assert await d.eval("open('e.txt').read()") == "e"  # the parent's session sees it
        await e.exec("open('e2.txt', 'w').write('2')")  # now into d's branch
        assert await d.eval("open('e2.txt').read()") == "2"
        await d_branch.commit()
        # d's own session follows into c; e, a fork that already followed one commit,
        # ends with the reason; the commit stands.
        assert d.branch is c.branch
        assert not d.closed
        assert e.closed
        assert await gone(e.pid)
        assert await d.eval("path") == ["b", "c", "d"]
        assert await d.eval("open('e.txt').read() + open('e2.txt').read()") == "e2"
        assert await c.eval("open('e.txt').read() + open('d.txt').read()") == "ed"
        await d.exec("open('d2.txt', 'w').write('2')")
        assert await c.eval("open('d2.txt').read()") == "2"
        assert not (b.path / "d2.txt").exists()
        assert await s.eval("path") == ["b"]


async def test_a_dead_session_does_not_stop_the_commit(repo: Path, forking_backend: str) -> None:
    """The interpreter died before its branch's commit: the commit stands; the session
    is closed with the reason, logged."""
    from structlog.testing import capture_logs

    async with workspace(repo, forking_backend) as ws:
        b = await ws.fork()
        s = await b.session()
        c = await s.fork()
        await c.exec("open('kept.txt', 'w').write('k')")
        import os
        import signal
        os.kill(c.pid, signal.SIGKILL)
        assert await gone(c.pid)
        with capture_logs() as logs:
            await c.branch.commit()
        assert (b.path / "kept.txt").read_text() == "k"
        assert c.closed
        failed = [e for e in logs if e["event"] == "session_move_failed"]
        assert len(failed) == 1
        assert failed[0]["into"] == b.name
        with pytest.raises(ba.SessionClosed, match="could not move"):
            await c.eval("1")
        assert await s.eval("open('kept.txt').read()") == "k"
        assert b._sessions == {s}


async def test_abort_kills_the_session_and_its_forks(repo: Path) -> None:
    before = snapshot(repo)
    async with workspace(repo, "copy") as ws:
        b = await ws.fork()
        s = await b.session()
        await s.exec("open('junk', 'w').write('x')")
        c = await s.fork()
        await b.abort()
        assert s.closed
        assert c.closed
        assert await gone(s.pid)
        assert await gone(c.pid)
        with pytest.raises((ba.SessionClosed, ba.BranchClosed)):
            await c.exec("1")
        with pytest.raises(ba.SessionClosed):
            await s.fork()
    assert snapshot(repo) == before


async def test_aborting_a_child_leaves_the_parent_session(repo: Path) -> None:
    async with workspace(repo, "copy") as ws:
        b = await ws.fork()
        s = await b.session()
        await s.exec("x = 1")
        c = await s.fork()
        await c.branch.abort()
        assert c.closed
        assert not s.closed
        assert await s.eval("x") == 1
        # A closed parent session leaves its forks running (a reaper adopts them).
        c2 = await s.fork()
        await s.close()
        assert await c2.eval("x") == 1


async def test_fork_refuses_threads_children_and_open_files(repo: Path) -> None:
    async with workspace(repo, "copy") as ws:
        b = await ws.fork()
        s = await b.session()
        await s.exec("import threading, subprocess, time\nev = threading.Event()\n"
                     "t = threading.Thread(target=ev.wait, name='worker'); t.start()")
        with pytest.raises(ba.SessionForkError, match="thread"):
            await s.fork()
        assert b.children == []  # nothing changed: the child branch was aborted
        await s.exec("ev.set(); t.join()")
        await s.exec("p = subprocess.Popen(['sleep', '30'])")
        with pytest.raises(ba.SessionForkError, match="child process"):
            await s.fork()
        await s.exec("p.kill(); p.wait()")
        await s.exec("f = open('README.md')")
        with pytest.raises(ba.SessionForkError, match=r"README\.md"):
            await s.fork()
        await s.exec("f.close()")
        c = await s.fork()
        assert await c.eval("1 + 1") == 2
        assert len(b.children) == 1


async def test_trio_and_asyncio_agents(repo: Path, anyio_backend: str) -> None:
    async with workspace(repo, "copy") as ws:
        b = await ws.fork()
        async with await b.session() as s:
            await s.exec("v = [1]")
            c = await s.fork()
            await c.exec("v.append(2)")
            assert await c.eval("v") == [1, 2]
            assert await s.eval("v") == [1]


async def test_workspace_close_ends_every_session(repo: Path) -> None:
    async with workspace(repo, "copy") as ws:
        b = await ws.fork()
        s = await b.session()
        c = await s.fork()
        pids = [s.pid, c.pid]
    assert not any(_alive(p) for p in pids)
    assert s.closed
    assert c.closed


# -- hostile -----------------------------------------------------------------------------

BOMB = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_fork_bomb_is_contained_by_pids(repo: Path) -> None:
    require_cgroup("pids")
    before = snapshot(repo)
    async with workspace(repo, "copy") as ws:
        b = await ws.fork()
        s = await b.session(limits=ba.Limits(pids=32))
        c = await s.fork()
        await c.exec("import os, time")
        await s.exec("alive = True")
        with anyio.move_on_after(2):
            await c.exec(BOMB)
        assert c.closed  # cancelled mid-request: the session was ended
        assert await s.eval("alive") is True  # its parent is untouched
        await b.abort()
    assert snapshot(repo) == before


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_memory_past_the_limit_kills_only_that_session(repo: Path) -> None:
    require_cgroup("memory")
    before = snapshot(repo)
    async with workspace(repo, "copy") as ws:
        b = await ws.fork()
        s = await b.session(limits=ba.Limits(memory="128M"))
        await s.exec("x = 1")
        c = await s.fork()
        with pytest.raises(ba.ProcessKilled, match="killed='memory'"):
            await c.exec("hog = bytearray(1 << 30)")
        assert c.closed
        assert await s.eval("x") == 1
        with pytest.raises(ba.SessionClosed):
            await c.eval("1")
        await b.abort()
    assert snapshot(repo) == before


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_memory_limit_falls_back_to_rlimit(repo: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_cgroup, "_host", NO_CGROUPS)
    async with workspace(repo, "copy") as ws:
        b = await ws.fork()
        s = await b.session(limits=ba.Limits(memory="256M"))
        with pytest.raises(MemoryError):
            await s.exec("hog = bytearray(1 << 30)")
        assert await s.eval("1 + 1") == 2  # the interpreter survives its MemoryError
        c = await s.fork()  # and a fork inherits the limit
        with pytest.raises(MemoryError):
            await c.exec("hog = bytearray(1 << 30)")
        await b.abort()


async def test_session_cannot_see_the_journal_or_base(repo: Path) -> None:
    async with workspace(repo, "copy") as ws:
        b = await ws.fork()
        s = await b.session()
        state = str(ws.state_dir)
        # The state directory holds only the branches' views.
        assert await s.eval(f"__import__('os').listdir({state!r})") == ["views"]
        # No capability over mounts: the branch's view cannot be taken away.
        c = await s.fork()
        out = await c.eval(
            f"__import__('subprocess').run(['umount', '-l', {str(repo)!r}], "
            "capture_output=True).returncode")
        assert out != 0
        assert await c.eval("open('README.md').read()") == "# demo\n"


async def test_fork_depth_limit_is_a_clear_error(repo: Path) -> None:
    async with workspace(repo, "copy") as ws:
        b = await ws.fork()
        s = await b.session()
        await s.exec("x = 0")
        error = None
        for _ in range(40):
            try:
                c = await s.fork()
            except ba.SessionForkError as exc:
                error = exc
                break
            s = c
            await s.exec("x += 1")
        assert error is not None
        assert "at most 32" in str(error)
        depth = await s.eval("x")
        assert 25 <= depth <= 33, depth
        assert s.branch.children == []  # the refused fork's branch was aborted


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_busy_session_does_not_block_commit_or_abort(repo: Path) -> None:
    """A session stuck in a loop (or ignoring signals) holds no lock the workspace needs:
    the commit of its branch's sibling and the abort of its own branch return at once,
    and the stuck request ends with an error."""
    async with workspace(repo, "copy") as ws:
        b = await ws.fork()
        s = await b.session()
        stuck = await s.fork()
        winner = await s.fork()
        await winner.exec("open('w.txt', 'w').write('w')")
        errors: list[BaseException] = []

        async def spin() -> None:
            try:
                await stuck.exec("import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                                 "while True:\n    pass")
            except Exception as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(spin)
            await anyio.sleep(0.3)
            with anyio.fail_after(10):
                await winner.branch.commit()  # invalidates the stuck sibling
        assert len(errors) == 1
        assert isinstance(errors[0], ba.SessionClosed | ba.BranchClosed), errors
        assert stuck.closed
        assert await gone(stuck.pid)
        assert (b.path / "w.txt").read_text() == "w"
        # The same for an abort of the busy session's own branch.
        busy = await s.fork()
        errors.clear()

        async def loop() -> None:
            try:
                await busy.exec("while True:\n    pass")
            except Exception as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(loop)
            await anyio.sleep(0.3)
            with anyio.fail_after(10):
                await busy.branch.abort()
        assert len(errors) == 1
        assert isinstance(errors[0], ba.BranchClosed), errors
        assert busy.closed
        assert await s.eval("1 + 1") == 2
