"""Tournament on real branches (copy backend), on asyncio and trio.

Every test also checks that no path leaves a branch open (the ``workspace``
helper asserts it before closing), and the judge never hangs the run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from structlog.testing import capture_logs

import branchagent as ba
from _support import processes_with, sleep_token, snapshot, workspace

pytestmark = pytest.mark.anyio


# -- helpers --------------------------------------------------------------------------


def writes(value: int, result: Any = True) -> Callable[[ba.Branch], Any]:
    """A candidate that writes ``value`` to n.txt and returns ``result``."""

    async def candidate(b: ba.Branch) -> Any:
        (b.path / "n.txt").write_text(str(value))
        return result

    return candidate


def value_of(b: ba.Branch) -> int:
    return int((b.path / "n.txt").read_text())


class Judge:
    """Prefers the larger n.txt; records what it was shown."""

    def __init__(self) -> None:
        self.matches: list[tuple[int, int]] = []

    async def __call__(self, a: ba.Branch, b: ba.Branch) -> int:
        va, vb = value_of(a), value_of(b)
        self.matches.append((va, vb))
        await anyio.lowlevel.checkpoint()
        return 0 if va >= vb else 1


# -- the bracket -----------------------------------------------------------------------------


async def test_the_champion_of_a_bracket_commits(repo: Path) -> None:
    judge = Judge()
    cands = [writes(v) for v in (3, 7, 5, 1)]
    async with workspace(repo) as ws:
        with capture_logs() as logs:
            outcome = await ba.Tournament(cands, judge=judge).run(ws)
    assert sorted(judge.matches[:2]) == [(3, 7), (5, 1)]
    assert judge.matches[2] == (7, 5)
    assert outcome.strategy == "tournament"
    assert outcome.committed
    assert outcome.info == {"rounds": 2, "decided": True, "champion": 1}
    assert outcome.winner is not None
    assert outcome.winner.index == 1
    assert outcome.winner.changes == ("n.txt",)
    assert (repo / "n.txt").read_text() == "7"
    assert [r.success for r in outcome.results] == [True] * 4
    assert outcome.results[1].info["matches"] == [
        {"round": 1, "opponent": 0, "won": True, "error": None,
         "duration": outcome.results[1].info["matches"][0]["duration"]},
        {"round": 2, "opponent": 2, "won": True, "error": None,
         "duration": outcome.results[1].info["matches"][1]["duration"]},
    ]
    assert [m["won"] for m in outcome.results[0].info["matches"]] == [False]
    assert [m["opponent"] for m in outcome.results[3].info["matches"]] == [2]
    events = [e["event"] for e in logs]
    assert events.count("match_judged") == 3
    assert events.count("winner_committed") == 1


async def test_byes_for_odd_counts_rotate(repo: Path) -> None:
    """Five contestants: 4 gets the first bye and opens round 2; the winner of (2, 3) then waits."""
    judge = Judge()
    cands = [writes(v) for v in (10, 20, 30, 40, 50)]
    async with workspace(repo) as ws:
        outcome = await ba.Tournament(cands, judge=judge).run(ws)
    assert len(judge.matches) == 4  # n - 1 matches for n contestants
    assert sorted(judge.matches[:2]) == [(10, 20), (30, 40)]
    assert judge.matches[2] == (50, 20)
    assert judge.matches[3] == (40, 50)
    assert outcome.winner is not None
    assert outcome.winner.index == 4
    byes = sorted((m for r in outcome.results for m in r.info["matches"] if m["opponent"] is None),
                  key=lambda m: m["round"])
    assert byes == [{"round": 1, "opponent": None, "won": True, "error": None, "duration": 0.0},
                    {"round": 2, "opponent": None, "won": True, "error": None, "duration": 0.0}]
    assert (repo / "n.txt").read_text() == "50"


async def test_failed_candidates_are_eliminated_before_judging(repo: Path) -> None:
    judge = Judge()

    async def raises(b: ba.Branch) -> bool:
        raise ValueError("broken")

    async def garbage(b: ba.Branch) -> Any:
        return "yes"

    cands: list[ba.Candidate] = [writes(9, False), raises, writes(2), garbage, writes(4),
                                 ba.Command(["false"])]
    async with workspace(repo) as ws:
        outcome = await ba.Tournament(cands, judge=judge).run(ws)
    assert judge.matches == [(2, 4)]
    assert [r.success for r in outcome.results] == [False, False, True, False, True, False]
    assert outcome.results[1].error == "ValueError: broken"
    assert "matches" not in outcome.results[0].info
    assert outcome.winner is not None
    assert outcome.winner.index == 4


async def test_a_single_success_needs_no_judge(repo: Path) -> None:
    async def judge(a: ba.Branch, b: ba.Branch) -> int:
        raise AssertionError("no match to judge")

    async with workspace(repo) as ws:
        one = await ba.Tournament([writes(1, False), writes(2)], judge=judge).run(ws)
        none = await ba.Tournament([writes(1, False)], judge=judge).run(ws)
    assert one.winner is not None
    assert one.winner.index == 1
    assert not none.committed
    assert (repo / "n.txt").read_text() == "2"


# -- the judge ------------------------------------------------------------------------------------


async def test_the_judge_sees_throwaway_forks_and_may_return_a_branch(repo: Path) -> None:
    shown: list[tuple[str, str]] = []

    def judge(a: ba.Branch, b: ba.Branch) -> ba.Branch:  # sync: runs in a worker thread
        shown.append((a.name, b.name))
        assert a.parent is not None
        assert b.parent is not None
        (a.path / "judge-was-here.txt").write_text("scratch")
        (b.path / "n.txt").write_text("tampered")
        return b

    async with workspace(repo) as ws:
        outcome = await ba.Tournament([writes(1), writes(2)], judge=judge).run(ws)
    names = {r.branch for r in outcome.results}
    assert len(shown) == 1
    assert not set(shown[0]) & names  # forks, not the contestants themselves
    assert outcome.winner is not None
    assert outcome.winner.index == 1
    assert outcome.winner.changes == ("n.txt",)
    assert (repo / "n.txt").read_text() == "2"
    assert not (repo / "judge-was-here.txt").exists()


async def test_a_raising_judge_costs_both_the_match_and_never_hangs(repo: Path) -> None:
    """(0, 1) is judged by a raising judge: both lose; 2 had the bye and is champion."""

    async def judge(a: ba.Branch, b: ba.Branch) -> int:
        if value_of(a) == 0:
            raise RuntimeError("judge crashed")
        return 0

    before = snapshot(repo)
    async with workspace(repo) as ws:
        with anyio.fail_after(10):
            three = await ba.Tournament([writes(0), writes(1), writes(2)], judge=judge).run(ws)
        assert three.winner is not None
        assert three.winner.index == 2
        assert (repo / "n.txt").read_text() == "2"
        (repo / "n.txt").unlink()
        with anyio.fail_after(10):
            two = await ba.Tournament([writes(0), writes(1)], judge=judge).run(ws)
    assert [r.success for r in three.results] == [False, False, True]
    assert three.results[0].error == (
        "RuntimeError: judge crashed (the judge, round 1, against candidate 1)")
    assert three.results[1].error == (
        "RuntimeError: judge crashed (the judge, round 1, against candidate 0)")
    assert three.results[0].info["matches"][0]["error"] == "RuntimeError: judge crashed"
    assert not two.committed
    assert two.winner is None
    assert snapshot(repo) == before


@pytest.mark.parametrize("answer", [2, -1, True, "a", None, 0.0])
async def test_a_judge_answer_that_names_nobody_costs_both(repo: Path, answer: Any) -> None:
    async def judge(a: ba.Branch, b: ba.Branch) -> Any:
        return answer

    async with workspace(repo) as ws:
        outcome = await ba.Tournament([writes(0), writes(1)], judge=judge).run(ws)
    assert not outcome.committed
    for r in outcome.results:
        assert r.error is not None
        assert r.error.startswith("StrategyError: the judge returned"), r.error


async def test_judge_timeout_costs_both_and_kills_the_judges_processes(repo: Path) -> None:
    token = sleep_token()

    async def judge(a: ba.Branch, b: ba.Branch) -> int:
        if value_of(a) == 0:
            await a.run(["sleep", token])  # in the fork: killed with it
        return 0

    async with workspace(repo) as ws:
        started = time.monotonic()
        outcome = await ba.Tournament([writes(0), writes(1), writes(2), writes(3)],
                                      judge=judge, judge_timeout=0.3).run(ws)
        assert time.monotonic() - started < 3
    assert not outcome.timed_out
    assert outcome.results[0].error == (
        "TimeoutError: the judge took longer than judge_timeout=0.3 s "
        "(the judge, round 1, against candidate 1)")
    assert outcome.winner is not None
    assert outcome.winner.index == 2  # (2, 3) went 2's way; (0, 1) lost by both
    assert processes_with(token) == []


async def test_strategy_timeout_bounds_judging(repo: Path) -> None:
    """No judge_timeout, a judge that hangs: the strategy's timeout ends it, nothing commits."""
    token = sleep_token()

    async def judge(a: ba.Branch, b: ba.Branch) -> int:
        await a.run(["sleep", token])
        return 0

    before = snapshot(repo)
    async with workspace(repo) as ws:
        started = time.monotonic()
        outcome = await ba.Tournament([writes(0), writes(1), writes(2)], judge=judge,
                                      timeout=0.5).run(ws)
        assert time.monotonic() - started < 3
    assert outcome.timed_out
    assert not outcome.committed
    assert outcome.info == {"rounds": 1, "decided": False, "champion": None}
    assert outcome.results[0].error == (
        "TimeoutError: the strategy's timeout expired during the match")
    assert outcome.results[2].error is None  # had the bye; the tournament was not decided
    assert snapshot(repo) == before
    assert processes_with(token) == []


