"""Workspace rules: names, lookups, closed branches, paths, locking, the tree, logs, crashes."""

from __future__ import annotations

import os
import sys
import textwrap
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any, cast

import anyio
import anyio.lowlevel
import pytest
import structlog.testing

import branchagent as ba
from _support import Tree, tree_state
from branchagent import WorkspaceBranch

pytestmark = pytest.mark.anyio



def realpath(path: Path) -> Path:
    return Path(os.path.realpath(path))


def listing(root: Path) -> set[str]:
    """Every path under ``root`` (the state directory), for "nothing was created" checks."""
    return {os.path.relpath(os.path.join(d, n), root)
            for d, dirs, files in os.walk(root) for n in [*dirs, *files]}


def snapshot(ws: ba.Workspace) -> tuple[Tree, set[str]]:
    return tree_state(ws.path), listing(ws.state_dir)


def write(branch: ba.Branch, rel: str, text: str) -> None:
    p = branch.path / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


# -- names -----------------------------------------------------------------------------

BAD_NAMES: list[object] = [
    "a/b", "..", ".", ".hidden", "@x", "a\x00b", "x" * 256, "é" * 128, "", "tab\tname",
    "back\\slash", 42, b"bytes", 1.5,
]


@pytest.mark.parametrize("where", ["workspace", "branch"])
async def test_invalid_names_create_nothing(repo: Path, backend_name: str, where: str) -> None:
    async with ba.open_workspace(repo, backend=backend_name) as ws:
        parent = await ws.fork("parent")
        write(parent, "p.txt", "parent\n")
        before = snapshot(ws)
        parent_before = tree_state(parent.path)
        forker = ws if where == "workspace" else parent
        for name in BAD_NAMES:
            with pytest.raises(ba.InvalidBranchName) as info:
                await forker.fork(cast(Any, name))
            assert isinstance(info.value, ValueError)
            assert snapshot(ws) == before, name
            assert tree_state(parent.path) == parent_before, name
            assert [b.name for b in ws.branches()] == ["parent"], name
            assert parent.children == [], name


async def test_longest_valid_name(repo: Path, backend_name: str) -> None:
    async with ba.open_workspace(repo, backend=backend_name) as ws:
        for name in ("x" * 255, "é" * 127 + "x"):
            assert len(name.encode()) == 255
            b = await ws.fork(name)
            assert b.name == name
            assert ws.get(name) is b
            write(b, name[:10] + ".txt", "long\n")
            await b.commit()
    assert (repo / ("x" * 10 + ".txt")).read_text() == "long\n"


async def test_generated_names_are_valid_and_unique(repo: Path, backend_name: str) -> None:
    async with ba.open_workspace(repo, backend=backend_name) as ws:
        top = await ws.fork()
        kids = [await top.fork() for _ in range(3)]
        names = [top.name, *(k.name for k in kids)]
        assert len(set(names)) == 4
        for n in names:
            assert ws.get(n).name == n


async def test_duplicate_name(repo: Path, backend_name: str) -> None:
    async with ba.open_workspace(repo, backend=backend_name) as ws:
        a = await ws.fork("a")
        await a.fork("kid")
        before = snapshot(ws)
        with pytest.raises(ba.BranchExists) as info:
            await ws.fork("a")
        assert isinstance(info.value, FileExistsError)
        with pytest.raises(ba.BranchExists):
            await a.fork("a")
        with pytest.raises(ba.BranchExists):
            await ws.fork("kid")  # names are unique in the whole workspace
        assert snapshot(ws) == before
        assert sorted(b.name for b in ws.branches()) == ["a", "kid"]


async def test_name_is_free_again_after_commit_or_abort(repo: Path, backend_name: str) -> None:
    async with ba.open_workspace(repo, backend=backend_name) as ws:
        a = await ws.fork("a")
        await a.abort()
        a2 = await ws.fork("a")
        write(a2, "x.txt", "x\n")
        await a2.commit()
        a3 = await ws.fork("a")
        assert (a3.path / "x.txt").read_text() == "x\n"


