"""Strategies over live interpreters: ``ba.InSession`` candidates in TreeSearch and Beam.

Each node's candidate acts on a session whose memory is its parent node's (a fork),
so the setup runs once per root node and every node sees exactly its path's steps.
Real sessions (namespaces, cgroups) on the real backends.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import anyio
import pytest

import branchagent as ba
from _support import processes_with
from branchagent._sandbox._run import isolation_available

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(not isolation_available(),
                       reason="sessions need private mount and PID namespaces "
                              "(unshare --mount --pid): not permitted here"),
]

SETUP = """
import json, time
setup_at = time.monotonic_ns()
history = []
table = [{'x': i, 'y': (i * 7) % 5} for i in range(20)]
OPS = {
    'double': lambda t: [dict(r, x=r['x'] * 2) for r in t],
    'drop_odd': lambda t: [r for r in t if r['x'] % 2 == 0],
    'bump_y': lambda t: [dict(r, y=r['y'] + 1) for r in t],
}
def score(t):
    return sum(r['x'] + r['y'] for r in t) / 100
"""
OPS = ("double", "drop_odd", "bump_y")


def local(path: list[str]) -> list[dict[str, int]]:
    """The table after ``path``, computed here (the model of the session's memory)."""
    table = [{"x": i, "y": (i * 7) % 5} for i in range(20)]
    for op in path:
        if op == "double":
            table = [dict(r, x=r["x"] * 2) for r in table]
        elif op == "drop_odd":
            table = [r for r in table if r["x"] % 2 == 0]
        else:
            table = [dict(r, y=r["y"] + 1) for r in table]
    return table


def step(op: str, records: list[tuple[list[str], int, list[Any]]]) -> ba.InSession:
    async def act(s: ba.Session) -> float:
        await s.exec(f"history.append({op!r})\ntable = OPS[{op!r}](table)\n"
                     "open('table.json', 'w').write(json.dumps(table))")
        history, setup_at, table = await s.eval("history, setup_at, table")
        records.append((history, setup_at, table))
        return float(await s.eval("score(table)"))

    return ba.InSession(act, setup=SETUP)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("policy", ["best-first", "mcts"])
async def test_tree_search_over_sessions(repo: Path, forking_backend: str,
                                         policy: Literal["best-first", "mcts"]) -> None:
    records: list[tuple[list[str], int, list[Any]]] = []
    with anyio.fail_after(120):
        async with ba.open_workspace(repo, backend=forking_backend) as ws:
            outcome = await ba.TreeSearch(
                [step(op, records) for op in OPS],
                expand=lambda _b, _d: [step(op, records) for op in OPS],
                policy=policy, budget=12, max_depth=2,
            ).run(ws)
    assert len(records) == len(outcome.results) == 12
    setups: dict[str, set[int]] = {}
    for history, setup_at, table in records:
        # Every node's memory is exactly its path's: its parent's table, one step on.
        assert table == local(history), history
        # The setup ran once per root node; deeper nodes inherited it by fork.
        setups.setdefault(history[0], set()).add(setup_at)
    assert all(len(v) == 1 for v in setups.values()), setups
    assert any(len(h) >= 2 for h, _, _ in records), "the search never went deeper"
    # The winner's files (written from its memory) are committed into the base.
    assert outcome.committed
    committed = json.loads((repo / "table.json").read_text())
    top = max(sum(r["x"] + r["y"] for r in t) for _, _, t in records)
    assert sum(r["x"] + r["y"] for r in committed) == top
    assert any(t == committed for _, _, t in records)
    assert processes_with(str(repo)) == []


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_beam_over_sessions(repo: Path) -> None:
    records: list[tuple[list[str], int, list[Any]]] = []
    with anyio.fail_after(120):
        async with ba.open_workspace(repo, backend="copy") as ws:
            outcome = await ba.Beam(
                [step(op, records) for op in OPS],
                expand=lambda _b, _d: [step(op, records) for op in OPS],
                beam_width=2, max_depth=2,
            ).run(ws)
    for history, _, table in records:
        assert table == local(history), history
    assert outcome.committed
    assert processes_with(str(repo)) == []


async def test_in_session_needs_a_workspace_branch() -> None:
    class Fake:
        parent = None

    with pytest.raises(TypeError, match="workspace branch"):
        await ba.InSession(lambda s: s.eval("1"))(Fake())  # type: ignore[arg-type]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_winner_session_lives_on_in_the_target(repo: Path,
                                                        forking_backend: str) -> None:
    """A winner that is a child of a branch target leaves its interpreter in the target:
    its memory as the winner left it, the target's files; a second search forks from it."""
    records: list[tuple[list[str], int, list[Any]]] = []
    with anyio.fail_after(120):
        async with ba.open_workspace(repo, backend=forking_backend) as ws:
            target = await ws.fork()
            outcome = await ba.BestOfN([step(op, records) for op in OPS]).run(target)
            assert outcome.committed
            survivor = ba.strategy.session_of(target)
            assert survivor is not None
            assert survivor.branch is target
            history, table = await survivor.eval("history, table")
            assert outcome.winner is not None
            assert history == [OPS[outcome.winner.index]]
            assert table == local(history)
            assert json.loads((target.path / "table.json").read_text()) == table
            assert await survivor.eval("json.load(open('table.json'))") == table
            # Only the winner's interpreter is left (the losers' ended with their branches).
            assert [s for s in target._sessions if not s.closed] == [survivor]
            # A second search over the target continues from the winner's memory.
            records.clear()
            again = await ba.BestOfN([step("double", records)]).run(target)
            assert again.committed
            assert records[0][0] == [*history, "double"]
            after = ba.strategy.session_of(target)
            assert after is not None
            assert after is not survivor
            assert await after.eval("history") == [*history, "double"]
            assert not survivor.closed  # the target's own session goes on, no longer its node
            # Deeper winners: the lineage's node sessions end (a fork follows one commit).
            deep = await ws.fork()
            records.clear()
            tree = await ba.TreeSearch(
                [step("drop_odd", records)],
                expand=lambda _b, _d: [step("double", records)],
                budget=2, max_depth=2,
            ).run(deep)
            assert tree.committed
            assert tree.winner is not None
            assert tree.winner.depth == 1  # a child of a root node: two commits
            assert ba.strategy.session_of(deep) is None
    assert processes_with(str(repo)) == []


async def test_speculative_execution_refuses_sessions() -> None:
    act = ba.InSession(lambda s: s.eval("1"))
    with pytest.raises(ba.InvalidCandidates, match="follows one commit"):
        ba.SpeculativeExecution(lambda _b, _k: [act], goal=act)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_speculative_execution_refuses_drafted_sessions(repo: Path) -> None:
    act = ba.InSession(lambda s: s.exec("open('x.txt', 'w').write('x')"))
    async with ba.open_workspace(repo, backend="copy") as ws:
        with pytest.raises(ba.InvalidCandidates, match="drafted action 0"):
            await ba.SpeculativeExecution(lambda _b, _k: [act]).run(ws)
        assert ws.branches() == []
    assert not (repo / "x.txt").exists()
