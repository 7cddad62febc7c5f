"""The FUSE backend on real mounts: real tools, lifecycle, fork cost.

The public conformance suite runs on it from tests/workspace/test_conformance.py, like
on every registered backend. Skipped (with the reason) where FUSE cannot run:
no pyfuse3, no /dev/fuse.
"""

from __future__ import annotations

import errno
import os
import signal
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest

import branchagent as ba
from _fuse_fault import fault_server
from _support import alive, requires_fuse, tree_state
from branchagent import testing
from branchagent._backends.fuse import FuseBackend
from branchagent._backends.fuse._backend import is_mounted
from branchagent._workspace import Workspace

pytestmark = [pytest.mark.anyio, requires_fuse]


@asynccontextmanager
async def fuse_workspace(repo: Path, fault: str | None = None) -> AsyncIterator[Workspace]:
    """A FUSE workspace; ``fault``: its server runs with that fault hook (_fuse_fault)."""
    async with ba.open_workspace(repo, backend=FuseBackend(server=fault_server(fault)),
                                 state_dir=repo.parent / "state") as ws:
        yield ws


def sh(cmd: str, cwd: Path) -> str:
    r = subprocess.run(["sh", "-ec", cmd], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"{cmd!r} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return r.stdout


GIT = "git -c user.email=t@example.com -c user.name=t -c init.defaultBranch=main"


# -- conformance -----------------------------------------------------------------------------------


def test_conformance_suite_covers_fuse() -> None:
    """tests/workspace/test_conformance.py runs the public suite (the 200x50 model check and every
    targeted check, unchanged) on every registered backend: make sure fuse is one."""
    assert "fuse" in ba.available_backends()
    assert ba.load_backend("fuse").isolates_outside_writes is False


# -- real tools in a branch, then committed ----------------------------------------------------


async def test_git_in_a_branch(repo: Path) -> None:
    async with fuse_workspace(repo) as ws:
        async with ws.branch() as b:
            sh(f"{GIT} init -q . && {GIT} add -A && {GIT} commit -qm init", b.path)
            sh("echo more >> README.md", b.path)
            assert sh(f"{GIT} status --short", b.path) == " M README.md\n"
            sh(f"{GIT} commit -qam more && {GIT} checkout -q -b other && echo x > x.txt "
               f"&& {GIT} add x.txt && {GIT} commit -qm x && {GIT} checkout -q main", b.path)
            assert not (b.path / "x.txt").exists()
            assert sh(f"{GIT} status --short", b.path) == ""
        assert sh(f"{GIT} status --short", repo) == ""
        assert sh(f"{GIT} log --format=%s main", repo).split() == ["more", "init"]
        assert sh(f"{GIT} log --format=%s other", repo).split() == ["x", "more", "init"]
        assert sh(f"{GIT} fsck --strict && echo ok", repo).endswith("ok\n")


async def test_sed_and_editor_saves(repo: Path) -> None:
    async with fuse_workspace(repo) as ws:
        async with ws.branch() as b:
            sh("sed -i 's/demo/edited/' README.md", b.path)
            # an editor's atomic save: write a temporary file, fsync, rename over the original
            sh("printf 'def f():\\n    return 2\\n' > src/pkg/.mod.py.tmp && "
               "sync src/pkg/.mod.py.tmp && mv src/pkg/.mod.py.tmp src/pkg/mod.py", b.path)
            assert (repo / "README.md").read_text() == "# demo\n"
        assert (repo / "README.md").read_text() == "# edited\n"
        assert (repo / "src/pkg/mod.py").read_text() == "def f():\n    return 2\n"
        assert not (repo / "src/pkg/.mod.py.tmp").exists()


async def test_tar_cp_find_du_df(repo: Path, tmp_path: Path) -> None:
    src = tmp_path / "payload"
    (src / "a" / "b").mkdir(parents=True)
    for i in range(50):
        (src / "a" / f"f{i}.txt").write_text(f"file {i}\n" * (i + 1))
    (src / "a" / "b" / "run.sh").write_text("#!/bin/sh\n")
    (src / "a" / "b" / "run.sh").chmod(0o750)
    os.symlink("../f1.txt", src / "a" / "b" / "link")
    archive = tmp_path / "payload.tar"
    sh(f"tar cf {archive} -C {src} a", tmp_path)
    async with fuse_workspace(repo) as ws:
        async with ws.branch() as b:
            sh(f"mkdir unpacked && tar xf {archive} -C unpacked", b.path)
            sh("cp -a unpacked copied && diff -r unpacked copied", b.path)
            found = sh("find . -name '*.txt' | sort", b.path).split()
            assert len([f for f in found if f.startswith("./unpacked/")]) == 50
            du = int(sh("du -sk unpacked | cut -f1", b.path))
            assert du > 0
            df = sh("df -P . | tail -1", b.path).split()
            assert int(df[1]) > 0  # statfs is real, not zeros
            assert (b.path / "copied/a/b/link").is_symlink()
        expected = testing.read_tree(src)
        assert testing.read_tree(repo / "unpacked") == expected
        assert testing.read_tree(repo / "copied") == expected
        mtimes = {os.stat(repo / d / "a/b/run.sh").st_mtime_ns for d in ("unpacked", "copied")}
        assert len(mtimes) == 1  # cp -a kept tar's mtime, to the nanosecond


async def test_posix_errors_and_open_unlinked_files(repo: Path) -> None:
    async with fuse_workspace(repo) as ws:
        b = await ws.fork()
        p = b.path

        def expect(code: int, fn: object, *args: object) -> None:
            with pytest.raises(OSError) as info:  # noqa: PT011 - the errno is checked
                fn(*args)  # type: ignore[operator]
            assert info.value.errno == code, (fn, args, info.value)

        expect(errno.ENOTEMPTY, os.rmdir, p / "src")
        expect(errno.ENOENT, os.unlink, p / "missing")
        expect(errno.EEXIST, os.mkdir, p / "src")
        expect(errno.ENOTDIR, os.listdir, p / "README.md")
        expect(errno.EISDIR, os.rename, p / "README.md", p / "src")
        expect(errno.ENOTDIR, os.rename, p / "src", p / "README.md")
        os.mkdir(p / "full")
        (p / "full" / "x").write_text("x")
        expect(errno.ENOTEMPTY, os.rename, p / "src", p / "full")
        expect(errno.ELOOP, os.open, p / "link", os.O_RDONLY | os.O_NOFOLLOW)
        # a file used after its name is gone (a common temp-file pattern)
        fd = os.open(p / "tmp", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.unlink(p / "tmp")
            os.write(fd, b"abc")
            assert os.fstat(fd).st_size == 3
            os.ftruncate(fd, 1)
            assert os.pread(fd, 10, 0) == b"a"
        finally:
            os.close(fd)
        # rename over, exchange, no-replace
        (p / "one").write_text("1")
        (p / "two").write_text("2")
        os.rename(p / "one", p / "two")
        assert (p / "two").read_text() == "1"
        os.link(p / "two", p / "hard")
        assert os.stat(p / "hard").st_nlink == 2
        # delete a base directory with content, then recreate it: the new one is empty
        sh("rm -rf src && mkdir src && touch src/new", p)
        assert sorted(os.listdir(p / "src")) == ["new"]
        await b.commit()
        assert sorted(os.listdir(repo / "src")) == ["new"]
        assert (repo / "hard").read_text() == "1"


async def test_nested_snapshot_while_parent_writes(repo: Path) -> None:
    """A child sees its parent as at the fork, also through files the parent keeps open."""
    async with fuse_workspace(repo) as ws:
        parent = await ws.fork()
        with open(parent.path / "README.md", "r+") as f:  # noqa: ASYNC230 - served elsewhere
            f.write("# parent one\n")
            f.flush()
            child = await parent.fork()
            f.seek(0)
            f.write("# parent two\n")  # after the fork, through a handle opened before it
            f.flush()
            second = await parent.fork()  # the moved handle is the parent's only change
            f.seek(0)
            f.write("# parent 333\n")
            f.flush()
        assert (parent.path / "README.md").read_text() == "# parent 333\n"
        assert (child.path / "README.md").read_text() == "# parent one\n"
        assert (second.path / "README.md").read_text() == "# parent two\n"
        await second.abort()
        (child.path / "c.txt").write_text("child\n")
        await child.commit()
        assert (parent.path / "c.txt").read_text() == "child\n"
        assert (parent.path / "README.md").read_text() == "# parent 333\n"


async def test_control_requests_for_unknown_or_dead_branches(repo: Path) -> None:
    """Every control request answers: a typed error for a branch the server does not know."""
    async with fuse_workspace(repo) as ws:
        be = ws.backend
        assert isinstance(be, FuseBackend)
        b = await ws.fork("alive")
        await b.abort()
        for name in ("nope", "alive"):
            with pytest.raises(ba.BranchNotFound):
                await be.changes(name, None)
            with pytest.raises(ba.BranchNotFound):
                await be.commit(name)
            with pytest.raises(ba.BranchNotFound):
                await be.old_content(name, None, "README.md")
            await be.abort(name)  # idempotent
        c = await ws.fork("top")
        k = await c.fork("kid")
        with pytest.raises(ba.BranchNotFound, match="not a top-level branch"):
            await be.changes("kid", None)
        with pytest.raises(ba.BranchNotFound, match="not a child of 'kid'"):
            await be.changes("top", "kid")
        await be.abort_many(["nope", "gone"])  # unknown names: nothing to do
        await k.abort()
        await c.commit()
        assert sorted(os.listdir(be.mountpoint)) == []


# -- lifecycle -------------------------------------------------------------------------------------


async def test_mount_gone_after_close_and_reopen_lists_branches(repo: Path) -> None:
    state = repo.parent / "state"
    async with ba.open_workspace(repo, backend=FuseBackend(), state_dir=state,
                                 keep_branches=True) as ws:
        b = await ws.fork("kept")
        (b.path / "k.txt").write_text("kept\n")
        mnt = b.path.parent
        assert is_mounted(mnt)
    assert not is_mounted(mnt)
    async with ba.open_workspace(repo, backend=FuseBackend(), state_dir=state) as ws:
        (kept,) = ws.branches()
        assert (kept.path / "k.txt").read_text() == "kept\n"
        await kept.commit()
    assert (repo / "k.txt").read_text() == "kept\n"


_AGENT = textwrap.dedent("""
    import sys, time, anyio
    import branchagent as ba
    from branchagent._backends.fuse import FuseBackend

    async def main() -> None:
        async with ba.open_workspace(sys.argv[1], backend=FuseBackend(),
                                     state_dir=sys.argv[2]) as ws:
            b = await ws.fork("doomed")
            (b.path / "x.txt").write_text("x")
            print("READY", ws.backend.server_pid, b.path, flush=True)
            await anyio.sleep(600)

    anyio.run(main)
""")


def _wait(cond: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def test_server_dies_with_the_agent(repo: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    with subprocess.Popen([sys.executable, "-c", _AGENT, str(repo), str(state)],
                          stdout=subprocess.PIPE, text=True) as agent:
        try:
            assert agent.stdout is not None
            line = ""
            while not line.startswith("READY "):  # (structlog writes to stdout too)
                line = agent.stdout.readline()
                assert line, "the agent died before it was ready"
            _, server_pid_s, branch = line.split()
            server_pid, mnt = int(server_pid_s), Path(branch).parent
            assert is_mounted(mnt)
            assert (Path(branch) / "x.txt").read_text() == "x"
            agent.send_signal(signal.SIGKILL)
            agent.wait()
            assert _wait(lambda: not is_mounted(mnt), 10), "the mount outlived the agent"
            assert _wait(lambda: not alive(server_pid), 10), "the server outlived the agent"
        finally:
            agent.kill()
            agent.wait()
    assert not (repo / "x.txt").exists()


async def test_stale_mount_is_cleared_on_open(repo: Path, tmp_path: Path) -> None:
    """A server killed with SIGKILL leaves a dead mount; the next open clears it."""
    state = tmp_path / "state"
    async with ba.open_workspace(repo, backend=FuseBackend(), state_dir=state,
                                 keep_branches=True) as ws:
        b = await ws.fork("survivor")
        (b.path / "s.txt").write_text("s\n")
        pid = ws.backend.server_pid  # type: ignore[attr-defined]
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        assert _wait(lambda: not alive(pid), 10)
        with pytest.raises(OSError) as info:  # noqa: PT011 - the errno is checked
            os.listdir(b.path)
        assert info.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)  # the dead mount
    async with ba.open_workspace(repo, backend=FuseBackend(), state_dir=state) as ws:
        (b,) = ws.branches()
        assert (b.path / "s.txt").read_text() == "s\n"


# -- fork cost -------------------------------------------------------------------------------------


async def test_fork_latency_is_flat(tmp_path: Path) -> None:
    """Not a benchmark: fork on 10k files costs about what it costs on 100."""
    medians = {}
    for n in (100, 10_000):
        repo = tmp_path / f"repo{n}"
        for i in range(n):
            d = repo / f"d{i % 100}"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"f{i}.txt").write_text(f"{i}\n")
        async with ba.open_workspace(repo, backend=FuseBackend(),
                                     state_dir=tmp_path / f"state{n}") as ws:
            times = []
            for _ in range(30):
                t0 = time.perf_counter()
                b = await ws.fork()
                times.append(time.perf_counter() - t0)
                await b.abort()
            medians[n] = statistics.median(times)
    assert medians[10_000] < max(5 * medians[100], 0.005), medians


# -- concurrency ----------------------------------------------------------------------------------


async def test_a_paused_commit_stalls_only_its_own_branch(
        repo: Path, tmp_path: Path) -> None:
    """A commit's work runs beside the FUSE loop: while it is stopped between journal steps
    (the fault hook), another branch reads, writes and lists; the committing branch's own
    requests wait for it, and the commit then lands whole."""
    go = tmp_path / "go"
    async with fuse_workspace(repo, f"wait:2:{go}") as ws:  # stop after the first op
        a = await ws.fork("a")
        for i in range(40):  # big enough for the commit's work to leave the FUSE thread
            (a.path / f"a{i}.txt").write_text(f"a{i}\n")
        other = await ws.fork("other")
        seen: dict[str, object] = {}

        def gated() -> None:
            seen["exists"] = (a.path / "never-looked-up").exists()

        async with anyio.create_task_group() as tg:
            tg.start_soon(a.commit)
            reached = Path(f"{go}.reached")
            with anyio.fail_after(30):
                while not reached.exists():  # noqa: ASYNC110, ASYNC240 - another process
                    await anyio.sleep(0.01)

            def work_elsewhere() -> None:
                (other.path / "new.txt").write_text("written during the commit\n")
                seen["read"] = (other.path / "new.txt").read_text()
                seen["list"] = sorted(os.listdir(other.path))

            with anyio.fail_after(20):
                await anyio.to_thread.run_sync(work_elsewhere)
            assert seen["read"] == "written during the commit\n"
            assert "new.txt" in seen["list"]  # type: ignore[operator]
            tg.start_soon(anyio.to_thread.run_sync, gated)
            await anyio.sleep(0.5)
            assert "exists" not in seen, "a request for the committing branch was not held"
            assert not (repo / "a39.txt").exists() or not (repo / "a0.txt").exists()
            go.touch()
        assert seen["exists"] is False  # answered after the commit: the branch is gone
    for i in range(40):
        assert (repo / f"a{i}.txt").read_text() == f"a{i}\n"
    assert not (repo / "new.txt").exists()


async def test_fork_after_outside_writes_sees_exactly_them(repo: Path) -> None:
    """A top-level fork after writes into the base from outside rescans only what the
    watch saw written; the fork's snapshot must still be the base exactly: reverting an
    outside edit, deleting an outside-made file and keeping an outside delete all commit
    as they should."""
    base = repo / "tree"
    (base / "d" / "y").mkdir(parents=True)
    (base / "d" / "y" / "z.txt").write_text("z\n")
    (base / "e").mkdir()
    (base / "e" / "w.txt").write_text("w\n")
    (base / "x.txt").write_text("old\n")
    async with fuse_workspace(repo) as ws:
        first = await ws.fork()  # the base is scanned; the watch is on
        await first.abort()
        (base / "x.txt").write_text("edited outside\n")
        (base / "n" / "m" / "k").mkdir(parents=True)  # a new tree, made in one go
        (base / "n" / "m" / "k" / "deep.txt").write_text("deep\n")
        os.rename(base / "d", repo.parent / "moved-out")  # one event; its subtree is gone too
        os.rename(base / "e", base / "f")
        os.chmod(base / "f" / "w.txt", 0o600)
        b = await ws.fork()
        assert await b.changes() == []
        assert (b.path / "tree" / "n" / "m" / "k" / "deep.txt").read_text() == "deep\n"
        (b.path / "tree" / "x.txt").write_text("old\n")  # back to what it was before
        (b.path / "tree" / "n" / "m" / "k" / "deep.txt").unlink()
        (b.path / "tree" / "f" / "w.txt").write_text("w2\n")
        (b.path / "tree" / "d" / "y").mkdir(parents=True)  # as it was before it moved out
        (b.path / "tree" / "d" / "y" / "z.txt").write_text("z\n")
        kinds = {c.path: c.kind for c in await b.changes()}
        assert kinds == {"tree/x.txt": ba.ChangeKind.MODIFIED,
                         "tree/n/m/k/deep.txt": ba.ChangeKind.DELETED,
                         "tree/f/w.txt": ba.ChangeKind.MODIFIED,
                         "tree/d": ba.ChangeKind.ADDED, "tree/d/y": ba.ChangeKind.ADDED,
                         "tree/d/y/z.txt": ba.ChangeKind.ADDED}
        await b.commit()
        assert (base / "x.txt").read_text() == "old\n"
        assert not (base / "n" / "m" / "k" / "deep.txt").exists()
        assert (base / "f" / "w.txt").read_text() == "w2\n"
        assert (base / "d" / "y" / "z.txt").read_text() == "z\n"
        # An outside write after the fork is still the parent's change: a conflict.
        c = await ws.fork()
        (c.path / "tree" / "f" / "w.txt").write_text("ours\n")
        (base / "f" / "w.txt").write_text("theirs\n")
        with pytest.raises(ba.ConflictError):
            await c.commit()
        assert (base / "f" / "w.txt").read_text() == "theirs\n"


# -- a nested commit interrupted by a crash -----------------------------------------------------


@pytest.mark.parametrize("step", [1, 2, 8, 14])
async def test_nested_commit_killed_midway_is_finished_at_open(
        repo: Path, step: int) -> None:
    """SIGKILL the filesystem process at a step of a nested commit (1: right after its
    plan is written; 14: after its last step); the next open finishes the merge: the
    parent is exactly as after the commit, the child is gone, and the parent commits."""
    state = repo.parent / "state"
    (repo / "tree" / "sub").mkdir(parents=True)
    for i in range(12):
        (repo / "tree" / f"f{i}.txt").write_text(f"f{i}\n")
    (repo / "tree" / "sub" / "a.txt").write_text("a\n")
    async with ba.open_workspace(repo, backend=FuseBackend(server=fault_server(f"kill:{step}")),
                                 state_dir=state,
                                 keep_branches=True) as ws:
        p = await ws.fork("parent")
        (p.path / "tree" / "f0.txt").write_text("parent's\n")
        c = await p.fork("child")
        for i in range(1, 6):
            (c.path / "tree" / f"f{i}.txt").write_text(f"child's f{i}\n")
        (c.path / "tree" / "new" / "deep").mkdir(parents=True)
        (c.path / "tree" / "new" / "deep" / "x.txt").write_text("x\n")
        (c.path / "tree" / "f6.txt").unlink()
        (c.path / "tree" / "sub" / "a.txt").unlink()
        (c.path / "tree" / "sub").rmdir()
        (c.path / "tree" / "ln").symlink_to("f7.txt")
        (c.path / "tree" / "f8.txt").chmod(0o600)
        want = tree_state(c.path)
        before = tree_state(p.path)
        assert want != before
        pid = ws.backend.server_pid  # type: ignore[attr-defined]
        with pytest.raises(ba.BranchAgentError):
            await c.commit()
        assert pid is not None
        assert _wait(lambda: not alive(pid), 10)
    async with ba.open_workspace(repo, backend=FuseBackend(), state_dir=state) as ws:
        assert [b.name for b in ws.branches()] == ["parent"]
        (p,) = ws.branches()
        assert tree_state(p.path) == want
        await p.commit()
    assert tree_state(repo) == want



async def test_hundreds_of_branches_written_by_concurrent_processes(repo: Path) -> None:
    """200 branches open at once, each written by its own process, 25 processes at a time:
    each branch holds exactly its own writes, the base none until one branch commits."""
    n = 200
    async with fuse_workspace(repo) as ws:
        branches = [await ws.fork(f"b{i}") for i in range(n)]
        assert len({b.path for b in branches}) == n
        limiter = anyio.CapacityLimiter(25)
        script = ('for k in 1 2 3 4 5; do echo "$1 $k" >> "$2/out.txt"; done; '
                  'mkdir -p "$2/d/$1" && echo mine > "$2/d/$1/f" && rm "$2/README.md"')

        async def write(i: int) -> None:
            async with limiter:
                await anyio.run_process(["sh", "-ec", script, "sh", str(i),
                                         os.fspath(branches[i].path)])

        async with anyio.create_task_group() as tg:
            for i in range(n):
                tg.start_soon(write, i)
        for i, b in enumerate(branches):
            assert (b.path / "out.txt").read_text() == "".join(f"{i} {k}\n" for k in range(1, 6))
            assert os.listdir(b.path / "d") == [str(i)]
            assert not (b.path / "README.md").exists()
        assert (repo / "README.md").exists()
        assert not (repo / "out.txt").exists()
        await branches[123].commit()
        assert all(b.state is ba.BranchState.INVALIDATED for b in branches if b.name != "b123")
    assert (repo / "out.txt").read_text().startswith("123 1\n")
    assert os.listdir(repo / "d") == ["123"]
    assert not (repo / "README.md").exists()


async def test_symlinks_pointing_outside_are_never_followed(repo: Path, tmp_path: Path) -> None:
    """A branch's symlink to a directory outside the workspace: resolving through it is
    refused, the commit places the link itself (and writes nothing outside); a base
    directory swapped for such a link from outside makes the commit of a branch writing
    below it fail clearly, with nothing written anywhere."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (repo / "d").mkdir()
    async with fuse_workspace(repo) as ws:
        b = await ws.fork()
        (b.path / "escape").symlink_to(outside)
        with pytest.raises(ba.PathEscapeError):
            b.resolve("escape/x.txt")
        await b.commit()
        assert os.readlink(repo / "escape") == os.fspath(outside)
        assert os.listdir(outside) == []

        c = await ws.fork()
        (c.path / "d" / "new.txt").write_text("must not leave the workspace\n")
        os.rmdir(repo / "d")  # from outside, after the fork: d becomes a link out
        (repo / "d").symlink_to(outside)
        before = sorted(os.listdir(repo))
        with pytest.raises(ba.BranchAgentError) as info:
            await c.commit()
        assert isinstance(info.value, ba.ConflictError | ba.PathEscapeError)
        assert "d" in str(info.value)
        assert os.listdir(outside) == []
        assert sorted(os.listdir(repo)) == before
        assert os.readlink(repo / "d") == os.fspath(outside)


async def test_hard_links_are_one_inode(repo: Path) -> None:
    """Two names of one file in a branch are one inode (st_ino equal, st_nlink 2, a write
    through one shows through the other); unlinking or renaming one name leaves the
    other working; after a nested fork each branch keeps its own content; the commit
    lands both names as one file."""
    async with fuse_workspace(repo) as ws:
        b = await ws.fork()
        a, c = b.path / "a.txt", b.path / "sub" / "c.txt"
        a.write_text("one\n")
        (b.path / "sub").mkdir()
        os.link(a, c)
        sa, sc = os.stat(a), os.stat(c)
        assert sa.st_ino == sc.st_ino
        assert sa.st_nlink == sc.st_nlink == 2
        with open(c, "a") as f:  # noqa: ASYNC230 - served elsewhere
            f.write("two\n")
        assert a.read_text() == "one\ntwo\n"
        os.link(a, b.path / "third.txt")
        os.unlink(a)
        assert c.read_text() == "one\ntwo\n"
        assert os.stat(c).st_nlink == 2
        os.rename(b.path / "third.txt", b.path / "renamed.txt")
        assert os.stat(b.path / "renamed.txt").st_ino == os.stat(c).st_ino
        kid = await b.fork()
        with open(kid.path / "renamed.txt", "a") as f:  # noqa: ASYNC230 - served elsewhere
            f.write("kid\n")
        assert (kid.path / "renamed.txt").read_text() == "one\ntwo\nkid\n"
        assert c.read_text() == "one\ntwo\n"
        assert (b.path / "renamed.txt").read_text() == "one\ntwo\n"
        await kid.abort()
        await b.commit()
    assert (repo / "sub" / "c.txt").read_text() == "one\ntwo\n"
    assert os.stat(repo / "sub" / "c.txt").st_ino == os.stat(repo / "renamed.txt").st_ino
    assert not (repo / "a.txt").exists()