async def test_get(repo: Path, backend_name: str) -> None:
    async with ba.open_workspace(repo, backend=backend_name) as ws:
        a = await ws.fork("a")
        assert ws.get("a") is a
        with pytest.raises(ba.BranchNotFound) as info:
            ws.get("nope")
        assert isinstance(info.value, LookupError)
        assert "'nope'" in str(info.value)
        with pytest.raises(ba.InvalidBranchName):
            ws.get("../a")
        await a.commit()
        with pytest.raises(ba.BranchNotFound):
            ws.get("a")


# -- closed branches ---------------------------------------------------------------------


async def _op_fork(b: WorkspaceBranch) -> None:
    await b.fork()


async def _op_fork_named(b: WorkspaceBranch) -> None:
    await b.fork("child-of-closed")


async def _op_commit(b: WorkspaceBranch) -> None:
    await b.commit()


async def _op_changes(b: WorkspaceBranch) -> None:
    await b.changes()


async def _op_diff(b: WorkspaceBranch) -> None:
    await b.diff()


async def _op_run(b: WorkspaceBranch) -> None:
    await b.run(["touch", "ran"], isolate=False)


async def _op_resolve(b: WorkspaceBranch) -> None:
    b.resolve("README.md")


async def _op_branch_cm(b: WorkspaceBranch) -> None:
    async with b.branch() as child:
        write(child, "never.txt", "never\n")


OPS: list[Callable[[WorkspaceBranch], Awaitable[None]]] = [
    _op_fork, _op_fork_named, _op_commit, _op_changes, _op_diff, _op_run, _op_resolve,
    _op_branch_cm,
]


async def _check_refused(
    ws: ba.Workspace, b: WorkspaceBranch, exc: type[ba.BranchClosed], state: ba.BranchState
) -> None:
    before = snapshot(ws)
    names = sorted(x.name for x in ws.branches())
    for op in OPS:
        with pytest.raises(exc) as info:
            await op(b)
        assert isinstance(info.value, RuntimeError)
        if exc is ba.BranchClosed:
            assert not isinstance(info.value, ba.BranchInvalidated), op.__name__
        assert snapshot(ws) == before, op.__name__
        assert sorted(x.name for x in ws.branches()) == names, op.__name__
        assert b.state is state
    await b.abort()  # a no-op on a closed branch
    await b.abort()
    assert b.state is state
    assert snapshot(ws) == before


async def test_committed_branch_refuses_everything(repo: Path, backend_name: str) -> None:
    async with ba.open_workspace(repo, backend=backend_name) as ws:
        b = await ws.fork("b")
        write(b, "c.txt", "committed\n")
        await b.commit()
        assert b.state is ba.BranchState.COMMITTED
        await _check_refused(ws, b, ba.BranchClosed, ba.BranchState.COMMITTED)
    assert (repo / "c.txt").read_text() == "committed\n"


async def test_aborted_branch_refuses_everything(repo: Path, backend_name: str) -> None:
    async with ba.open_workspace(repo, backend=backend_name) as ws:
        b = await ws.fork("b")
        write(b, "a.txt", "aborted\n")
        await b.abort()
        assert b.state is ba.BranchState.ABORTED
        await _check_refused(ws, b, ba.BranchClosed, ba.BranchState.ABORTED)
    assert not (repo / "a.txt").exists()


async def test_invalidated_branch_refuses_everything(repo: Path, backend_name: str) -> None:
    async with ba.open_workspace(repo, backend=backend_name) as ws:
        winner = await ws.fork("winner")
        loser = await ws.fork("loser")
        write(loser, "l.txt", "lost\n")
        await winner.commit()
        assert loser.state is ba.BranchState.INVALIDATED
        await _check_refused(ws, loser, ba.BranchInvalidated, ba.BranchState.INVALIDATED)
        with pytest.raises(ba.BranchInvalidated, match="'winner' committed first"):
            await loser.changes()
    assert not (repo / "l.txt").exists()


