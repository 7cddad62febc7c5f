"""Beam on real branches (copy backend), on asyncio and trio.

Beams are nested branches: every child forks from its beam, the best
``beam_width`` children of a depth become the new beams (each its own
branch, even when one beam produced them all), and the best beam's lineage
commits level by level into the target. Every test also checks that no path
leaves a branch open; the property test at the end drives random candidate,
evaluate and expand behaviours through it.
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


def by_table(table: Mapping[str, Sequence[tuple[str, float]]]) -> Callable[[ba.Branch, int], Any]:
    """An expand that proposes ``table[last step]``."""

    async def expand(b: ba.Branch, depth: int) -> list[ba.Candidate]:
        return [step(name, score) for name, score in table.get(last_step(b), ())]

    return expand


# -- the search -----------------------------------------------------------------------------


async def test_width_is_kept_when_one_beam_wins_every_slot(repo: Path) -> None:
    """P's three children beat Q's: all three survive, each in its own branch of P."""
    table = {
        "P": [("p1", 0.8), ("p2", 0.85), ("p3", 0.7)], "Q": [("q1", 0.2)],
        "p1": [("p1x", 0.5)], "p2": [("p2x", 0.6)], "p3": [("p3x", 0.95)],
    }
    beams_seen: list[tuple[str, str | None, str]] = []
    open_then: list[set[str]] = []
    ws_ref: list[ba.Workspace] = []

    async def expand(b: ba.Branch, depth: int) -> list[ba.Candidate]:
        if depth == 1:
            assert b.parent is not None
            beams_seen.append((b.parent.name, b.parent.parent.name if b.parent.parent else None,
                               (b.path / "path.txt").read_text()))
            assert b.parent.state is ba.BranchState.OPEN
            open_then.append({x.name for x in ws_ref[0].branches() if x.depth <= 1})
        return [step(name, score) for name, score in table.get(last_step(b), ())]

    async def evaluate(b: ba.Branch) -> bool:
        return last_step(b).endswith("x")  # only the depth-2 nodes are solutions

    before = snapshot(repo)
    async with workspace(repo) as ws:
        ws_ref.append(ws)
        with capture_logs() as logs:
            outcome = await ba.Beam([step("P", 0.9), step("Q", 0.1)], expand=expand,
                                    evaluate=evaluate, beam_width=3, max_depth=2).run(ws)
    check_tree(outcome)
    r = {x.branch: x for x in outcome.results}
    by_name = {str(x.changes[0]).removeprefix("n_"): x for x in outcome.results}
    p = by_name["P"]
    # The three depth-1 beams are three branches, all forks of P, each with its own state.
    assert sorted(beams_seen) == sorted([
        (str(by_name[n].branch), p.branch, f"/P/{n}") for n in ("p1", "p2", "p3")])
    # When they expanded, Q and its child were already gone.
    expected_open = {str(by_name[n].branch) for n in ("P", "p1", "p2", "p3")}
    assert open_then == [expected_open] * 3
    assert [x.index for x in outcome.results if x.info.get("beam") and x.depth == 1] == [
        by_name[n].index for n in ("p1", "p2", "p3")]
    assert not by_name["q1"].info.get("beam")
    assert by_name["Q"].info["dropped"]  # its lineage lost at depth 1
    assert not by_name["P"].info.get("dropped")
    # The best final beam's lineage committed, one level into each: never two into one beam.
    w = outcome.winner
    assert w is not None
    assert w.index == by_name["p3x"].index
    assert [x.branch for x in lineage(outcome, w.index)] == [
        by_name[n].branch for n in ("P", "p3", "p3x")]
    commits = [e for e in logs if e["event"] == "branch_committed"]
    assert [(e["branch"], e["parent"]) for e in commits] == [
        (by_name["p3x"].branch, by_name["p3"].branch), (by_name["p3"].branch, p.branch),
        (p.branch, None)]
    assert len({e["parent"] for e in commits}) == len(commits)
    assert snapshot(repo) == {**before, "path.txt": b"/P/p3/p3x", "n_P": b"P", "n_p3": b"p3",
                              "n_p3x": b"p3x"}
    assert outcome.info["beams"] == [by_name[n].index for n in ("p3x", "p2x", "p1x")]
    assert outcome.info["stopped"] == "max_depth"
    assert outcome.info["depth_reached"] == 2
    assert outcome.strategy == "beam"
    assert len(r) == len(outcome.results)
    data = json.loads(outcome.to_json())
    assert [(x["parent"], x["depth"]) for x in data["results"]] == [
        (x.parent, x.depth) for x in outcome.results]


async def test_lineages_stay_separate(repo: Path) -> None:
    """Two beams of width 2: each child sees exactly its own beam's changes."""
    seen: list[str] = []

    async def expand(b: ba.Branch, depth: int) -> list[ba.Candidate]:
        text = (b.path / "path.txt").read_text()
        seen.append(text)
        return [step(f"{last_step(b)}.{i}", float(depth * 10 + i)) for i in range(2)]

    async with workspace(repo) as ws:
        outcome = await ba.Beam([step("a", 1.0), step("b", 2.0), step("c", 0.5)],
                                expand=expand, beam_width=2, max_depth=2).run(ws)
    check_tree(outcome)
    # Beams b (2.0) and a (1.0); c loses. Their children b.0 b.1 a.0 a.1 score 0 1 0 1:
    # b.1 and a.1 survive; theirs score 10 11 10 11: b.1.1 and a.1.1 are the final beams.
    assert sorted(seen) == ["/a", "/a/a.1", "/b", "/b/b.1"]
    names = [r.changes[0].removeprefix("n_") for r in outcome.results]
    assert [names[i] for i in outcome.info["beams"]] == ["b.1.1", "a.1.1"]
    assert not outcome.results[2].info.get("beam")  # c lost at depth 0
    assert outcome.winner is not None
    assert outcome.winner.depth == 2
    assert outcome.winner.score == 11.0  # ties go to the node found first
    assert (repo / "path.txt").read_text() == "/b/b.1/b.1.1"


