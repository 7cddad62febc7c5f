"""Merge: the union of the successes' non-conflicting changes, verified, committed."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import branchagent as ba
from _support import requires_fuse

pytestmark = pytest.mark.anyio

BACKENDS = ["copy", pytest.param("fuse", marks=requires_fuse)]

Edit = Callable[[Path], None]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def cand(edit: Edit, score: float | None = None, ok: bool = True) -> ba.Candidate:
    async def candidate(b: ba.Branch) -> ba.Verdict:
        edit(b.path)
        return ba.Verdict(ok, score)

    return candidate


def write(rel: str, text: str) -> Edit:
    def edit(root: Path) -> None:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)

    return edit


def run_all(*edits: Edit) -> Edit:
    def edit(root: Path) -> None:
        for e in edits:
            e(root)

    return edit


@pytest.mark.parametrize("backend", BACKENDS)
async def test_disjoint_successes_are_merged_with_deletions_modes_and_symlinks(
    repo: Path, backend: str
) -> None:
    def delete_empty(root: Path) -> None:
        (root / "empty").rmdir()

    def chmod_and_relink(root: Path) -> None:
        (root / "run.sh").chmod(0o700)
        (root / "link").unlink()
        (root / "link").symlink_to("src/pkg/mod.py")

    def fail_all(root: Path) -> None:
        (root / "README.md").write_text("loser\n")

    candidates = [
        cand(write("README.md", "# merged\n"), score=1.0),
        cand(write("src/pkg/new.py", "NEW = 1\n"), score=3.0),
        cand(delete_empty, score=2.0),
        cand(chmod_and_relink),
        cand(fail_all, ok=False),
    ]
    async with ba.open_workspace(repo, backend=backend) as ws:
        outcome = await ba.Merge(candidates).run(ws)
        assert ws.branches() == []
    assert outcome.committed
    assert outcome.merged == (1, 2, 0, 3)  # best-first: scores 3, 2, 1, then none
    assert outcome.winner is not None
    assert outcome.winner.index == 5 == len(candidates)
    assert outcome.winner.info["merged"] == [1, 2, 0, 3]
    assert outcome.info["conflicts"] == {}
    assert outcome.info["merge_verified"] is True
    assert (repo / "README.md").read_text() == "# merged\n"
    assert (repo / "src/pkg/new.py").read_text() == "NEW = 1\n"
    assert not (repo / "empty").exists()
    assert stat.S_IMODE(os.lstat(repo / "run.sh").st_mode) == 0o700
    assert os.readlink(repo / "link") == "src/pkg/mod.py"
    assert (repo / "src/pkg/mod.py").read_text() == "def f():\n    return 1\n"


@pytest.mark.parametrize("backend", BACKENDS)
async def test_conflicting_successes_keep_the_best_of_each_group(
    repo: Path, backend: str
) -> None:
    def drop_pkg(root: Path) -> None:
        (root / "src/pkg/mod.py").unlink()
        (root / "src/pkg").rmdir()

    candidates = [
        cand(write("README.md", "low\n"), score=1.0),           # conflicts with 1
        cand(write("README.md", "high\n"), score=5.0),
        cand(write("notes.txt", "n\n"), score=0.5),
        cand(write("src/pkg/extra.py", "E = 1\n"), score=4.0),
        cand(drop_pkg, score=2.0),                               # under 3's directory: no
    ]
    async with ba.open_workspace(repo, backend=backend) as ws:
        outcome = await ba.Merge(candidates).run(ws)
        assert ws.branches() == []
    assert outcome.committed
    assert outcome.merged == (1, 3, 2)
    assert outcome.info["conflicts"] == {"0": 1, "4": 3}
    assert (repo / "README.md").read_text() == "high\n"
    assert (repo / "notes.txt").read_text() == "n\n"
    assert (repo / "src/pkg/extra.py").read_text() == "E = 1\n"
    assert (repo / "src/pkg/mod.py").exists()


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_merge_that_fails_verification_commits_the_best_single(
    repo: Path, backend: str
) -> None:
    # Each half is fine alone; together they break the check (both files present).
    def verify(b: ba.Branch) -> bool:
        return not ((b.path / "a.txt").exists() and (b.path / "b.txt").exists())

    candidates = [cand(write("a.txt", "a\n"), score=1.0), cand(write("b.txt", "b\n"), score=2.0)]
    async with ba.open_workspace(repo, backend=backend) as ws:
        outcome = await ba.Merge(candidates, verify=verify).run(ws)
        assert ws.branches() == []
    assert outcome.committed
    assert outcome.merged == ()
    assert outcome.info["merge_verified"] is False
    assert outcome.winner is not None
    assert outcome.winner.index == 1
    assert (repo / "b.txt").exists()
    assert not (repo / "a.txt").exists()
    assert outcome.results[2].info["merged"] == [1, 0]  # the merge that was tried


async def test_evaluate_scores_candidates_and_verifies_the_merge(repo: Path) -> None:
    seen: list[set[str]] = []

    def evaluate(b: ba.Branch) -> float:
        names = {p.name for p in b.path.iterdir()}
        seen.append(names)
        return float(len(names))

    candidates = [cand(write("a.txt", "a\n")), cand(write("b.txt", "b\n"))]
    async with ba.open_workspace(repo, backend="copy") as ws:
        outcome = await ba.Merge(candidates, evaluate=evaluate).run(ws)
    assert outcome.merged == (0, 1)
    assert any({"a.txt", "b.txt"} <= names for names in seen)  # the merged branch was checked
    assert outcome.winner is not None
    assert outcome.winner.info["verify"]["success"] is True


async def test_a_single_success_is_committed_without_a_merge(repo: Path) -> None:
    candidates = [cand(write("a.txt", "a\n")), cand(write("b.txt", "b\n"), ok=False)]
    async with ba.open_workspace(repo, backend="copy") as ws:
        outcome = await ba.Merge(candidates).run(ws)
    assert outcome.committed
    assert outcome.merged == ()
    assert outcome.winner is not None
    assert outcome.winner.index == 0
    assert len(outcome.results) == 2
    assert not (repo / "b.txt").exists()


async def test_no_success_commits_nothing(repo: Path) -> None:
    async with ba.open_workspace(repo, backend="copy") as ws:
        outcome = await ba.Merge([cand(write("a.txt", "a\n"), ok=False)]).run(ws)
        assert ws.branches() == []
    assert not outcome.committed
    assert not (repo / "a.txt").exists()


async def test_merge_is_registered_and_reports_in_json(repo: Path) -> None:
    assert ba.get_strategy("merge") is ba.Merge
    candidates: list[Any] = [cand(write("a.txt", "a\n")), cand(write("b.txt", "b\n"))]
    async with ba.open_workspace(repo, backend="copy") as ws:
        outcome = await ba.Merge(candidates, timeout=30).run(ws)
    assert '"merged": [0, 1]' in outcome.to_json()
    assert "timeout=30.0" in repr(ba.Merge(candidates, timeout=30))