async def test_abort_is_idempotent(repo: Path, backend_name: str) -> None:
    async with ba.open_workspace(repo, backend=backend_name) as ws:
        b = await ws.fork("b")
        write(b, "x.txt", "x\n")
        kid = await b.fork("kid")
        with structlog.testing.capture_logs() as logs:
            await b.abort()
            await b.abort()
            await kid.abort()
        assert b.state is ba.BranchState.ABORTED
        assert kid.state is ba.BranchState.ABORTED
        assert [e["branch"] for e in logs if e["event"] == "branch_aborted"] == ["b"]
        assert ws.branches() == []
        assert not ws.backend.exists("b")
    assert not (repo / "x.txt").exists()


async def test_closed_workspace_refuses(repo: Path, backend_name: str) -> None:
    async with ba.open_workspace(repo, backend=backend_name) as ws:
        b = await ws.fork("b")
    assert b.state is ba.BranchState.ABORTED
    with pytest.raises(ba.WorkspaceClosed):
        await ws.fork()
    with pytest.raises(ba.WorkspaceClosed):
        await b.changes()
    await ws.aclose()  # twice is harmless


async def test_close_waits_for_an_abort_already_under_way(repo: Path, backend_name: str) -> None:
    """An abort that began before the close (its branch's process still dying) has finished
    when ``aclose`` returns: a process that exits right after finds nothing to restore.
    (``branchagent serve`` stopped by SIGTERM left a branch behind this way.)"""
    async with ba.open_workspace(repo, backend=backend_name) as ws:
        b = await ws.fork("b")
        tree = anyio.Path(b.path)
        results: list[ba.RunResult] = []

        async def run() -> None:
            results.append(await b.run(["sh", "-c", "touch started; exec sleep 30"]))

        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            with anyio.fail_after(30):
                while not await (tree / "started").exists():  # noqa: ASYNC110 - a process
                    await anyio.sleep(0.01)
            tg.start_soon(b.abort)
            while b.state is ba.BranchState.OPEN:  # until the abort has begun
                await anyio.lowlevel.checkpoint()
            await ws.aclose()
            gone = not await tree.exists()
            listed = [x.name for x in ws.branches()]
            tg.cancel_scope.cancel()
        assert gone, "aclose returned while the branch's storage was still there"
        assert listed == []
    async with ba.open_workspace(repo, backend=backend_name) as again:
        assert again.branches() == []
    assert results == [] or results[0].killed == "aborted"


# -- paths -------------------------------------------------------------------------------


async def test_resolve_inside(repo: Path, backend_name: str) -> None:
    async with ba.open_workspace(repo, backend=backend_name) as ws:
        b = await ws.fork("b")
        real = realpath(b.path)
        assert b.resolve("README.md") == real / "README.md"
        assert b.resolve("src/pkg/../pkg/mod.py") == real / "src/pkg/mod.py"
        assert b.resolve("not/yet/there.txt") == real / "not/yet/there.txt"
        assert b.resolve(".") == real
        assert b.resolve(ws.path) == real
        assert b.resolve(ws.path / "src" / "pkg" / "mod.py") == real / "src/pkg/mod.py"
        assert b.resolve(Path("src")) == real / "src"
        assert b.resolve("link") == real / "README.md"  # a symlink inside stays inside
        (b.path / "..foo").write_text("a name that starts with two dots\n")
        assert b.resolve("..foo") == real / "..foo"
        assert b.resolve(ws.path / "..foo") == real / "..foo"


