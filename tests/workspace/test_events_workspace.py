"""The workspace emits branch events on purpose: fork, commit (with the losers), abort.

Progress displays and reports read these instead of log event names.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import anyio
import pytest

import branchagent as ba
from branchagent._events import Event, observe

pytestmark = pytest.mark.anyio


def _brief(events: list[Event]) -> list[tuple[object, ...]]:
    return [(e.kind, e.branch, e.parent, e.depth, dict(e.data)) for e in events]


async def test_fork_commit_abort_emit_in_order(repo: Path, backend_name: str) -> None:
    seen: list[Event] = []
    async with ba.open_workspace(repo, backend=backend_name) as ws:
        with observe(seen.append):
            a = await ws.fork("a")
            await ws.fork("loser")
            kid = await a.fork("kid")
            gone = await a.fork("gone")
            await gone.abort()
            (kid.path / "k.txt").write_text("kid\n")
            await kid.commit()
            await a.commit()  # into the base: "loser" is invalidated
            x = await ws.fork("x")
        await x.abort()  # outside the block: nobody hears it
    assert _brief(seen) == [
        ("branch_forked", "a", None, 0, {}),
        ("branch_forked", "loser", None, 0, {}),
        ("branch_forked", "kid", "a", 1, {}),
        ("branch_forked", "gone", "a", 1, {}),
        ("branch_aborted", "gone", None, 1, {}),
        ("branch_committed", "kid", "a", 1, {"invalidated": []}),
        ("branch_invalidated", "loser", None, 0, {}),
        ("branch_committed", "a", None, 0, {"invalidated": ["loser"]}),
        ("branch_forked", "x", None, 0, {}),
    ]


async def test_abort_of_a_subtree_and_commit_over_open_children(
        repo: Path, backend_name: str) -> None:
    """An abort is one event for the branch asked (its descendants go with it); a commit
    with open children invalidates them, each with its own event, before the commit's."""
    seen: list[Event] = []
    async with ba.open_workspace(repo, backend=backend_name) as ws:
        p = await ws.fork("p")
        c1 = await p.fork("c1")
        await c1.fork("g1")
        q = await ws.fork("q")
        await q.fork("q1")
        with observe(seen.append):
            await p.abort()
            await q.commit()
    kinds = [(e.kind, e.branch) for e in seen]
    assert kinds == [
        ("branch_aborted", "p"),
        ("branch_invalidated", "q1"),
        ("branch_committed", "q"),
    ]
    assert seen[-1].data["invalidated"] == ["q1"]
    assert seen[1].depth == 1


@contextlib.contextmanager
def backend_aborts(be: ba.Backend) -> Iterator[list[tuple[str, tuple[str, ...]]]]:
    """Every abort request ``be`` gets while the block runs: (method, names)."""
    calls: list[tuple[str, tuple[str, ...]]] = []
    orig_many, orig_one = be.abort_many, be.abort

    async def many(names: Sequence[str]) -> None:
        calls.append(("abort_many", tuple(names)))
        await orig_many(names)

    async def one(name: str) -> None:
        calls.append(("abort", (name,)))
        await orig_one(name)

    be.abort_many = many  # type: ignore[method-assign]
    be.abort = one  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        be.abort_many = orig_many  # type: ignore[method-assign]
        be.abort = orig_one  # type: ignore[method-assign]


async def test_losers_are_released_in_one_backend_request(
        repo: Path, backend_name: str) -> None:
    """N losers of a commit cost one ``abort_many``, not N ``abort`` round trips."""
    async with ba.open_workspace(repo, backend=backend_name) as ws:
        be = ws.backend
        with backend_aborts(be) as calls:
            win = await ws.fork("win")
            losers = [await ws.fork(f"l{i}") for i in range(5)]
            await losers[0].fork("l0kid")
            await win.commit()
            assert calls == [("abort_many", ("l0kid", "l0", "l1", "l2", "l3", "l4"))]
            assert all(not be.exists(b.name) for b in losers)
            assert all(b.state is ba.BranchState.INVALIDATED for b in losers)


async def test_workspace_abort_many_is_one_backend_request(
        repo: Path, backend_name: str, tmp_path: Path) -> None:
    """``Workspace.abort_many``: every open branch given, with its descendants, in one
    request; closed ones skipped; a foreign branch refused before anything is aborted."""
    other_repo = tmp_path / "other"
    other_repo.mkdir()
    async with ba.open_workspace(repo, backend=backend_name) as ws, \
            ba.open_workspace(other_repo, backend="copy") as other:
        be = ws.backend
        keep = await ws.fork("keep")
        gone = [await ws.fork(f"g{i}") for i in range(4)]
        kid = await gone[0].fork("g0kid")
        closed = await ws.fork("closed")
        await closed.abort()
        foreign = await other.fork("foreign")
        with backend_aborts(be) as calls:
            with pytest.raises(ba.BranchNotFound, match="not a branch of the workspace"):
                await ws.abort_many([gone[1], foreign])
            assert calls == []
            assert gone[1].state is ba.BranchState.OPEN
            seen: list[Event] = []
            with observe(seen.append):
                await ws.abort_many([kid, *gone, closed, gone[2]])
        assert calls == [("abort_many", ("g0kid", "g0", "g1", "g2", "g3"))]
        assert [b.state for b in [kid, *gone]] == [ba.BranchState.ABORTED] * 5
        assert all(not be.exists(b.name) for b in [kid, *gone])
        assert [b.name for b in ws.branches()] == ["keep"]
        assert keep.state is ba.BranchState.OPEN
        assert sorted(str(e.branch) for e in seen if e.kind == "branch_aborted") == \
            ["g0", "g1", "g2", "g3"]
        assert foreign.state is ba.BranchState.OPEN


async def test_a_strategy_releases_its_losers_in_one_request(repo: Path,
                                                             backend_name: str) -> None:
    async def candidate(b: ba.Branch) -> bool:
        await anyio.Path(b.path / "out.txt").write_text(b.name)
        return True

    async with ba.open_workspace(repo, backend=backend_name) as ws:
        with backend_aborts(ws.backend) as calls:
            outcome = await ba.BestOfN([candidate] * 5).run(ws)
        assert outcome.committed
        assert [c[0] for c in calls] == ["abort_many"]
        assert len(calls[0][1]) == 4
        assert ws.branches() == []


async def test_abort_many_is_idempotent(repo: Path, backend_name: str) -> None:
    async with ba.open_workspace(repo, backend=backend_name) as ws:
        be = ws.backend
        a = await ws.fork("a")
        await a.fork("a1")
        await be.abort_many(["a1", "a"])
        await be.abort_many(["a1", "a", "never"])
        assert not be.exists("a")
        assert not be.exists("a1")
        b = await ws.fork("b")
        (b.path / "new.txt").write_text("b\n")
        await b.commit()
        assert (repo / "new.txt").read_text() == "b\n"
