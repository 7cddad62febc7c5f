"""Crash safety of a commit into the base: fully before or fully after, at every step.

A subprocess commits a branch whose changes cover every kind of op (adds,
edits, deletions, a directory replaced by a file and the reverse, new empty
directories, symlinks, mode changes) and dies with ``os._exit(137)`` at a
chosen journal step. Reopening the workspace runs recovery; the base must
then be exactly the tree before the commit, or exactly the tree after it.
This is the quick CI subset; the randomized many-trial version is a benchmark.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import textwrap
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import anyio
import pytest

import branchagent as ba
from _support import Tree, tree_state
from branchagent import _journal
from branchagent._manifest import scan


@pytest.fixture
def anyio_backend() -> str:
    """Crash tests drive subprocesses; one event loop is enough."""
    return "asyncio"


def build_before(root: Path) -> None:
    (root / "sub" / "nested").mkdir(parents=True)
    (root / "sub" / "nested" / "deep.txt").write_text("deep v1\n")
    (root / "keep.txt").write_text("untouched\n")
    (root / "modify.txt").write_text("old content\n")
    (root / "delete.txt").write_text("bye\n")
    (root / "deldir" / "inner").mkdir(parents=True)
    (root / "deldir" / "a.txt").write_text("a\n")
    (root / "deldir" / "inner" / "b.txt").write_text("b\n")
    (root / "dir2file").mkdir()
    (root / "dir2file" / "x.txt").write_text("x\n")
    (root / "file2dir").write_text("I was a file\n")
    (root / "chmod.sh").write_text("#!/bin/sh\necho hi\n")
    (root / "chmod.sh").chmod(0o644)
    (root / "modedir").mkdir()
    (root / "modedir" / "in.txt").write_text("in\n")
    (root / "modedir").chmod(0o755)
    (root / "link_old").symlink_to("keep.txt")


def mutate(b: Path) -> None:
    """Every kind of change a commit has to apply."""
    (b / "modify.txt").write_text("new content, longer than before\n")
    (b / "sub" / "nested" / "deep.txt").write_text("deep v2\n")
    (b / "delete.txt").unlink()
    shutil.rmtree(b / "deldir")
    shutil.rmtree(b / "dir2file")
    (b / "dir2file").write_text("now a file\n")
    (b / "file2dir").unlink()
    (b / "file2dir").mkdir()
    (b / "file2dir" / "inner.txt").write_text("now inside a dir\n")
    (b / "new.txt").write_text("brand new\n")
    (b / "newdir" / "empty").mkdir(parents=True)
    (b / "newdir" / "inside.txt").write_text("inside\n")
    (b / "empty2").mkdir()
    (b / "newlink").symlink_to("keep.txt")
    (b / "dirlink").symlink_to("sub")
    (b / "link_old").unlink()
    (b / "link_old").symlink_to("modify.txt")
    (b / "chmod.sh").chmod(0o755)
    (b / "modedir").chmod(0o750)
    (b / "rodir").mkdir()
    (b / "rodir" / "ro.txt").write_text("read only dir\n")
    (b / "rodir").chmod(0o555)


class Trial:
    """One workspace whose branch ``b`` holds the changes, left open on disk."""

    def __init__(self, base: Path, backend: str = "copy", nested: bool = False) -> None:
        self.repo = base / "repo"
        self.state_dir = base / "state"
        self.backend = backend
        #: Nested: ``b`` is a child of branch ``p`` and commits into it, not into the base.
        self.nested = nested
        self.before: Tree = {}
        self.after: Tree = {}

    async def prepare(self) -> None:
        self.repo.mkdir(parents=True)
        build_before(self.repo)
        self.before = tree_state(self.repo)
        async with self.open(keep_branches=True) as ws:
            b = await (await ws.fork("p")).fork("b") if self.nested else await ws.fork("b")
            mutate(b.path)
            self.after = tree_state(b.path)
        assert self.before != self.after

    def open(self, *, keep_branches: bool = False) -> AbstractAsyncContextManager[ba.Workspace]:
        return ba.open_workspace(self.repo, backend=self.backend, state_dir=self.state_dir,
                                 keep_branches=keep_branches)

    def target(self, ws: ba.Workspace) -> Path:
        """Where ``b`` commits: branch ``p``'s tree, or the base."""
        return ws.get("p").path if self.nested else self.repo

    def journal_entries(self) -> list[str]:
        journal = self.state_dir / "journal"
        return sorted(os.listdir(journal)) if journal.is_dir() else []