@pytest.mark.parametrize(
    "path",
    ["..", "../x", "src/../../x", "/etc/passwd", "/", "a\x00b", "{ws}/../x", "{ws}/../{name}x",
     "{parent}", "out", "out/x", "rel_out", "rel_out/x", "chain/x"],
)
async def test_resolve_refuses_escapes(
    repo: Path, backend_name: str, tmp_path: Path, path: str
) -> None:
    async with ba.open_workspace(repo, backend=backend_name) as ws:
        b = await ws.fork("b")
        (b.path / "out").symlink_to(tmp_path)
        (b.path / "rel_out").symlink_to("../../../../../../../..")
        (b.path / "chain").symlink_to("src/pkg/up")
        (b.path / "src" / "pkg" / "up").symlink_to("../../..")
        raw = path.format(ws=ws.path, name=ws.path.name, parent=ws.path.parent)
        with pytest.raises(ba.PathEscapeError) as info:
            b.resolve(raw)
        assert isinstance(info.value, ValueError)


async def test_state_dir_inside_the_workspace_is_refused(repo: Path, tmp_path: Path) -> None:
    alias = tmp_path / "alias"
    alias.symlink_to(repo)
    before = tree_state(repo)
    for state_dir in (repo / ".state", repo, repo / "src" / "x", alias / ".state"):
        with pytest.raises(ValueError, match="must not be inside the workspace"):
            async with ba.open_workspace(repo, backend="copy", state_dir=state_dir):
                pytest.fail(f"opened with state_dir {state_dir}")
    with pytest.raises(ValueError, match="must not be inside the workspace"):
        async with ba.open_workspace(alias, backend="copy", state_dir=repo / ".state"):
            pytest.fail("opened through an alias")
    assert tree_state(repo) == before


async def test_default_state_dir_is_beside_the_workspace(repo: Path) -> None:
    async with ba.open_workspace(repo, backend="copy") as ws:
        assert ws.state_dir == repo.parent / ".repo.branchagent"
        assert ws.state_dir.is_dir()
        assert ws.path == realpath(repo)


# -- locking -----------------------------------------------------------------------------

_SECOND_OPEN = textwrap.dedent("""
    import sys
    import anyio
    import branchagent as ba

    async def main():
        try:
            async with ba.open_workspace(sys.argv[1], backend="copy"):
                print("opened")
        except ba.WorkspaceLocked as exc:
            assert isinstance(exc, BlockingIOError)
            print("locked:", exc)

    anyio.run(main)
""")


async def test_second_open_is_locked(repo: Path, tmp_path: Path) -> None:
    script = tmp_path / "second.py"
    script.write_text(_SECOND_OPEN)
    argv = [sys.executable, os.fspath(script), os.fspath(repo)]
    async with ba.open_workspace(repo, backend="copy") as ws:
        b = await ws.fork("b")
        res = await anyio.run_process(argv)
        last = res.stdout.decode().splitlines()[-1]
        assert last.startswith("locked:"), res.stdout + res.stderr
        assert str(ws.path) in last
        # flock is per open file description: a second open in this process is refused too.
        with pytest.raises(ba.WorkspaceLocked):
            async with ba.open_workspace(repo, backend="copy"):
                pytest.fail("opened a workspace twice")
        assert b.state is ba.BranchState.OPEN  # the refused opens disturbed nothing
        write(b, "after.txt", "still works\n")
        await b.commit()
    res = await anyio.run_process(argv)
    assert res.stdout.decode().splitlines()[-1] == "opened"
    assert (repo / "after.txt").exists()


# -- the branch tree -----------------------------------------------------------------------