async def test_a_verified_beam_whose_children_lose_still_wins(repo: Path) -> None:
    async def evaluate(b: ba.Branch) -> ba.Verdict:
        return ba.Verdict((b.path / "path.txt").read_text() == "/a", None)

    table = {"a": [("a1", 5.0)], "b": [("b1", 6.0)]}
    async with workspace(repo) as ws:
        outcome = await ba.Beam([step("a", 1.0), step("b", 2.0)], expand=by_table(table),
                                evaluate=evaluate, beam_width=2, max_depth=3).run(ws)
    assert outcome.winner is not None
    assert outcome.winner.index == 0
    assert outcome.info["stopped"] == "exhausted"  # depth 2 proposed nothing
    assert (repo / "path.txt").read_text() == "/a"
    assert not (repo / "n_a1").exists()


async def test_max_depth_zero_is_a_best_of_the_candidates(repo: Path) -> None:
    async def expand(b: ba.Branch, depth: int) -> list[ba.Candidate]:
        raise AssertionError("never expanded at max_depth=0")

    async with workspace(repo) as ws:
        outcome = await ba.Beam([step("a", 1.0), step("b", 3.0, ok=False), step("c", 2.0)],
                                expand=expand, beam_width=1, max_depth=0).run(ws)
    assert outcome.winner is not None
    assert outcome.winner.index == 2
    assert [r.info.get("beam", False) for r in outcome.results] == [False, False, True]
    assert (repo / "path.txt").read_text() == "/c"


async def test_evaluate_command_scores_children(repo: Path) -> None:
    score = ba.Command(["sh", "-c", 'wc -c < path.txt > "$BRANCHAGENT_SCORE_FILE"'])
    table = {"a": [("long-name", 0.0), ("x", 0.0)], "long-name": [], "x": []}
    async with workspace(repo) as ws:
        outcome = await ba.Beam([step("a")], expand=by_table(table), evaluate=score,
                                beam_width=1, max_depth=1).run(ws)
    assert outcome.winner is not None
    assert outcome.winner.score == len("/a/long-name")
    assert (repo / "path.txt").read_text() == "/a/long-name"


# -- failures -------------------------------------------------------------------------------


async def test_raising_expand_fails_its_beam_and_never_hangs(repo: Path) -> None:
    async def expand(b: ba.Branch, depth: int) -> list[ba.Candidate]:
        if last_step(b) == "a":
            raise RuntimeError("proposer crashed")
        return [step("b1", 0.5)] if depth == 0 else []

    async with workspace(repo) as ws:
        with anyio.fail_after(10):
            outcome = await ba.Beam([step("a", 0.9), step("b", 0.1)], expand=expand,
                                    beam_width=2).run(ws)
    assert outcome.results[0].error == "RuntimeError: proposer crashed"
    assert outcome.results[0].info["error_in"] == "expand"
    assert outcome.winner is not None
    assert (repo / "path.txt").read_text() == "/b/b1"

    async def always(b: ba.Branch, depth: int) -> list[ba.Candidate]:
        raise ValueError("no ideas")

    (repo / "path.txt").unlink()
    (repo / "n_b").unlink()
    (repo / "n_b1").unlink()
    before = snapshot(repo)
    async with workspace(repo) as ws:
        with anyio.fail_after(10):
            outcome = await ba.Beam([step("a", 0.9), step("b", 0.1)], expand=always).run(ws)
    assert not outcome.committed
    assert [r.error for r in outcome.results] == ["ValueError: no ideas"] * 2
    assert snapshot(repo) == before


