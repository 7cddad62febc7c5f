"""TreeSearch on real branches (copy backend), on asyncio and trio.

Nodes are nested branches: a candidate sees its ancestors' changes, and the
winner's whole path commits level by level into the target. Every test also
checks that no path leaves a branch open (the ``workspace`` helper asserts it
before closing); the property test at the end drives random candidate,
evaluate and expand behaviours through both policies.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

import branchagent as ba
from _support import (
    check_tree,
    last_step,
    lineage,
    make_repo,
    processes_with,
    sleep_token,
    snapshot,
    step,
    workspace,
)

pytestmark = pytest.mark.anyio


# -- helpers --------------------------------------------------------------------------


def by_table(table: Mapping[str, Sequence[tuple[str, float]]],
             calls: list[str] | None = None) -> Callable[[ba.Branch, int], Any]:
    """An expand that proposes ``table[last step]`` (and records the order it was asked in)."""

    async def expand(b: ba.Branch, depth: int) -> list[ba.Candidate]:
        last = last_step(b)
        if calls is not None:
            calls.append(last)
        return [step(name, score) for name, score in table.get(last, ())]

    return expand


# -- best-first -------------------------------------------------------------------------


# "a" looks best but leads nowhere; the solution is three levels below "b".
PUZZLE: dict[str, list[tuple[str, float]]] = {
    "": [], "a": [("a1", 0.8), ("a2", 0.7)], "a1": [], "a2": [("a2x", 0.1)], "a2x": [],
    "b": [("b1", 0.6)], "b1": [("b2", 0.65)], "b2": [("b3", 0.66)], "b3": [],
}


async def solved(b: ba.Branch) -> ba.Verdict:
    return ba.Verdict((b.path / "path.txt").read_text() == "/b/b1/b2/b3")


async def test_best_first_backtracks_to_a_depth_3_solution(repo: Path) -> None:
    calls: list[str] = []
    before = snapshot(repo)
    async with workspace(repo) as ws:
        with capture_logs() as logs:
            outcome = await ba.TreeSearch(
                [step("a", 0.9), step("b", 0.5)], expand=by_table(PUZZLE, calls),
                evaluate=solved, max_depth=3,
            ).run(ws)
    # Best-first: the promising "a" subtree is exhausted first, then the search backtracks.
    assert calls == ["a", "a1", "a2", "b", "b1", "b2", "a2x"]
    check_tree(outcome)
    assert outcome.committed
    assert outcome.strategy == "tree_search"
    w = outcome.winner
    assert w is not None
    assert (w.depth, w.success, w.score) == (3, True, 0.66)
    assert [r.info["candidate"] for r in lineage(outcome, w.index)] == [1, 0, 0, 0]
    assert [r.depth for r in lineage(outcome, w.index)] == [0, 1, 2, 3]
    assert [r.success for r in outcome.results].count(True) == 1
    assert outcome.info["stopped"] == "exhausted"
    assert outcome.info["nodes"] == len(outcome.results) == 8
    assert outcome.info["depth_reached"] == 3
    # Every level's changes landed in the base, and nothing from the "a" subtree.
    after = snapshot(repo)
    assert after == {**before, "path.txt": b"/b/b1/b2/b3", "n_b": b"b", "n_b1": b"b1",
                     "n_b2": b"b2", "n_b3": b"b3"}
    # The path committed upward: each level into its parent, the root node into the base.
    commits = [e for e in logs if e["event"] == "branch_committed"]
    chain = lineage(outcome, w.index)
    assert [e["branch"] for e in commits] == [r.branch for r in reversed(chain)]
    assert [e["parent"] for e in commits] == [r.branch for r in reversed(chain[:-1])] + [None]
    assert len([e for e in logs if e["event"] == "winner_committed"]) == 1
    # The trace: every node with its parent, depth, candidate index, score and changes.
    data = json.loads(outcome.to_json())
    assert [(r["parent"], r["depth"]) for r in data["results"]] == [
        (r.parent, r.depth) for r in outcome.results]
    assert data["results"][w.index]["changes"] == ["n_b3", "path.txt"]
    assert data["info"]["policy"] == "best-first"


async def test_commit_of_a_path_lands_every_level_in_the_base(repo: Path) -> None:
    """Adds, edits, deletions and a new directory at different levels all reach the base."""

    async def add_dir(b: ba.Branch) -> float:
        (b.path / "pkg").mkdir()
        (b.path / "pkg" / "new.py").write_text("new\n")
        return 1.0

    async def edit(b: ba.Branch) -> float:
        assert (b.path / "pkg" / "new.py").read_text() == "new\n"  # sees its parent
        (b.path / "src" / "pkg" / "mod.py").write_text("def f():\n    return 2\n")
        return 2.0

    async def delete(b: ba.Branch) -> float:
        assert (b.path / "src" / "pkg" / "mod.py").read_text().endswith("2\n")
        (b.path / "README.md").unlink()
        (b.path / "pkg" / "new.py").write_text("newer\n")  # overwrites a grandparent's file
        return 3.0

    plan: dict[int, list[ba.Candidate]] = {0: [edit], 1: [delete], 2: []}

    async def expand(b: ba.Branch, depth: int) -> list[ba.Candidate]:
        return plan[depth]

    before = snapshot(repo)
    async with workspace(repo) as ws:
        outcome = await ba.TreeSearch([add_dir], expand=expand).run(ws)
    assert outcome.winner is not None
    assert outcome.winner.depth == 2
    expected = {k: v for k, v in before.items() if k != "README.md"}
    expected.update({"pkg": "dir", "pkg/new.py": b"newer\n",
                     "src/pkg/mod.py": b"def f():\n    return 2\n"})
    assert snapshot(repo) == expected


async def test_stop_on_success_commits_the_first_verified_node(repo: Path) -> None:
    calls: list[str] = []
    async with workspace(repo) as ws:
        outcome = await ba.TreeSearch(
            [step("a", 0.9), step("b", 0.5)], expand=by_table(PUZZLE, calls),
            evaluate=solved, stop_on_success=True,
        ).run(ws)
    assert calls == ["a", "a1", "a2", "b", "b1", "b2"]  # a2x is never expanded
    assert outcome.info["stopped"] == "success"
    assert outcome.winner is not None
    assert outcome.winner.depth == 3
    assert (repo / "path.txt").read_text() == "/b/b1/b2/b3"


async def test_budget_and_depth_bound_the_search(repo: Path) -> None:
    depths: list[int] = []

    async def expand(b: ba.Branch, depth: int) -> list[ba.Candidate]:
        depths.append(depth)
        n = len(depths)
        return [step(f"{n}.{i}", float(n * 10 + i)) for i in range(3)]

    async with workspace(repo) as ws:
        outcome = await ba.TreeSearch([step("r", 0.0)], expand=expand, budget=6).run(ws)
        assert outcome.info["stopped"] == "budget"
        assert len(outcome.results) == 6
        assert outcome.results[-1].error is None
        assert outcome.results[3].info["proposed"] == 3  # proposed 3, ran the 2 left
        assert outcome.winner is not None
        assert outcome.winner.index == 5  # the best-scoring success
        deep = await ba.TreeSearch([step("s", 0.0)], expand=expand, max_depth=2).run(ws)
        assert deep.info["stopped"] == "exhausted"
        assert max(r.depth for r in deep.results) == 2
        assert len(deep.results) == 1 + 3 + 9
    check_tree(outcome)
    check_tree(deep)


# -- MCTS -----------------------------------------------------------------------------------


async def test_mcts_exploration_constant(repo: Path, tmp_path: Path) -> None:
    """A high-value and a zero-value subtree: c=0 never leaves the first, a large c visits both."""

    async def expand(b: ba.Branch, depth: int) -> list[ba.Candidate]:
        first = (b.path / "path.txt").read_text().split("/")[1]
        return [step(f"{first}{depth}", 1.0 if first == "hi" else 0.0)]

    def search(exploration: float) -> ba.TreeSearch:
        return ba.TreeSearch([step("hi", 1.0), step("lo", 0.0)], expand=expand, policy="mcts",
                             exploration=exploration, budget=8, max_depth=10)

    async with workspace(repo) as ws:
        greedy = await search(0.0).run(ws)
    other = make_repo(tmp_path / "other")
    async with workspace(other) as ws:
        curious = await search(5.0).run(ws)
    for outcome in (greedy, curious):
        check_tree(outcome)
        assert outcome.info["stopped"] == "budget"
        assert outcome.info["policy"] == "mcts"
        assert len(outcome.results) == 8
        # The root node of each subtree has been visited once per node in it.
        for root in (0, 1):
            under = [r for r in outcome.results if lineage(outcome, r.index)[0].index == root]
            assert outcome.results[root].info["visits"] == len(under)
    assert [r.parent for r in greedy.results] == [None, None, 0, 2, 3, 4, 5, 6]
    lo_subtree = [r for r in curious.results if lineage(curious, r.index)[0].index == 1]
    assert len(lo_subtree) > 1  # exploration expanded the low-value subtree too
    # The best success commits (ties to the node found first): the "hi" root.
    for outcome, base in ((greedy, repo), (curious, other)):
        assert outcome.winner is not None
        assert outcome.winner.index == 0
        assert (base / "path.txt").read_text() == "/hi"


async def test_mcts_finds_the_solution_and_skips_failed_subtrees(repo: Path) -> None:
    table: dict[str, list[tuple[str, float]]] = {
        "a": [("a1", 0.5), ("a2", 0.4)], "a1": [("a11", 0.2)], "a2": [], "a11": [],
        "b": [("b1", 0.3)], "b1": [("b2", 0.9)], "b2": [("b3", 0.95)], "b3": [],
    }

    async def evaluate(b: ba.Branch) -> ba.Verdict:
        text = (b.path / "path.txt").read_text()
        return ba.Verdict(text == "/b/b1/b2/b3", None)

    async with workspace(repo) as ws:
        outcome = await ba.TreeSearch(
            [step("a", 0.6), step("b", 0.1), step("c", ok=False)], expand=by_table(table),
            evaluate=evaluate, policy="mcts", exploration=0.5,
        ).run(ws)
    check_tree(outcome)
    assert outcome.results[2].success is False  # a failed candidate: never expanded
    assert not [r for r in outcome.results if r.parent == 2]
    assert outcome.winner is not None
    assert outcome.winner.depth == 3
    assert (repo / "path.txt").read_text() == "/b/b1/b2/b3"


# -- dedup ----------------------------------------------------------------------------------


async def test_dedup_never_explores_an_identical_patch_twice(repo: Path) -> None:
    expanded: list[tuple[tuple[str, str], ...]] = []

    def writes(files: Mapping[str, str], score: float) -> ba.Candidate:
        async def candidate(b: ba.Branch) -> float:
            for name, text in files.items():
                (b.path / name).write_text(text)
            return score

        return candidate

    async def noop(b: ba.Branch) -> float:
        return 0.1

    async def expand(b: ba.Branch, depth: int) -> list[ba.Candidate]:
        state = tuple(sorted((p.name, p.read_text()) for p in b.path.glob("*.txt")))
        expanded.append(state)
        if depth == 0:  # commuting patches: a then b, b then a
            if (b.path / "a.txt").exists():
                return [writes({"b.txt": "B"}, 0.5), noop]
            return [writes({"a.txt": "A"}, 0.4)]
        return []

    async with workspace(repo) as ws:
        with capture_logs() as logs:
            outcome = await ba.TreeSearch(
                [writes({"a.txt": "A"}, 0.9), writes({"a.txt": "A"}, 0.8),
                 writes({"b.txt": "B"}, 0.7), writes({"a.txt": "other"}, 0.6)],
                expand=expand,
            ).run(ws)
    check_tree(outcome)
    dup = {r.index: r.info.get("duplicate_of") for r in outcome.results}
    # Roots: 0 a; 1 the same a (dup of 0); 2 b; 3 a different a. Best-first: under 0,
    # 4 a+b and 5 a no-op (dup of 0); under 2, 6 b+a (dup of 4); under 3, 7 and 8 (dup of 3).
    assert dup == {0: None, 1: 0, 2: None, 3: None, 4: None, 5: 0, 6: 4, 7: None, 8: 3}
    assert outcome.info["dedup_hits"] == 4
    assert len([e for e in logs if e["event"] == "duplicate_state"]) == 4
    assert sorted(expanded) == sorted(set(expanded))  # no state was expanded twice
    assert (("a.txt", "A"), ("b.txt", "B")) in expanded
    for r in outcome.results:
        if r.info.get("duplicate_of") is not None:
            assert "proposed" not in r.info
    assert outcome.winner is not None
    assert outcome.winner.index == 0  # ties and duplicates never displace the original
    assert (repo / "a.txt").read_text() == "A"
    assert not (repo / "b.txt").exists()


async def test_dedup_sees_a_reverted_edit_as_the_same_state(repo: Path) -> None:
    async def edit(b: ba.Branch) -> float:
        (b.path / "README.md").write_text("changed\n")
        return 0.5

    async def revert(b: ba.Branch) -> float:
        (b.path / "README.md").write_text("# demo\n")
        return 0.4

    async def touch_mode(b: ba.Branch) -> float:
        (b.path / "run.sh").chmod(0o644)  # a mode change is a different state
        return 0.3

    async def expand(b: ba.Branch, depth: int) -> list[ba.Candidate]:
        return [revert] if depth == 0 else []

    async with workspace(repo) as ws:
        outcome = await ba.TreeSearch(
            [edit, touch_mode, revert], expand=expand, max_depth=1,
        ).run(ws)
    # Roots: 0 edit, 1 mode change, 2 revert (no difference: the target's own state).
    # Then, best-first, a revert under each: 3 under edit (back to the target's state, as
    # node 2), 4 under 2 (no change: node 2 again), 5 under the mode change (node 1 again).
    assert [(r.parent, r.info.get("duplicate_of")) for r in outcome.results] == [
        (None, None), (None, None), (None, None), (0, 2), (2, 2), (1, 1)]
    assert outcome.info["dedup_hits"] == 3
    assert outcome.winner is not None
    assert outcome.winner.index == 0


# -- failures -------------------------------------------------------------------------------


async def test_raising_expand_is_the_nodes_error_and_leaks_nothing(repo: Path) -> None:
    async def expand(b: ba.Branch, depth: int) -> list[ba.Candidate]:
        if last_step(b) == "a":
            raise RuntimeError("proposer crashed")
        return [step("b1", 0.3)] if depth == 0 else []

    before = snapshot(repo)
    async with workspace(repo) as ws:
        with anyio.fail_after(10):
            outcome = await ba.TreeSearch([step("a", 0.9), step("b", 0.1)], expand=expand).run(ws)
    a = outcome.results[0]
    assert a.error == "RuntimeError: proposer crashed"
    assert a.info["error_in"] == "expand"
    assert not a.success
    assert outcome.winner is not None
    assert (repo / "path.txt").read_text() == "/b/b1"
    assert not (repo / "n_a").exists()

    async def always_raises(b: ba.Branch, depth: int) -> list[ba.Candidate]:
        raise ValueError("no ideas")

    (repo / "path.txt").unlink()
    for name in ("n_b", "n_b1"):
        (repo / name).unlink()
    async with workspace(repo) as ws:
        for policy in ("best-first", "mcts"):
            with anyio.fail_after(10):
                outcome = await ba.TreeSearch([step("a", 0.9)], expand=always_raises,
                                              policy=policy).run(ws)
            assert not outcome.committed
            assert outcome.results[0].error == "ValueError: no ideas"
            assert ws.branches() == []
    assert snapshot(repo) == before


async def test_expand_garbage_and_sync_expand(repo: Path) -> None:
    def sync_expand(b: ba.Branch, depth: int) -> Any:
        return "not candidates" if depth == 0 else []

    async with workspace(repo) as ws:
        outcome = await ba.TreeSearch([step("a", 0.9)], expand=sync_expand).run(ws)
    assert outcome.results[0].error is not None
    assert outcome.results[0].error.startswith("CandidateError: expand returned str")
    assert not outcome.committed

    def sync_step(b: ba.Branch) -> float:
        (b.path / "sync.txt").write_text(str(b.depth))
        return 1.0

    def sync_ok(b: ba.Branch, depth: int) -> list[ba.Candidate]:
        return [sync_step] if depth == 0 else []

    async with workspace(repo) as ws:
        outcome = await ba.TreeSearch([step("a", 0.5)], expand=sync_ok).run(ws)
    assert outcome.winner is not None
    assert outcome.winner.depth == 1
    assert (repo / "sync.txt").read_text() == "1"


async def test_expand_runs_in_a_throwaway_fork(repo: Path) -> None:
    """Callbacks are isolated: what expand writes never reaches the node or the base."""
    seen: list[tuple[str, str | None]] = []

    async def expand(b: ba.Branch, depth: int) -> list[ba.Candidate]:
        seen.append((b.name, b.parent.name if b.parent is not None else None))
        (b.path / "junk.txt").write_text("from expand")
        r = await b.run(["sh", "-c", "echo more > junk2.txt"])
        assert r.ok
        return [step("child", 1.0)] if depth == 0 else []

    async with workspace(repo) as ws:
        outcome = await ba.TreeSearch([step("a", 0.5)], expand=expand).run(ws)
    assert outcome.winner is not None
    assert outcome.winner.changes == ("n_child", "path.txt")
    assert outcome.results[0].changes == ("n_a", "path.txt")
    assert seen[0][1] == outcome.results[0].branch  # a fork of the node's branch
    assert seen[0][0] != outcome.results[0].branch
    assert not (repo / "junk.txt").exists()
    assert not (repo / "junk2.txt").exists()
    assert (repo / "path.txt").read_text() == "/a/child"


async def test_raising_evaluate_fails_the_node(repo: Path) -> None:
    async def evaluate(b: ba.Branch) -> bool:
        if last_step(b) == "a1":
            raise RuntimeError("judge crashed")
        return True

    table = {"a": [("a1", 0.9), ("a2", 0.1)]}
    async with workspace(repo) as ws:
        outcome = await ba.TreeSearch([step("a", 0.5)], expand=by_table(table),
                                      evaluate=evaluate).run(ws)
    a1 = outcome.results[1]
    assert a1.error == "RuntimeError: judge crashed"
    assert not [r for r in outcome.results if r.parent == 1]  # never expanded
    assert outcome.winner is not None
    assert outcome.winner.index == 0  # a (0.5) beats a2 (0.1); a1 failed
    assert (repo / "n_a").exists()
    assert not (repo / "n_a1").exists()


async def test_timeout_bounds_wall_time_and_commits_the_best_so_far(repo: Path) -> None:
    token = sleep_token()

    async def expand(b: ba.Branch, depth: int) -> list[ba.Candidate]:
        return [ba.Command(["sleep", token]), step("quick", 0.1)] if depth == 0 else []

    async with workspace(repo) as ws:
        started = time.monotonic()
        outcome = await ba.TreeSearch([step("a", 0.5)], expand=expand, timeout=0.6).run(ws)
        elapsed = time.monotonic() - started
    assert elapsed < 3
    assert outcome.timed_out
    assert outcome.info["stopped"] == "timeout"
    assert outcome.results[1].error == "TimeoutError: the strategy's timeout expired"
    assert outcome.winner is not None
    assert outcome.winner.score == 0.5  # "a" beats "quick"
    assert processes_with(token) == []
    assert (repo / "path.txt").read_text() == "/a"


async def test_a_hanging_expand_is_bounded_by_the_timeout(repo: Path) -> None:
    async def expand(b: ba.Branch, depth: int) -> list[ba.Candidate]:
        await anyio.sleep(30)
        return []

    async with workspace(repo) as ws:
        started = time.monotonic()
        outcome = await ba.TreeSearch([step("a", 0.5)], expand=expand, timeout=0.4).run(ws)
        assert time.monotonic() - started < 3
    assert outcome.timed_out
    assert outcome.results[0].error is None
    assert outcome.committed
    assert (repo / "path.txt").read_text() == "/a"


@pytest.mark.parametrize("policy", ["best-first", "mcts"])
async def test_outside_cancellation_leaves_nothing(repo: Path, policy: str) -> None:
    token = sleep_token()
    before = snapshot(repo)

    async def expand(b: ba.Branch, depth: int) -> list[ba.Candidate]:
        return [ba.Command(["sleep", token]), ba.Command(["sleep", token], isolate=False)]

    async with workspace(repo) as ws:
        started = time.monotonic()
        search = ba.TreeSearch([step("a", 0.5)], expand=expand,
                               policy=policy)  # type: ignore[arg-type]
        with anyio.move_on_after(0.5) as scope:
            await search.run(ws)
        assert scope.cancelled_caught
        assert time.monotonic() - started < 3
        assert ws.branches() == []
    assert snapshot(repo) == before
    assert processes_with(token) == []


async def test_conflict_on_the_final_commit_changes_nothing(repo: Path) -> None:
    async def outside(b: ba.Branch) -> float:
        (b.path / "README.md").write_text("branch\n")
        (repo / "README.md").write_text("outside\n")  # the base, changed behind the search
        return 1.0

    async def expand(b: ba.Branch, depth: int) -> list[ba.Candidate]:
        return [step("child", 2.0)] if depth == 0 else []

    async with workspace(repo) as ws:
        outcome = await ba.TreeSearch([outside], expand=expand).run(ws)
    assert not outcome.committed
    assert outcome.results[0].error is not None
    assert outcome.results[0].error.startswith("ConflictError:")
    assert outcome.results[1].error is not None
    assert "committing its ancestor 0" in outcome.results[1].error
    assert (repo / "README.md").read_text() == "outside\n"
    assert not (repo / "n_child").exists()


async def test_nested_in_best_of_n_and_on_a_branch(repo: Path) -> None:
    table = {"a": [("a1", 0.7)], "b": [("b1", 0.2)]}
    inner_a = ba.TreeSearch([step("a", 0.5)], expand=by_table(table))
    inner_b = ba.TreeSearch([step("b", 0.9)], expand=by_table(table))
    async with workspace(repo) as ws:
        outcome = await ba.BestOfN([inner_a, inner_b]).run(ws)
        assert outcome.winner is not None
        assert outcome.winner.index == 1  # b's tree: its best success scored 0.9
        assert outcome.winner.info["outcome"]["strategy"] == "tree_search"
        parent = await ws.fork()
        on_branch = await ba.TreeSearch([step("c", 0.1)], expand=by_table({})).run(parent)
        assert on_branch.committed
        assert (parent.path / "path.txt").read_text() == "/b/c"
        await parent.abort()
    assert (repo / "path.txt").read_text() == "/b"


def test_validation() -> None:
    async def expand(b: ba.Branch, depth: int) -> list[ba.Candidate]:
        return []

    bad: Any = "breadth-first"
    with pytest.raises(ValueError, match="policy"):
        ba.TreeSearch([], expand=expand, policy=bad)
    with pytest.raises(ValueError, match="budget"):
        ba.TreeSearch([], expand=expand, budget=0)
    with pytest.raises(ValueError, match="max_depth"):
        ba.TreeSearch([], expand=expand, max_depth=-1)
    with pytest.raises(ValueError, match="exploration"):
        ba.TreeSearch([], expand=expand, exploration=float("nan"))
    with pytest.raises(ValueError, match="timeout"):
        ba.TreeSearch([], expand=expand, timeout=0)
    not_callable: Any = 3
    with pytest.raises(TypeError, match="expand"):
        ba.TreeSearch([], expand=not_callable)
    assert "policy='mcts'" in repr(ba.TreeSearch([], expand=expand, policy="mcts"))
    assert ba.get_strategy("tree_search") is ba.TreeSearch


async def test_no_root_candidates(repo: Path) -> None:
    async def expand(b: ba.Branch, depth: int) -> list[ba.Candidate]:
        raise AssertionError("nothing to expand")

    async with workspace(repo) as ws:
        outcome = await ba.TreeSearch([], expand=expand).run(ws)
    assert not outcome.committed
    assert outcome.results == ()
    assert outcome.info["stopped"] == "exhausted"


# -- the property ---------------------------------------------------------------------------

TIMEOUT = 0.4  # used whenever a behaviour may hang
SLACK = 2.5  # forks, commits and cleanup after the timeout, on a loaded machine


@attrs.frozen
class Move:
    """What one candidate does: ``kind`` and the score it reports (or evaluate gives)."""

    kind: str  # ok, fail, raise, hang, noop, same, garbage, sync
    score: float | None
    verified: bool = True  # what evaluate says, when there is one
    evaluate_raises: bool = False


moves = st.builds(
    Move,
    kind=st.sampled_from(["ok"] * 6 + ["sync", "same", "noop", "fail", "raise", "hang",
                                       "garbage"]),
    score=st.sampled_from([None, -1.0, 0.0, 0.5, 2.0]),
    verified=st.booleans(),
    evaluate_raises=st.sampled_from([False, False, False, True]),
)
proposals = st.lists(moves, min_size=1, max_size=3).map(lambda ms: ("list", ms))
expansions = st.one_of(  # one_of picks its branches evenly: mostly proposals
    proposals, proposals, proposals, proposals, proposals,
    st.sampled_from([("list", []), ("raise", []), ("hang", []), ("garbage", [])]),
)


class Scenario:
    """Makes candidates from moves, and remembers which ran where, to model the base."""

    def __init__(self, *, hangs: bool) -> None:
        self.hangs = hangs  # without, a move or an expansion that would hang does not
        self.uids = iter(range(10**6))
        self.moves: dict[int, Move] = {}
        self.ran: dict[str, int] = {}  # branch name -> uid

    def candidate(self, move: Move) -> ba.Candidate:
        uid = next(self.uids)
        if move.kind == "hang" and not self.hangs:
            move = attrs.evolve(move, kind="ok")
        self.moves[uid] = move

        def apply(b: ba.Branch) -> Any:
            self.ran[b.name] = uid
            if move.kind == "same":
                (b.path / "same.txt").write_text("same")
            elif move.kind not in ("noop", "hang"):
                path = b.path / "path.txt"
                seen = path.read_text() if path.exists() else ""
                path.write_text(f"{seen}/{uid}")
                (b.path / f"n{uid}.txt").write_text(move.kind)
            if move.kind == "fail":
                return False
            if move.kind == "raise":
                raise ValueError(f"candidate {uid} failed")
            if move.kind == "garbage":
                return "yes"
            return move.score if move.score is not None else True

        if move.kind == "sync":
            return apply

        async def candidate(b: ba.Branch) -> Any:
            if move.kind == "hang":
                self.ran[b.name] = uid
                await anyio.sleep(30)
            return apply(b)

        return candidate

    async def evaluate(self, b: ba.Branch) -> ba.Verdict:
        move = self.moves[self.ran[b.name]]
        if move.evaluate_raises:
            raise RuntimeError("evaluate crashed")
        return ba.Verdict(move.verified, move.score)

    def expand(self, plan: list[tuple[str, list[Move]]]) -> Callable[[ba.Branch, int], Any]:
        calls = iter(range(10**6))

        async def expand(b: ba.Branch, depth: int) -> Any:
            what, ms = plan[next(calls) % len(plan)]
            if what == "raise":
                raise RuntimeError("expand crashed")
            if what == "hang" and self.hangs:
                await anyio.sleep(30)
            if what == "garbage":
                return 42
            return [self.candidate(m) for m in ms]

        return expand

    def model(self, before: Mapping[str, bytes | str], uids: Sequence[int]) -> dict[str, Any]:
        """The base after committing the lineage that ran ``uids``, in order."""
        after = dict(before)
        path = ""
        for uid in uids:
            move = self.moves[uid]
            if move.kind == "same":
                after["same.txt"] = b"same"
            elif move.kind not in ("noop", "hang"):
                path += f"/{uid}"
                after["path.txt"] = path.encode()
                after[f"n{uid}.txt"] = move.kind.encode()
        return after


@pytest.mark.parametrize("policy", ["best-first", "mcts"])
@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(roots=st.lists(moves, min_size=1, max_size=3),
       plan=st.lists(expansions, min_size=1, max_size=4),
       use_evaluate=st.booleans(), budget=st.sampled_from([12, 12, 6, 3, 1]),
       max_depth=st.sampled_from([3, 3, 2, 1, 0]),
       max_parallel=st.sampled_from([None, 1, 2]), hangs=st.sampled_from([False, False, True]),
       stop_on_success=st.sampled_from([False, False, False, True]),
       exploration=st.sampled_from([0.0, 1.4, 10.0]))
async def test_tree_search_keeps_its_promises(
    tmp_path_factory: pytest.TempPathFactory, policy: str, roots: list[Move],
    plan: list[tuple[str, list[Move]]], use_evaluate: bool, budget: int, max_depth: int,
    max_parallel: int | None, stop_on_success: bool, exploration: float, hangs: bool,
) -> None:
    repo = make_repo(tmp_path_factory.mktemp("tree"))
    before = snapshot(repo)
    scenario = Scenario(hangs=hangs)
    may_hang = hangs and (any(m.kind == "hang" for m in roots) or any(
        w == "hang" or any(m.kind == "hang" for m in ms) for w, ms in plan))
    timeout = TIMEOUT if may_hang else None
    search = ba.TreeSearch(
        [scenario.candidate(m) for m in roots], expand=scenario.expand(plan),
        evaluate=scenario.evaluate if use_evaluate else None, policy=policy,  # type: ignore[arg-type]
        budget=budget, max_depth=max_depth, max_parallel=max_parallel,
        stop_on_success=stop_on_success, exploration=exploration, timeout=timeout,
    )
    async with ba.open_workspace(repo, backend="copy") as ws:
        started = time.monotonic()
        with anyio.fail_after(30):
            outcome = await search.run(ws)
        elapsed = time.monotonic() - started
        assert ws.branches() == [], "a strategy left a branch open"
    if timeout is not None:
        assert elapsed < timeout + SLACK, f"took {elapsed:.2f} s"
    else:
        assert not outcome.timed_out
    event(f"committed={outcome.committed}")
    event(f"stopped={outcome.info['stopped']}")
    event(f"nodes: {min(len(outcome.results), 5)}{'+' if len(outcome.results) >= 5 else ''}")
    event(f"depth: {max((r.depth for r in outcome.results), default=-1)}")
    if outcome.info["dedup_hits"]:
        event("dedup hit")
    check_tree(outcome)
    assert len(outcome.results) <= budget
    assert max((r.depth for r in outcome.results), default=0) <= max_depth
    json.loads(outcome.to_json())
    after = snapshot(repo)
    if outcome.committed:
        w = outcome.winner
        assert w is not None
        assert w.success
        assert w.error is None
        assert "duplicate_of" not in w.info
        assert outcome.results[w.index] == w
        chain = lineage(outcome, w.index)
        for r in chain:
            assert r.error is None
            assert r.info["candidate_success"] is True
        uids = [scenario.ran[str(r.branch)] for r in chain]
        assert after == scenario.model(before, uids)
        # No other success beats the winner.
        eligible = [r for r in outcome.results if r.success and "duplicate_of" not in r.info]
        best = max(eligible, key=lambda r: (r.score is not None, r.score or 0.0, -r.index))
        if not stop_on_success:
            assert best.index == w.index
    else:
        assert outcome.winner is None
        assert after == before
        # Nothing was committable: every success was a duplicate (or its expand raised).
        assert not [r for r in outcome.results if r.success and "duplicate_of" not in r.info]