async def test_commit_with_open_children_invalidates_them(repo: Path, backend_name: str) -> None:
    async with ba.open_workspace(repo, backend=backend_name) as ws:
        top = await ws.fork("top")
        other = await ws.fork("other")
        write(top, "top.txt", "top\n")
        kid1 = await top.fork("kid1")
        kid2 = await top.fork("kid2")
        grandkid = await kid1.fork("grandkid")
        write(kid1, "kid1.txt", "never committed\n")
        write(grandkid, "gk.txt", "never committed\n")
        with structlog.testing.capture_logs() as logs:
            await top.commit()
        assert top.state is ba.BranchState.COMMITTED
        for loser in (kid1, kid2, grandkid, other):
            assert loser.state is ba.BranchState.INVALIDATED, loser.name
            assert not ws.backend.exists(loser.name), loser.name
            with pytest.raises(ba.BranchInvalidated):
                await loser.fork()
        assert ws.branches() == []
        invalidated = {e["branch"] for e in logs if e["event"] == "branch_invalidated"}
        assert invalidated == {"kid1", "kid2", "grandkid", "other"}
        (committed,) = [e for e in logs if e["event"] == "branch_committed"]
        assert sorted(committed["invalidated"]) == ["grandkid", "kid1", "kid2", "other"]
    assert (repo / "top.txt").read_text() == "top\n"
    assert not (repo / "kid1.txt").exists()
    assert not (repo / "gk.txt").exists()


async def test_abort_aborts_descendants(repo: Path, backend_name: str) -> None:
    async with ba.open_workspace(repo, backend=backend_name) as ws:
        top = await ws.fork("top")
        sibling = await ws.fork("sibling")
        kid1 = await top.fork("kid1")
        kid2 = await top.fork("kid2")
        grandkid = await kid1.fork("grandkid")
        for b in (top, kid1, kid2, grandkid):
            write(b, f"{b.name}.txt", b.name)
        write(sibling, "sibling.txt", "sibling\n")
        await top.abort()
        for b in (top, kid1, kid2, grandkid):
            assert b.state is ba.BranchState.ABORTED, b.name
            assert not ws.backend.exists(b.name), b.name
        assert [b.name for b in ws.branches()] == ["sibling"]
        assert sibling.state is ba.BranchState.OPEN
        await sibling.commit()
    assert (repo / "sibling.txt").exists()
    assert not any((repo / f"{n}.txt").exists() for n in ("top", "kid1", "kid2", "grandkid"))


async def test_aborting_a_child_leaves_the_parent(repo: Path, backend_name: str) -> None:
    async with ba.open_workspace(repo, backend=backend_name) as ws:
        top = await ws.fork("top")
        kid = await top.fork("kid")
        await kid.abort()
        assert top.state is ba.BranchState.OPEN
        assert top.children == []
        write(top, "t.txt", "t\n")
        await top.commit()
    assert (repo / "t.txt").exists()


async def test_nested_depth_8_commit_chain(repo: Path, backend_name: str) -> None:
    async with ba.open_workspace(repo, backend=backend_name) as ws:
        chain: list[WorkspaceBranch] = [await ws.fork("level0")]
        write(chain[0], "level0.txt", "0\n")
        for depth in range(1, 8):
            b = await chain[-1].fork(f"level{depth}")
            assert b.depth == depth
            assert b.parent is chain[-1]
            # Each level sees every level above it, as at its fork.
            for above in range(depth):
                assert (b.path / f"level{above}.txt").read_text() == f"{above}\n"
            write(b, f"level{depth}.txt", f"{depth}\n")
            chain.append(b)
        assert [b.name for b in ws.branches()] == [f"level{i}" for i in range(8)]
        for b in reversed(chain):
            await b.commit()
            assert b.state is ba.BranchState.COMMITTED
            target = b.parent.path if b.parent is not None else ws.path
            assert (target / f"level{b.depth}.txt").read_text() == f"{b.depth}\n"
            if b.parent is not None:
                assert b.parent.state is ba.BranchState.OPEN
        assert ws.branches() == []
    for depth in range(8):
        assert (repo / f"level{depth}.txt").read_text() == f"{depth}\n"


# -- logs --------------------------------------------------------------------------------