async def test_sync_expand_and_garbage(repo: Path) -> None:
    def sync_expand(b: ba.Branch, depth: int) -> Any:
        return {"not": "candidates"} if last_step(b) == "a" else [step("b1", 1.0)]

    async with workspace(repo) as ws:
        outcome = await ba.Beam([step("a", 0.9), step("b", 0.1)], expand=sync_expand,
                                max_depth=1).run(ws)
    assert str(outcome.results[0].error).startswith("CandidateError: expand returned dict")
    assert outcome.winner is not None
    assert (repo / "path.txt").read_text() == "/b/b1"


async def test_timeout_bounds_wall_time_and_commits_the_best_so_far(repo: Path) -> None:
    token = sleep_token()

    async def sleeps(b: ba.Branch) -> bool:
        await anyio.sleep(30)
        return True

    async def expand(b: ba.Branch, depth: int) -> list[ba.Candidate]:
        return [ba.Command(["sleep", token]), sleeps, step("quick", 0.1)]

    async with workspace(repo) as ws:
        started = time.monotonic()
        outcome = await ba.Beam([step("a", 0.5)], expand=expand, timeout=0.6).run(ws)
        elapsed = time.monotonic() - started
    assert elapsed < 3
    assert outcome.timed_out
    assert outcome.info["stopped"] == "timeout"
    assert outcome.results[1].error == "TimeoutError: the strategy's timeout expired"
    assert outcome.results[3].success  # finished in time: it became a beam
    assert outcome.results[3].info["beam"]
    assert outcome.winner is not None
    assert outcome.winner.index == 0  # a (0.5) beats quick (0.1)
    assert processes_with(token) == []
    assert (repo / "path.txt").read_text() == "/a"


async def test_a_hanging_expand_is_bounded_by_the_timeout(repo: Path) -> None:
    async def expand(b: ba.Branch, depth: int) -> list[ba.Candidate]:
        if last_step(b) == "slow":
            await anyio.sleep(30)
        return []

    async with workspace(repo) as ws:
        started = time.monotonic()
        outcome = await ba.Beam([step("slow", 0.1), step("fast", 0.5)], expand=expand,
                                timeout=0.4).run(ws)
        assert time.monotonic() - started < 3
    assert outcome.timed_out
    assert outcome.winner is not None
    assert (repo / "path.txt").read_text() == "/fast"


async def test_outside_cancellation_leaves_nothing(repo: Path) -> None:
    token = sleep_token()
    before = snapshot(repo)

    async def expand(b: ba.Branch, depth: int) -> list[ba.Candidate]:
        return [ba.Command(["sleep", token]), ba.Command(["sleep", token], isolate=False)]

    async with workspace(repo) as ws:
        started = time.monotonic()
        with anyio.move_on_after(0.5) as scope:
            await ba.Beam([step("a", 0.5), step("b", 0.4)], expand=expand).run(ws)
        assert scope.cancelled_caught
        assert time.monotonic() - started < 3
        assert ws.branches() == []
    assert snapshot(repo) == before
    assert processes_with(token) == []


async def test_on_a_branch_and_nested(repo: Path) -> None:
    table = {"a": [("a1", 2.0)]}
    async with workspace(repo) as ws:
        parent = await ws.fork()
        outcome = await ba.Beam([step("a", 1.0)], expand=by_table(table)).run(parent)
        assert outcome.committed
        assert (parent.path / "path.txt").read_text() == "/a/a1"
        assert [b.name for b in ws.branches()] == [parent.name]
        await parent.abort()
        nested = await ba.BestOfN([ba.Beam([step("x", 1.0)], expand=by_table({})),
                                   ba.Beam([step("y", 3.0)], expand=by_table({}))]).run(ws)
    assert nested.winner is not None
    assert nested.winner.index == 1
    assert (repo / "path.txt").read_text() == "/y"


def test_validation() -> None:
    async def expand(b: ba.Branch, depth: int) -> list[ba.Candidate]:
        return []

    with pytest.raises(ValueError, match="beam_width"):
        ba.Beam([], expand=expand, beam_width=0)
    with pytest.raises(ValueError, match="max_depth"):
        ba.Beam([], expand=expand, max_depth=-1)
    with pytest.raises(ValueError, match="max_parallel"):
        ba.Beam([], expand=expand, max_parallel=0)
    not_callable: Any = None
    with pytest.raises(TypeError, match="expand"):
        ba.Beam([], expand=not_callable)
    assert "beam_width=2" in repr(ba.Beam([], expand=expand, beam_width=2))
    assert ba.get_strategy("beam") is ba.Beam


