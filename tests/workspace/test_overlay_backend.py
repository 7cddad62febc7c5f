"""The overlay backend's own guarantees, beyond the conformance suite (which runs on it
too): snapshots of a parent's changes, layers and mounts released, clear refusals."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import branchagent as ba
from branchagent._backends.overlay import _mount, _umount, check_available

pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True)
def _needs_overlay() -> None:
    try:
        check_available()
    except ba.BackendUnavailable as exc:
        pytest.skip(str(exc))


def mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mounts") as f:
        return [line.split()[1] for line in f if line.split()[1].startswith(os.fspath(path))]


async def test_a_child_holds_its_parents_changes_at_the_fork_and_nothing_after(
        repo: Path) -> None:
    state = repo.parent / ".repo.branchagent"
    async with ba.open_workspace(repo, backend="overlay") as ws:
        p = await ws.fork()
        # Changes that overlayfs records specially: a whiteout, an opaque directory
        # (removed and made again), a renamed directory (a redirect).
        os.remove(p.path / "README.md")
        (p.path / "empty").rmdir()
        (p.path / "empty").mkdir()
        (p.path / "empty" / "new.txt").write_text("new\n")
        os.rename(p.path / "src", p.path / "lib")
        c = await p.fork()
        # The parent goes on writing: the child must not see it.
        (p.path / "later.txt").write_text("later\n")
        (p.path / "lib" / "pkg" / "mod.py").write_text("changed after the fork\n")
        assert not (c.path / "README.md").exists()
        assert os.listdir(c.path / "empty") == ["new.txt"]
        assert not (c.path / "src").exists()
        assert (c.path / "lib" / "pkg" / "mod.py").read_text() == "def f():\n    return 1\n"
        assert not (c.path / "later.txt").exists()
        # The child's own writes stay in the child.
        (c.path / "child.txt").write_text("c\n")
        assert not (p.path / "child.txt").exists()
        assert len(list((state / "overlay" / "layers").iterdir())) == 1
        await c.commit()  # into p: its changes on top of p's latest
        assert (p.path / "child.txt").read_text() == "c\n"
        assert (p.path / "later.txt").exists()
        # The frozen layer went with the child that stacked it.
        assert list((state / "overlay" / "layers").iterdir()) == []
        await p.commit()
    assert not (repo / "README.md").exists()
    assert sorted(os.listdir(repo / "lib" / "pkg")) == ["mod.py"]
    assert (repo / "lib" / "pkg" / "mod.py").read_text() == "changed after the fork\n"
    assert not (repo / "src").exists()
    assert sorted(os.listdir(repo / "empty")) == ["new.txt"]
    assert (repo / "child.txt").read_text() == "c\n"
    assert mounts_under(state) == []


async def test_no_mount_or_layer_outlives_its_branch_or_the_workspace(repo: Path) -> None:
    state = repo.parent / ".repo.branchagent"
    async with ba.open_workspace(repo, backend="overlay", keep_branches=True) as ws:
        a = await ws.fork()
        (a.path / "x").write_text("x")
        kids = [await a.fork() for _ in range(3)]
        assert len(mounts_under(state)) == 4
        await kids[0].abort()
        assert len(mounts_under(state)) == 3
        await a.abort()  # and its remaining children with it
        assert mounts_under(state) == []
        assert list((state / "overlay" / "layers").iterdir()) == []
        keep = await ws.fork("keep")
        (keep.path / "kept.txt").write_text("k")
    # A closed workspace leaves nothing mounted; its branches come back mounted on reopen.
    assert mounts_under(state) == []
    async with ba.open_workspace(repo, backend="overlay") as ws:
        (keep,) = ws.branches()
        assert (keep.path / "kept.txt").read_text() == "k"
        await keep.abort()
    assert mounts_under(state) == []


async def test_a_state_dir_that_cannot_hold_an_upper_layer_is_refused_clearly(
        repo: Path, tmp_path: Path) -> None:
    # An upper layer cannot live on overlayfs: put the state dir on an overlay mount.
    for d in ("lower", "upper", "work", "merged"):
        (tmp_path / d).mkdir()
    _mount([tmp_path / "lower"], tmp_path / "upper", tmp_path / "work", tmp_path / "merged")
    try:
        inside = tmp_path / "merged" / "state"
        with pytest.raises(ba.BackendUnavailable, match="put the state directory"):
            async with ba.open_workspace(repo, backend="overlay", state_dir=inside):
                pytest.fail("opened with its layers on overlayfs")
        assert mounts_under(inside) == []
    finally:
        _umount(tmp_path / "merged")