async def test_one_log_event_per_branch_outcome(repo: Path, backend_name: str) -> None:
    async with ba.open_workspace(repo, backend=backend_name) as ws:
        with structlog.testing.capture_logs() as logs:
            top = await ws.fork("top")
            kid = await top.fork("kid")
            loser = await top.fork("loser")
            dropped = await ws.fork("dropped")
            write(kid, "k.txt", "k\n")
            await kid.commit()
            await dropped.abort()
            await dropped.abort()
    by_event: dict[str, list[MutableMapping[str, Any]]] = {}
    for e in logs:
        by_event.setdefault(str(e["event"]), []).append(e)
    expected = {
        "branch_forked": [("top", None), ("kid", "top"), ("loser", "top"), ("dropped", None)],
        "branch_committed": [("kid", "top")],
        "branch_invalidated": [("loser", "top")],
        "branch_aborted": [("dropped", None)],
    }
    for event, pairs in expected.items():
        got = by_event.get(event, [])
        assert [(e["branch"], e["parent"]) for e in got] == pairs, event
        for e in got:
            assert isinstance(e["duration_ms"], float | int), (event, e)
            assert e["duration_ms"] >= 0
            assert e["log_level"] in ("info", "warning")
    assert loser.state is ba.BranchState.INVALIDATED
    assert top.state is ba.BranchState.ABORTED  # closed with the workspace


# -- crash survival ------------------------------------------------------------------------

_CRASHING_AGENT = textwrap.dedent("""
    import os, sys
    import anyio
    import branchagent as ba

    async def main():
        async with ba.open_workspace(sys.argv[1], backend=sys.argv[2]) as ws:
            top = await ws.fork("top")
            (top.path / "top.txt").write_text("from top\\n")
            (top.path / "README.md").write_text("# changed by top\\n")
            nested = await top.fork("nested")
            (nested.path / "nested").mkdir()
            (nested.path / "nested" / "n.txt").write_text("from nested\\n")
            os.remove(nested.path / "run.sh")
            print("forked", flush=True)
            os._exit(1)  # a crashed agent: no cleanup, the lock goes with the process

    anyio.run(main)
""")


@pytest.mark.parametrize("crashed_on", ["copy", "overlay"])
async def test_branches_survive_a_crashed_agent(repo: Path, tmp_path: Path,
                                                crashed_on: str) -> None:
    """Also on overlay, whose mounts outlive the crashed agent and are taken over."""
    if crashed_on == "overlay":
        from branchagent._backends.overlay import check_available
        from branchagent.exceptions import BackendUnavailable

        try:
            check_available()
        except BackendUnavailable as exc:
            pytest.skip(str(exc))
    script = tmp_path / "agent.py"
    script.write_text(_CRASHING_AGENT)
    base_before = tree_state(repo)
    res = await anyio.run_process([sys.executable, os.fspath(script), os.fspath(repo),
                                   crashed_on], check=False)
    assert res.returncode == 1, res.stderr.decode()
    assert res.stdout.decode().splitlines()[-1] == "forked"
    assert tree_state(repo) == base_before
    async with ba.open_workspace(repo, backend=crashed_on) as ws:
        branches = ws.branches()
        assert [b.name for b in branches] == ["top", "nested"]
        top, nested = branches
        assert top.parent is None
        assert nested.parent is top
        assert nested.depth == 1
        assert top.children == [nested]
        assert (top.path / "top.txt").read_text() == "from top\n"
        assert (nested.path / "nested" / "n.txt").read_text() == "from nested\n"
        assert (nested.path / "top.txt").read_text() == "from top\n"
        assert not (nested.path / "run.sh").exists()
        changes = {c.path: c.kind for c in await nested.changes()}
        assert changes == {"nested": ba.ChangeKind.ADDED, "nested/n.txt": ba.ChangeKind.ADDED,
                           "run.sh": ba.ChangeKind.DELETED}
        await nested.commit()
        assert (top.path / "nested" / "n.txt").exists()
        await top.commit()
        assert ws.branches() == []
    assert (repo / "top.txt").read_text() == "from top\n"
    assert (repo / "README.md").read_text() == "# changed by top\n"
    assert (repo / "nested" / "n.txt").read_text() == "from nested\n"
    assert not (repo / "run.sh").exists()
    assert (repo / "src" / "pkg" / "mod.py").exists()