async def test_strategy_timeout_cuts_candidates_then_no_judging(repo: Path) -> None:
    token = sleep_token()
    judge = Judge()
    async with workspace(repo) as ws:
        started = time.monotonic()
        outcome = await ba.Tournament([writes(0), ba.Command(["sleep", token]), writes(5)],
                                      judge=judge, timeout=0.5).run(ws)
        assert time.monotonic() - started < 3
        solo = await ba.Tournament([writes(0), ba.Command(["sleep", token])],
                                   judge=judge, timeout=0.5).run(ws)
    assert outcome.timed_out
    assert not outcome.committed  # two finished, never judged: no champion
    assert judge.matches == []
    assert solo.timed_out
    assert solo.winner is not None  # the only one standing is decided without a match
    assert solo.winner.index == 0
    assert processes_with(token) == []


@pytest.mark.parametrize("where", ["candidates", "judge"])
async def test_outside_cancellation_leaves_nothing(repo: Path, where: str) -> None:
    token = sleep_token()

    async def judge(a: ba.Branch, b: ba.Branch) -> int:
        await b.run(["sleep", token], isolate=False)
        return 0

    cands: list[ba.Candidate] = [writes(0), writes(1)]
    if where == "candidates":
        cands.append(ba.Command(["sleep", token]))
    before = snapshot(repo)
    async with workspace(repo) as ws:
        started = time.monotonic()
        with anyio.move_on_after(0.5) as scope:
            await ba.Tournament(cands, judge=judge).run(ws)
        assert scope.cancelled_caught
        assert time.monotonic() - started < 3
        assert ws.branches() == []
    assert snapshot(repo) == before
    assert processes_with(token) == []