async def record_steps(trial: Trial, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    steps: list[str] = []
    monkeypatch.setattr(_journal, "FAULT_HOOK", steps.append)
    async with trial.open(keep_branches=True) as ws:
        await ws.get("b").commit()
    monkeypatch.setattr(_journal, "FAULT_HOOK", None)
    return steps


_CRASH_SCRIPT = textwrap.dedent("""
    import os, sys
    import anyio
    import branchagent as ba
    from branchagent import _journal

    repo, state_dir, step, backend = sys.argv[1:5]

    def hook(s):
        if s == step:
            os._exit(137)

    _journal.FAULT_HOOK = hook

    async def main():
        async with ba.open_workspace(repo, backend=backend, state_dir=state_dir) as ws:
            await ws.get("b").commit()
        os._exit(3)  # the step never came

    anyio.run(main)
""")


async def crash_at(trial: Trial, step: str, script: Path) -> None:
    res = await anyio.run_process(
        [sys.executable, os.fspath(script), os.fspath(trial.repo), os.fspath(trial.state_dir),
         step, trial.backend],
        check=False,
    )
    assert res.returncode == 137, (step, res.returncode, res.stderr.decode())


@pytest.mark.anyio
async def test_commit_applies_every_kind_of_change(tmp_path: Path) -> None:
    trial = Trial(tmp_path)
    await trial.prepare()
    async with trial.open() as ws:
        await ws.get("b").commit()
        assert ws.branches() == []
    assert tree_state(trial.repo) == trial.after
    assert (trial.repo / "rodir").stat().st_mode & 0o777 == 0o555
    assert os.readlink(trial.repo / "link_old") == "modify.txt"
    assert (trial.repo / "newdir" / "empty").is_dir()
    assert trial.journal_entries() == []


def _overlay_or_skip() -> None:
    from branchagent._backends.overlay import check_available
    from branchagent.exceptions import BackendUnavailable

    try:
        check_available()
    except BackendUnavailable as exc:
        pytest.skip(str(exc))


@pytest.mark.anyio
@pytest.mark.parametrize(("backend", "nested"), [("copy", False), ("copy", True),
                                                 ("overlay", False), ("overlay", True)])
async def test_crash_at_every_step_is_all_or_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str, nested: bool
) -> None:
    """Also on the overlay backend, where a commit into a branch moves the parent's old
    entries out of its mount into the journal by copy (another mount: no rename)."""
    if backend == "overlay":
        _overlay_or_skip()
    probe = Trial(tmp_path / "probe", backend, nested)
    await probe.prepare()
    steps = await record_steps(probe, monkeypatch)
    async with probe.open(keep_branches=True) as ws:
        assert tree_state(probe.target(ws)) == probe.after
    n_ops = len(steps) - 3
    assert steps == ["intent", *(f"op:{i}" for i in range(n_ops)), "done", "cleaned"]
    assert n_ops >= 15, steps

    script = tmp_path / "crash.py"
    script.write_text(_CRASH_SCRIPT)
    limiter = anyio.CapacityLimiter(4)

    async def one(i: int, step: str) -> None:
        async with limiter:
            trial = Trial(tmp_path / f"t{i}", backend, nested)
            await trial.prepare()
            await crash_at(trial, step, script)
            await check_recovered(trial, step)

    async with anyio.create_task_group() as tg:
        for i, step in enumerate(steps):
            tg.start_soon(one, i, step)


async def check_recovered(trial: Trial, step: str) -> None:
    finished = step in ("done", "cleaned")
    async with trial.open() as ws:  # recovery runs here
        assert trial.journal_entries() == [], step
        got = tree_state(trial.target(ws))
        kept = ["p"] if trial.nested else []
        if trial.nested:
            assert tree_state(trial.repo) == trial.before, step
        if finished:
            assert got == trial.after, f"crash at {step}: target is not the after-tree"
            # The committed branch's storage went with the commit: no phantom branch.
            assert [b.name for b in ws.branches()] == kept, step
            return
        assert got == trial.before, f"crash at {step}: target is not the before-tree"
        # The branch survived with its changes intact and still commits.
        assert [b.name for b in ws.branches()] == [*kept, "b"], step
        b = ws.get("b")
        assert tree_state(b.path) == trial.after, step
        await b.commit()
        assert tree_state(trial.target(ws)) == trial.after, step


