"""The workspace emits branch events on purpose: fork, commit (with the losers), abort.

Progress displays and reports read these instead of log event names.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

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


async def test_losers_are_released_in_one_backend_request(
        repo: Path, backend_name: str) -> None:
    """N losers of a commit cost one ``abort_many``, not N ``abort`` round trips."""
    calls: list[tuple[str, tuple[str, ...]]] = []
    async with ba.open_workspace(repo, backend=backend_name) as ws:
        be = ws.backend
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
            win = await ws.fork("win")
            losers = [await ws.fork(f"l{i}") for i in range(5)]
            await losers[0].fork("l0kid")
            await win.commit()
            assert calls == [("abort_many", ("l0kid", "l0", "l1", "l2", "l3", "l4"))]
            assert all(not be.exists(b.name) for b in losers)
            assert all(b.state is ba.BranchState.INVALIDATED for b in losers)
        finally:
            be.abort_many = orig_many  # type: ignore[method-assign]
            be.abort = orig_one  # type: ignore[method-assign]


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
