"""Callable candidates in the sandbox: ``ba.Isolated(fn)`` through a strategy."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

import branchagent as ba
from branchagent._sandbox._spawn import isolation_available

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(
        not isolation_available(),
        reason="needs private mount and PID namespaces (unshare): not permitted here",
    ),
]


def write_through_absolute_path(branch: Any) -> bool:
    # Inside the sandbox the branch is at the workspace's own path.
    (Path(branch.path) / "winner.txt").write_text(f"pid {os.getpid()}\n")
    return True


def raises(branch: Any) -> bool:
    raise KeyError("no such thing")


def hog(branch: Any) -> bool:
    blob = bytearray(512 << 20)
    return len(blob) > 0


def names(root: Path) -> list[str]:
    return sorted(os.listdir(root))


async def test_isolated_candidates_run_in_the_sandbox(repo: Path) -> None:
    before = names(repo)
    async with ba.open_workspace(repo, backend="copy") as ws:
        outcome = await ba.BestOfN(
            [
                ba.Isolated(raises),
                ba.Isolated(hog, limits=ba.Limits(memory="64M")),
                ba.Isolated(write_through_absolute_path),
            ],
            scores=[3.0, 2.0, 1.0],
        ).run(ws)
    assert outcome.committed
    assert outcome.winner is not None
    assert outcome.winner.index == 2
    first, second, _ = outcome.results
    assert not first.success
    assert first.error is not None
    assert first.error.startswith("KeyError")
    assert not second.success
    assert second.error is not None
    assert "ProcessKilled" in second.error or "MemoryError" in second.error
    # The write went to the winner's branch and then, by the commit, to the base.
    assert names(repo) == sorted([*before, "winner.txt"])
    pid = int((repo / "winner.txt").read_text().split()[1])
    assert pid != os.getpid()