@pytest.mark.anyio
async def test_enospc_at_every_op_rolls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    probe = Trial(tmp_path / "probe")
    await probe.prepare()
    n_ops = len(await record_steps(probe, monkeypatch)) - 3
    for k in range(n_ops):
        trial = Trial(tmp_path / f"k{k}")
        await trial.prepare()

        def fail(step: str, k: int = k) -> None:
            if step == f"op:{k}":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "somefile")

        async with trial.open() as ws:
            b = ws.get("b")
            changes = await b.changes()
            monkeypatch.setattr(_journal, "FAULT_HOOK", fail)
            with pytest.raises(ba.CommitFailed) as info:
                await b.commit()
            monkeypatch.setattr(_journal, "FAULT_HOOK", None)
            assert isinstance(info.value, OSError)
            assert info.value.errno == errno.ENOSPC
            assert "rolled back" in str(info.value)
            assert tree_state(trial.repo) == trial.before, f"op:{k}"
            assert trial.journal_entries() == [], f"op:{k}"
            assert b.state is ba.BranchState.OPEN
            assert tree_state(b.path) == trial.after, f"op:{k}"
            assert await b.changes() == changes
            await b.commit()
            assert tree_state(trial.repo) == trial.after, f"op:{k}"


@pytest.mark.anyio
async def test_failure_inside_an_op_rolls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure after the old entry was moved away but before the new one is placed."""
    real_place = _journal._place
    probe = Trial(tmp_path / "probe")
    await probe.prepare()
    calls: list[str] = []

    def counting(root: Path, op: _journal.Op, *, as_root: bool) -> None:
        calls.append(op.path)
        real_place(root, op, as_root=as_root)

    monkeypatch.setattr(_journal, "_place", counting)
    await record_steps(probe, monkeypatch)
    n_places = len(calls)
    assert n_places >= 10
    for k in range(n_places):
        trial = Trial(tmp_path / f"k{k}")
        await trial.prepare()
        seen = [0]

        def failing(root: Path, op: _journal.Op, *, as_root: bool, k: int = k,
                    seen: list[int] = seen) -> None:
            seen[0] += 1
            if seen[0] == k + 1:
                raise OSError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(root / op.path))
            real_place(root, op, as_root=as_root)

        monkeypatch.setattr(_journal, "_place", failing)
        async with trial.open() as ws:
            b = ws.get("b")
            with pytest.raises(ba.CommitFailed) as info:
                await b.commit()
            assert info.value.errno == errno.EACCES
            assert info.value.filename is not None
            assert tree_state(trial.repo) == trial.before, f"place #{k}"
            assert tree_state(b.path) == trial.after, f"place #{k}"
            assert b.state is ba.BranchState.OPEN
            monkeypatch.setattr(_journal, "_place", real_place)
            await b.commit()
            assert tree_state(trial.repo) == trial.after


@pytest.mark.anyio
async def test_failure_writing_the_intent_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trial = Trial(tmp_path)
    await trial.prepare()

    def fail(step: str) -> None:
        if step == "intent":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    async with trial.open() as ws:
        b = ws.get("b")
        monkeypatch.setattr(_journal, "FAULT_HOOK", fail)
        with pytest.raises(ba.CommitFailed) as info:
            await b.commit()
        monkeypatch.setattr(_journal, "FAULT_HOOK", None)
        assert info.value.errno == errno.ENOSPC
        assert tree_state(trial.repo) == trial.before
        assert trial.journal_entries() == []
        assert b.state is ba.BranchState.OPEN
        await b.commit()
    assert tree_state(trial.repo) == trial.after


@pytest.mark.anyio
async def test_failure_writing_the_done_marker_rolls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trial = Trial(tmp_path)
    await trial.prepare()
    real_write = _journal._write_durable

    def failing(path: Path, data: bytes) -> None:
        if path.name == "done":
            raise OSError(errno.EIO, os.strerror(errno.EIO), os.fspath(path))
        real_write(path, data)

    async with trial.open() as ws:
        b = ws.get("b")
        monkeypatch.setattr(_journal, "_write_durable", failing)
        with pytest.raises(ba.CommitFailed) as info:
            await b.commit()
        monkeypatch.setattr(_journal, "_write_durable", real_write)
        assert info.value.errno == errno.EIO
        assert tree_state(trial.repo) == trial.before
        assert tree_state(b.path) == trial.after
        assert trial.journal_entries() == []
        assert b.state is ba.BranchState.OPEN
        await b.commit()
    assert tree_state(trial.repo) == trial.after


def _crash_in_process(trial: Trial, step: str) -> None:
    """Leave a transaction behind as a crash would, without a subprocess."""

    class Crash(BaseException):
        pass

    def hook(s: str) -> None:
        if s == step:
            raise Crash

    # _rollback runs on BaseException too; so stop it from undoing by swapping it out.
    real_rollback, real_remove = _journal._rollback, _journal._remove_txn
    _journal.FAULT_HOOK = hook
    _journal._rollback = lambda *a, **k: None
    _journal._remove_txn = lambda txn: None
    try:
        anyio.run(_commit_b, trial)
    except Crash:
        pass
    finally:
        _journal.FAULT_HOOK = None
        _journal._rollback = real_rollback
        _journal._remove_txn = real_remove


async def _commit_b(trial: Trial) -> None:
    async with trial.open(keep_branches=True) as ws:
        await ws.get("b").commit()


def test_rollback_is_idempotent(tmp_path: Path) -> None:
    trial = Trial(tmp_path)
    anyio.run(trial.prepare)
    # Crash in the middle of the ops.
    mid = "op:7"
    _crash_in_process(trial, mid)
    (txn_name,) = trial.journal_entries()
    txn = trial.state_dir / "journal" / txn_name
    assert tree_state(trial.repo) not in (trial.before, trial.after)
    plan = json.loads((txn / "plan.json").read_bytes())
    ops = [_journal.Op.from_json(o) for o in plan["ops"]]
    root = Path(plan["root"])
    _journal._rollback(root, txn, ops)  # a recovery that crashed before removing the txn
    assert tree_state(trial.repo) == trial.before
    _journal._rollback(root, txn, ops)  # ... and ran again
    assert tree_state(trial.repo) == trial.before
    report = _journal.recover(trial.state_dir / "journal")  # ... and again, fully
    assert report == [f"{txn_name}: rolled back"]
    assert tree_state(trial.repo) == trial.before
    assert trial.journal_entries() == []
    assert _journal.recover(trial.state_dir / "journal") == []

    async def commit_again() -> None:
        async with trial.open() as ws:
            (b,) = ws.branches()
            assert tree_state(b.path) == trial.after
            await b.commit()

    anyio.run(commit_again)
    assert tree_state(trial.repo) == trial.after


@pytest.mark.parametrize("survive", [0, 3, 7, 12])
def test_recovery_interrupted_midway_is_recovered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, survive: int
) -> None:
    """A crash during recovery: the next recovery finishes the rollback."""
    trial = Trial(tmp_path)
    anyio.run(trial.prepare)
    _crash_in_process(trial, "op:14")
    journal = trial.state_dir / "journal"
    real_rename = os.rename
    renames = [0]

    def dying_rename(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        renames[0] += 1
        if renames[0] > survive:
            raise OSError(errno.EIO, "the machine went down")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", dying_rename)
    with pytest.raises(OSError, match="went down"):
        _journal.recover(journal)
    monkeypatch.setattr(os, "rename", real_rename)
    (txn_name,) = trial.journal_entries()
    assert _journal.recover(journal) == [f"{txn_name}: rolled back"]
    assert tree_state(trial.repo) == trial.before
    assert trial.journal_entries() == []


def test_recover_discards_a_transaction_without_intent(tmp_path: Path) -> None:
    journal = tmp_path / "journal"
    (journal / "txn-0" / "backup").mkdir(parents=True)
    (journal / "txn-0" / "plan.json.tmp").write_text("{half")
    (journal / "not-a-txn").mkdir()
    assert _journal.recover(journal) == ["txn-0: discarded (no intent)"]
    assert sorted(os.listdir(journal)) == ["not-a-txn"]
    assert _journal.recover(tmp_path / "missing") == []


def test_recover_refuses_an_unreadable_plan(tmp_path: Path) -> None:
    journal = tmp_path / "journal"
    (journal / "txn-0").mkdir(parents=True)
    (journal / "txn-0" / "plan.json").write_text("{not json")
    with pytest.raises(ba.WorkspaceCorrupt, match="unreadable commit journal"):
        _journal.recover(journal)
    assert (journal / "txn-0" / "plan.json").exists()  # evidence kept for a human


def test_build_plan_orders_parents_first_and_skips_moved_subtrees(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    build_before(base)
    branch = tmp_path / "branch"
    shutil.copytree(base, branch, symlinks=True)
    mutate(branch)
    before, _ = scan(base)
    after, _ = scan(branch)
    from branchagent._manifest import changed_paths

    ops = _journal.build_plan(changed_paths(before, after), before, after, lambda p: branch / p)
    paths = [op.path for op in ops]
    assert len(paths) == len(set(paths))
    assert "deldir" in paths
    assert not any(p.startswith("deldir/") for p in paths)  # moved away whole
    assert paths.index("file2dir") < paths.index("file2dir/inner.txt")
    kinds = {op.path: op.kind for op in ops}
    assert kinds["dir2file"] is _journal.OpKind.REPLACE
    assert kinds["modedir"] is _journal.OpKind.ATTR
    assert kinds["delete.txt"] is _journal.OpKind.REMOVE
    assert kinds["new.txt"] is _journal.OpKind.ADD
    for op in ops:
        assert _journal.Op.from_json(json.loads(json.dumps(op.to_json()))) == op