# -- the property ---------------------------------------------------------------------------

TIMEOUT = 0.4  # used whenever a behaviour may hang
SLACK = 2.5  # forks, commits and cleanup after the timeout, on a loaded machine


@attrs.frozen
class Move:
    """What one candidate does: ``kind`` and the score it reports (or evaluate gives)."""

    kind: str  # ok, fail, raise, hang, noop, garbage, sync
    score: float | None
    verified: bool = True  # what evaluate says, when there is one
    evaluate_raises: bool = False


moves = st.builds(
    Move,
    kind=st.sampled_from(["ok"] * 6 + ["sync", "noop", "fail", "raise", "hang", "garbage"]),
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
            if move.kind not in ("noop", "hang"):
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
            if move.kind not in ("noop", "hang"):
                path += f"/{uid}"
                after["path.txt"] = path.encode()
                after[f"n{uid}.txt"] = move.kind.encode()
        return after


@settings(max_examples=50, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(roots=st.lists(moves, min_size=1, max_size=4),
       plan=st.lists(expansions, min_size=1, max_size=4),
       use_evaluate=st.booleans(), beam_width=st.sampled_from([2, 1, 3]),
       max_depth=st.sampled_from([2, 3, 1, 0]), max_parallel=st.sampled_from([None, 1, 2]),
       hangs=st.sampled_from([False, False, True]))
async def test_beam_keeps_its_promises(
    tmp_path_factory: pytest.TempPathFactory, roots: list[Move],
    plan: list[tuple[str, list[Move]]], use_evaluate: bool, beam_width: int, max_depth: int,
    max_parallel: int | None, hangs: bool,
) -> None:
    repo = make_repo(tmp_path_factory.mktemp("beam"))
    before = snapshot(repo)
    scenario = Scenario(hangs=hangs)
    may_hang = hangs and (any(m.kind == "hang" for m in roots) or any(
        w == "hang" or any(m.kind == "hang" for m in ms) for w, ms in plan))
    timeout = TIMEOUT if may_hang else None
    beam = ba.Beam(
        [scenario.candidate(m) for m in roots], expand=scenario.expand(plan),
        evaluate=scenario.evaluate if use_evaluate else None, beam_width=beam_width,
        max_depth=max_depth, max_parallel=max_parallel, timeout=timeout,
    )
    async with ba.open_workspace(repo, backend="copy") as ws:
        with capture_logs() as logs:
            started = time.monotonic()
            with anyio.fail_after(30):
                outcome = await beam.run(ws)
            elapsed = time.monotonic() - started
        assert ws.branches() == [], "a strategy left a branch open"
    event(f"committed={outcome.committed}")
    event(f"stopped={outcome.info['stopped']}")
    event(f"depth: {max((r.depth for r in outcome.results), default=-1)}")
    if timeout is not None:
        assert elapsed < timeout + SLACK, f"took {elapsed:.2f} s"
    else:
        assert not outcome.timed_out
    check_tree(outcome)
    assert max((r.depth for r in outcome.results), default=0) <= max_depth
    json.loads(outcome.to_json())
    # Width: at each depth at most beam_width beams, and each one a different branch.
    for depth in range(max_depth + 1):
        beams = [r for r in outcome.results if r.depth == depth and r.info.get("beam")]
        assert len(beams) <= beam_width
        assert len({r.branch for r in beams}) == len(beams)
        # Children only ever fork from beams.
        for r in outcome.results:
            if r.depth == depth + 1:
                assert r.parent is not None
                assert outcome.results[r.parent].info.get("beam")
    # Never two commits into one branch.
    commits = [e for e in logs if e["event"] == "branch_committed"]
    assert len({e["parent"] for e in commits}) == len(commits)
    after = snapshot(repo)
    if outcome.committed:
        w = outcome.winner
        assert w is not None
        assert w.success
        assert w.error is None
        assert w.info["beam"]
        chain = lineage(outcome, w.index)
        assert [e["branch"] for e in commits] == [r.branch for r in reversed(chain)]
        uids = [scenario.ran[str(r.branch)] for r in chain]
        assert after == scenario.model(before, uids)
        contenders = [r for r in outcome.results if r.success and r.info.get("beam")]
        best = max(contenders, key=lambda r: (r.score is not None, r.score or 0.0, -r.index))
        assert best.index == w.index
    else:
        assert outcome.winner is None
        assert commits == []
        assert after == before
        assert not [r for r in outcome.results if r.success and r.info.get("beam")]
    assert not [r for r in outcome.results if r.success and r.info.get("dropped")]