async def test_max_parallel_bounds_candidates_and_matches(repo: Path) -> None:
    running = peak = judging = judge_peak = 0

    def counted(v: int) -> Callable[[ba.Branch], Any]:
        async def candidate(b: ba.Branch) -> bool:
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            await anyio.sleep(0.05)
            running -= 1
            (b.path / "n.txt").write_text(str(v))
            return True

        return candidate

    async def judge(a: ba.Branch, b: ba.Branch) -> int:
        nonlocal judging, judge_peak
        judging += 1
        judge_peak = max(judge_peak, judging)
        await anyio.sleep(0.05)
        judging -= 1
        return 0 if value_of(a) > value_of(b) else 1

    async with workspace(repo) as ws:
        outcome = await ba.Tournament([counted(v) for v in range(8)], judge=judge,
                                      max_parallel=2).run(ws)
    assert peak == 2
    assert judge_peak == 2
    assert outcome.winner is not None
    assert outcome.winner.index == 7


# -- nesting ----------------------------------------------------------------------------------


async def test_a_tournament_of_speculates(repo: Path) -> None:
    depths: list[int] = []

    def inner(*values: int) -> ba.Speculate:
        def one(v: int) -> Callable[[ba.Branch], Any]:
            async def candidate(b: ba.Branch) -> bool:
                depths.append(b.depth)
                (b.path / "n.txt").write_text(str(v))
                return v >= 0

            return candidate

        return ba.Speculate([one(v) for v in values])

    judge = Judge()
    async with workspace(repo) as ws:
        outcome = await ba.Tournament([inner(-1, 3), inner(8), inner(-5)], judge=judge).run(ws)
    assert set(depths) == {1}
    assert [r.success for r in outcome.results] == [True, True, False]
    assert judge.matches == [(3, 8)]
    assert outcome.winner is not None
    assert outcome.winner.index == 1
    assert outcome.winner.info["outcome"]["strategy"] == "speculate"
    assert (repo / "n.txt").read_text() == "8"


async def test_a_tournament_on_a_branch_inside_best_of_n(repo: Path) -> None:
    judge = Judge()
    t1 = ba.Tournament([writes(1), writes(4)], judge=judge)
    t2 = ba.Tournament([writes(9, False)], judge=judge)
    async with workspace(repo) as ws:
        parent = await ws.fork()
        outcome = await ba.BestOfN([t1, t2]).run(parent)
        assert [r.success for r in outcome.results] == [True, False]
        assert (parent.path / "n.txt").read_text() == "4"
        assert not (repo / "n.txt").exists()
        await parent.commit()
    assert (repo / "n.txt").read_text() == "4"


# -- the registry and validation -------------------------------------------------------------


def test_registered_and_validated() -> None:
    assert ba.get_strategy("tournament") is ba.Tournament
    judge = Judge()
    with pytest.raises(TypeError, match="judge"):
        ba.Tournament([ba.Command(["true"])], judge="pick one")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout"):
        ba.Tournament([ba.Command(["true"])], judge=judge, judge_timeout=-1)
    with pytest.raises(ValueError, match="max_parallel"):
        ba.Tournament([ba.Command(["true"])], judge=judge, max_parallel=0)
    assert "judge_timeout=None" in repr(ba.Tournament([ba.Command(["true"])], judge=judge))
    with pytest.raises(ba.InvalidCandidates, match="no candidates"):
        ba.Tournament([], judge=judge)
