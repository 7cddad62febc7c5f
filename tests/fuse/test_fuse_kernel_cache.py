"""The kernel's caches of a FUSE branch stay true: names the kernel was told are missing
(it caches that answer), pages of files below the top layer (kept across opens), and
attributes, after nested commits, outside writes into the base and aborts."""

from __future__ import annotations

import os
import time
from pathlib import Path

import anyio
import pytest

import branchagent as ba
from _support import requires_fuse

pytestmark = [pytest.mark.anyio, requires_fuse]


def _missing(*paths: Path) -> None:
    """Look each path up twice (the second answer may come from the kernel's cache)."""
    for _ in range(2):
        for p in paths:
            assert not p.exists(), p


async def _appears(path: Path, text: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await anyio.Path(path).exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout} s")
        await anyio.sleep(0.02)
    assert await anyio.Path(path).read_text() == text


async def test_names_looked_up_as_missing_appear_after_a_nested_commit(repo: Path) -> None:
    async with ba.open_workspace(repo, backend="fuse", state_dir=repo.parent / "state") as ws:
        p = await ws.fork("parent")
        _missing(p.path / "new", p.path / "new" / "deep" / "x.txt",
                 p.path / "src" / "late.py", p.path / "empty" / "e.txt")
        c = await p.fork("child")
        (c.path / "new" / "deep").mkdir(parents=True)
        (c.path / "new" / "deep" / "x.txt").write_text("x\n")
        (c.path / "src" / "late.py").write_text("late\n")
        (c.path / "empty" / "e.txt").write_text("e\n")
        await c.commit()
        assert (p.path / "new" / "deep" / "x.txt").read_text() == "x\n"
        assert (p.path / "src" / "late.py").read_text() == "late\n"
        assert (p.path / "empty" / "e.txt").read_text() == "e\n"
        assert sorted(os.listdir(p.path / "src")) == ["late.py", "pkg"]
        await p.commit()
    assert (repo / "new" / "deep" / "x.txt").read_text() == "x\n"


async def test_names_looked_up_as_missing_appear_after_an_outside_write(repo: Path) -> None:
    """A top-level branch shows what is written into the base from outside (where the
    branch has not changed that path), also where it had just looked for it."""
    async with ba.open_workspace(repo, backend="fuse", state_dir=repo.parent / "state") as ws:
        b = await ws.fork()
        _missing(b.path / "out", b.path / "out" / "deeper" / "o.txt", b.path / "src" / "o.py")
        (repo / "out" / "deeper").mkdir(parents=True)
        (repo / "out" / "deeper" / "o.txt").write_text("o\n")
        (repo / "src" / "o.py").write_text("o\n")
        await _appears(b.path / "out" / "deeper" / "o.txt", "o\n")
        await _appears(b.path / "src" / "o.py", "o\n")
        await b.abort()


async def test_a_name_removed_in_a_branch_stays_missing_and_can_be_made_again(repo: Path) -> None:
    async with ba.open_workspace(repo, backend="fuse", state_dir=repo.parent / "state") as ws:
        b = await ws.fork()
        (b.path / "README.md").unlink()
        _missing(b.path / "README.md")
        (b.path / "README.md").write_text("again\n")
        assert (b.path / "README.md").read_text() == "again\n"
        (b.path / "README.md").unlink()
        await b.commit()
    assert not (repo / "README.md").exists()


async def test_a_write_through_the_branch_is_seen_in_the_base_after_commit(repo: Path) -> None:
    async with ba.open_workspace(repo, backend="fuse", state_dir=repo.parent / "state") as ws:
        before = (repo / "README.md").read_text()
        b = await ws.fork()
        assert (b.path / "README.md").read_text() == before  # (its pages are now cached)
        fd = os.open(b.path / "README.md", os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, b"more\n")
        finally:
            os.close(fd)
        await b.commit()
        assert (repo / "README.md").read_text() == before + "more\n"
        b2 = await ws.fork()
        assert (b2.path / "README.md").read_text() == before + "more\n"
        await b2.abort()


async def test_no_stale_page_after_abort_or_outside_write(repo: Path) -> None:
    async with ba.open_workspace(repo, backend="fuse", state_dir=repo.parent / "state") as ws:
        b = await ws.fork()
        assert (b.path / "src" / "pkg" / "mod.py").read_text().startswith("def f")
        (b.path / "src" / "pkg" / "mod.py").write_text("changed in the branch\n")
        await b.abort()
        b2 = await ws.fork()
        assert (b2.path / "src" / "pkg" / "mod.py").read_text().startswith("def f")
        (repo / "src" / "pkg" / "mod.py").write_text("changed outside, longer than before\n")
        deadline = time.monotonic() + 5
        while (b2.path / "src" / "pkg" / "mod.py").read_text() != (
                "changed outside, longer than before\n"):
            assert time.monotonic() < deadline, "the branch kept the base's old page"
            await anyio.sleep(0.02)
        await b2.abort()
