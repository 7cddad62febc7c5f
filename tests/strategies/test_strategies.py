"""Speculate and BestOfN on real branches (copy backend), on asyncio and trio.

Every test also checks the strategy layer's promise that no path leaves a
branch open: success, failure, timeout, exceptions, outside cancellation.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from structlog.testing import capture_logs

import branchagent as ba
from _support import alive, snapshot, workspace

pytestmark = pytest.mark.anyio


# -- helpers --------------------------------------------------------------------------


def processes_with(token: str) -> list[int]:
    """Live pids whose command line contains ``token``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if token.encode() in cmdline and alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def names(root: Path, pattern: str) -> list[str]:
    return sorted(p.name for p in root.glob(pattern))


def exists(path: Path) -> bool:
    return path.exists()


def writes(path: str, text: str, result: Any = True) -> Callable[[ba.Branch], Any]:
    """An async candidate that writes ``text`` to ``path`` in its branch and returns ``result``."""

    async def candidate(b: ba.Branch) -> Any:
        (b.path / path).write_text(text)
        return result

    return candidate


async def sleeps_forever(b: ba.Branch) -> bool:
    await anyio.sleep(30)
    return True


# -- Speculate ------------------------------------------------------------------------


async def test_speculate_outcome_arrives_when_the_winner_finishes(
    repo: Path, tmp_path: Path
) -> None:
    """Seven losers that would take 30 s; the winner takes ~0.2 s; every loser is killed."""
    pids = tmp_path / "pids"
    pids.mkdir()
    token = f"30.{secrets.randbelow(10**6):06d}"  # a sleep argument no other process has

    def recorded_pids() -> list[int]:
        return [int(p.read_text()) for p in pids.iterdir() if p.read_text().strip()]

    async def python_loser(b: ba.Branch) -> bool:
        code = (f"import os, time; open({str(pids / 'py')!r}, 'w').write(str(os.getpid())); "
                "time.sleep(30)")
        r = await b.run([sys.executable, "-c", code], isolate=False)
        return r.ok

    async def winner(b: ba.Branch) -> bool:
        with anyio.fail_after(10):  # every loser is up before we win
            while len(list(pids.iterdir())) < 2:  # noqa: ASYNC110 (other processes write them)
                await anyio.sleep(0.01)
        await anyio.sleep(0.2)
        (b.path / "README.md").write_text("# fixed\n")
        return True

    losers: list[ba.Candidate] = [
        ba.Command(["sleep", token]),  # isolated: its own PID namespace
        ba.Command(["sleep", token]),
        ba.Command(["sh", "-c", f"echo $$ > {pids / 'sh'}; exec sleep {token}"], isolate=False),
        sleeps_forever,
        sleeps_forever,
        python_loser,
        ba.Command([sys.executable, "-c", f"import time; time.sleep({token})"]),
    ]
    async with workspace(repo) as ws:
        started = time.monotonic()
        with capture_logs() as logs:
            outcome = await ba.Speculate([*losers[:4], winner, *losers[4:]]).run(ws)
        elapsed = time.monotonic() - started
    assert elapsed < 5, f"the outcome took {elapsed:.1f} s: it waited for a loser"
    assert outcome.committed
    assert outcome.winner is not None
    assert outcome.winner.index == 4
    assert outcome.winner.changes == ("README.md",)
    assert (repo / "README.md").read_text() == "# fixed\n"
    assert [r.index for r in outcome.results if r.success] == [4]
    for r in outcome.results:
        if r.index != 4:
            assert r.error == "Cancelled: candidate 4 succeeded first"
    recorded = recorded_pids()
    assert len(recorded) == 2
    assert not [pid for pid in recorded if alive(pid)], "a loser's process survived"
    assert processes_with(token) == [], "a loser's process survived"
    assert len([e for e in logs if e["event"] == "winner_committed"]) == 1
    assert len([e for e in logs if e["event"] == "candidate_finished"]) == 8


async def test_speculate_timeout_bounds_wall_time(repo: Path) -> None:
    before = snapshot(repo)
    token = f"30.{secrets.randbelow(10**6):06d}"
    cands: list[ba.Candidate] = [ba.Command(["sleep", token]), sleeps_forever,
                                 writes("x.txt", "x", result=False)]
    async with workspace(repo) as ws:
        started = time.monotonic()
        outcome = await ba.Speculate(cands, timeout=0.5).run(ws)
        elapsed = time.monotonic() - started
    assert elapsed < 3
    assert outcome.timed_out
    assert not outcome.committed
    assert outcome.winner is None
    assert outcome.results[0].error == "TimeoutError: the strategy's timeout expired"
    assert outcome.results[1].error == "TimeoutError: the strategy's timeout expired"
    assert outcome.results[2].error is None
    assert not outcome.results[2].success
    assert snapshot(repo) == before
    assert processes_with(token) == []


async def test_speculate_commits_exactly_once(repo: Path) -> None:
    """Twelve candidates that all succeed at once: one commit, the winner's content."""
    cands = [writes(f"c{i}.txt", str(i)) for i in range(12)]
    cands += [writes("README.md", f"winner {i}\n") for i in range(12, 16)]
    async with workspace(repo) as ws:
        with capture_logs() as logs:
            outcome = await ba.Speculate(cands).run(ws)
    assert outcome.committed
    assert outcome.winner is not None
    i = outcome.winner.index
    added = names(repo, "c*.txt")
    if i < 12:
        assert added == [f"c{i}.txt"]
        assert (repo / "README.md").read_text() == "# demo\n"
    else:
        assert added == []
        assert (repo / "README.md").read_text() == f"winner {i}\n"
    assert len([e for e in logs if e["event"] == "winner_committed"]) == 1
    # Another candidate may also have finished successfully before the winner stopped
    # the rest (they run concurrently); it is reported as a success, but only the
    # winner's changes landed (checked above) and only the winner is named.
    assert outcome.winner.success
    assert i in [r.index for r in outcome.results if r.success]


async def test_speculate_skips_failures_and_respects_max_parallel(repo: Path) -> None:
    running = 0
    peak = 0

    def tracked(result: Any, delay: float) -> Callable[[ba.Branch], Any]:
        async def candidate(b: ba.Branch) -> Any:
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            try:
                await anyio.sleep(delay)
            finally:
                running -= 1
            (b.path / "out.txt").write_text(repr(result))
            return result

        return candidate

    cands = [tracked(False, 0.05), tracked(False, 0.05), tracked(True, 0.05),
             tracked(True, 1.0), tracked(True, 30)]
    async with workspace(repo) as ws:
        outcome = await ba.Speculate(cands, max_parallel=2).run(ws)
    assert peak == 2
    assert outcome.winner is not None
    assert outcome.winner.index == 2
    assert (repo / "out.txt").read_text() == "True"
    assert outcome.results[4].branch is None  # never started: no branch was forked for it
    assert outcome.results[4].error == "Cancelled: candidate 2 succeeded first"


async def test_speculate_all_fail(repo: Path) -> None:
    before = snapshot(repo)
    async with workspace(repo) as ws:
        outcome = await ba.Speculate([writes("a", "a", False), ba.Command(["false"])]).run(ws)
    assert not outcome.committed
    assert outcome.winner is None
    assert not outcome.timed_out
    assert [r.success for r in outcome.results] == [False, False]
    assert outcome.results[1].info["returncode"] == 1
    assert snapshot(repo) == before


async def test_speculate_with_no_candidates_is_refused(repo: Path) -> None:
    before = snapshot(repo)
    with pytest.raises(ba.InvalidCandidates, match=r"no candidates.*at least one candidate"):
        ba.Speculate([])
    assert snapshot(repo) == before


# -- BestOfN ------------------------------------------------------------------------------


async def test_best_of_n_commits_highest_score(repo: Path) -> None:
    cands = [writes("f.txt", "a", 0.1), writes("f.txt", "b", (True, 0.9)),
             writes("f.txt", "c", 0.5), writes("f.txt", "d", (False, 10.0))]
    async with workspace(repo) as ws:
        outcome = await ba.BestOfN(cands).run(ws)
    assert outcome.committed
    assert outcome.winner is not None
    assert outcome.winner.index == 1
    assert outcome.winner.score == 0.9
    assert (repo / "f.txt").read_text() == "b"
    assert [(r.success, r.score) for r in outcome.results] == [
        (True, 0.1), (True, 0.9), (True, 0.5), (False, 10.0)]


async def test_best_of_n_ties_go_to_lowest_index(repo: Path) -> None:
    cands = [writes("f.txt", "a", 0.5), writes("f.txt", "b", 0.9), writes("f.txt", "c", 0.9),
             writes("f.txt", "d", True)]
    async with workspace(repo) as ws:
        outcome = await ba.BestOfN(cands).run(ws)
    assert outcome.winner is not None
    assert outcome.winner.index == 1
    assert (repo / "f.txt").read_text() == "b"


async def test_best_of_n_without_scores_takes_first_success(repo: Path) -> None:
    cands = [writes("f.txt", "a", False), writes("f.txt", "b"), writes("f.txt", "c")]
    async with workspace(repo) as ws:
        outcome = await ba.BestOfN(cands).run(ws)
    assert outcome.winner is not None
    assert outcome.winner.index == 1


async def test_best_of_n_external_scores(repo: Path) -> None:
    """Scores from outside (logprobs) override the candidates' own."""
    cands = [writes("f.txt", "a", 0.9), writes("f.txt", "b", 0.1), writes("f.txt", "c", False)]
    async with workspace(repo) as ws:
        outcome = await ba.BestOfN(cands, scores=[-3.0, -0.5, -0.1]).run(ws)
    assert outcome.winner is not None
    assert outcome.winner.index == 1
    assert outcome.winner.score == -0.5
    assert outcome.winner.info["candidate_score"] == 0.1
    assert outcome.winner.info["prior_score"] == -0.5
    with pytest.raises(ValueError, match="2 entries for 3 candidates"):
        ba.BestOfN(cands, scores=[1.0, 2.0])


async def test_best_of_n_evaluate(repo: Path) -> None:
    """evaluate(branch) runs after each successful candidate, in its branch; its score wins."""
    seen: list[str] = []

    async def evaluate(b: ba.Branch) -> ba.Verdict:
        text = (b.path / "f.txt").read_text()
        seen.append(text)
        return ba.Verdict(text != "bad", float(len(text)), {"length": len(text)})

    cands = [writes("f.txt", "short", 100.0), writes("f.txt", "a longer one"),
             writes("f.txt", "bad"), writes("f.txt", "never evaluated", False)]
    async with workspace(repo) as ws:
        outcome = await ba.BestOfN(cands, evaluate=evaluate).run(ws)
    assert sorted(seen) == sorted(["short", "a longer one", "bad"])
    assert outcome.winner is not None
    assert outcome.winner.index == 1
    assert outcome.winner.info["evaluate"] == {"success": True, "score": 12.0, "length": 12}
    assert [r.success for r in outcome.results] == [True, True, False, False]
    assert (repo / "f.txt").read_text() == "a longer one"


async def test_best_of_n_evaluate_command(repo: Path) -> None:
    """A Command can evaluate too: here it passes only when f.txt says 'ok'."""
    script = 'grep -q ok f.txt && wc -c < f.txt > "$BRANCHAGENT_SCORE_FILE"'
    check = ba.Command(["sh", "-c", script])
    cands = [writes("f.txt", "no"), writes("f.txt", "ok"), writes("f.txt", "ok, longer")]
    async with workspace(repo) as ws:
        outcome = await ba.BestOfN(cands, evaluate=check).run(ws)
    assert [r.success for r in outcome.results] == [False, True, True]
    assert outcome.winner is not None
    assert outcome.winner.index == 2
    assert outcome.winner.score == len("ok, longer")


async def test_best_of_n_commit_false_leaves_base_pristine(repo: Path) -> None:
    before = snapshot(repo)
    cands: list[ba.Candidate] = [
        writes("README.md", "a", 0.3), writes("new.txt", "b", (True, 0.7)),
        writes("README.md", "c", (False, 0.9)), ba.Command(["sh", "-c", "echo 0.5 >&3"])]
    async with workspace(repo) as ws:
        outcome = await ba.BestOfN(cands, commit=False).run(ws)
    assert snapshot(repo) == before
    assert not outcome.committed
    assert outcome.winner is None
    assert [(r.success, r.score) for r in outcome.results] == [
        (True, 0.3), (True, 0.7), (False, 0.9), (True, 0.5)]
    assert outcome.best is not None
    assert outcome.best.index == 1
    assert outcome.results[1].changes == ("new.txt",)


async def test_best_of_n_timeout_commits_best_finished(repo: Path) -> None:
    token = f"30.{secrets.randbelow(10**6):06d}"
    cands: list[ba.Candidate] = [writes("f.txt", "quick", 0.2), ba.Command(["sleep", token]),
                                 sleeps_forever]
    async with workspace(repo) as ws:
        started = time.monotonic()
        outcome = await ba.BestOfN(cands, timeout=0.5).run(ws)
        elapsed = time.monotonic() - started
    assert elapsed < 3
    assert outcome.timed_out
    assert outcome.committed
    assert outcome.winner is not None
    assert outcome.winner.index == 0
    assert (repo / "f.txt").read_text() == "quick"
    assert processes_with(token) == []


async def test_conflict_at_commit_is_recorded_not_raised(repo: Path) -> None:
    """The base changed the winner's path behind its back: nothing is committed."""

    async def candidate(b: ba.Branch) -> bool:
        (b.path / "README.md").write_text("branch\n")
        (repo / "README.md").write_text("outside\n")  # the base, changed from outside
        return True

    async with workspace(repo) as ws:
        outcome = await ba.BestOfN([candidate]).run(ws)
    assert not outcome.committed
    assert outcome.winner is None
    assert outcome.results[0].error is not None
    assert outcome.results[0].error.startswith("ConflictError:")
    assert (repo / "README.md").read_text() == "outside\n"


# -- candidates ------------------------------------------------------------------------------


async def test_raising_and_garbage_candidates_are_failures(repo: Path) -> None:
    async def raises(b: ba.Branch) -> bool:
        raise ValueError("boom")

    def sync_raises(b: ba.Branch) -> bool:
        raise KeyError("missing")

    async def returns_str(b: ba.Branch) -> Any:
        return "yes"  # truthy, but not a verdict

    async def returns_none(b: ba.Branch) -> Any:
        return None

    async def returns_nan(b: ba.Branch) -> Any:
        return float("nan")

    async def bad_tuple(b: ba.Branch) -> Any:
        return (1, 2, 3)

    async def closes_its_branch(b: ba.Branch) -> bool:
        await b.abort()
        return True

    async def returns_object(b: ba.Branch) -> Any:
        return object()

    def sync_ok(b: ba.Branch) -> tuple[bool, float]:
        (b.path / "sync.txt").write_text("from a thread")
        return (True, 0.25)

    # Something that is not a candidate at all is refused when the strategy is built.
    with pytest.raises(ba.InvalidCandidates, match=r"candidates\[1\] is not a candidate: int 42"):
        ba.BestOfN([sync_ok, 42])  # type: ignore[list-item]
    cands: list[Any] = [raises, sync_raises, returns_str, returns_none, returns_nan, bad_tuple,
                        closes_its_branch, returns_object, sync_ok]
    async with workspace(repo) as ws:
        outcome = await ba.BestOfN(cands).run(ws)
    errors = [r.error for r in outcome.results]
    assert errors[0] == "ValueError: boom"
    assert errors[1] == "KeyError: 'missing'"
    for e in errors[2:8]:
        assert str(e).startswith("CandidateError:"), e
    assert "returned str 'yes'" in str(errors[2])
    assert [r.success for r in outcome.results] == [False] * 8 + [True]
    assert outcome.winner is not None
    assert outcome.winner.index == 8
    assert outcome.winner.score == 0.25
    assert (repo / "sync.txt").read_text() == "from a thread"


async def test_garbage_never_wins_speculate(repo: Path) -> None:
    async def returns_str(b: ba.Branch) -> Any:
        return "true"

    async with workspace(repo) as ws:
        outcome = await ba.Speculate([returns_str, returns_str]).run(ws)
    assert not outcome.committed


async def test_command_scores_and_isolation(repo: Path) -> None:
    py = sys.executable
    cands = [
        ba.Command(["sh", "-c", 'echo 0.25 > "$BRANCHAGENT_SCORE_FILE"']),
        ba.Command([py, "-c", "import os; os.write(3, b'0.1\\n0.75\\n')"]),
        ba.Command(["sh", "-c", 'echo high > "$BRANCHAGENT_SCORE_FILE"']),
        ba.Command(["sh", "-c", 'echo 9 >&3; exit 3']),
        ba.Command(["sh", "-c", 'echo "$BRANCHAGENT_SCORE_FILE"; pwd; echo x > made.txt'],
                   env={"EXTRA": "1"}),
    ]
    async with workspace(repo) as ws:
        outcome = await ba.BestOfN(cands, commit=False).run(ws)
    r = outcome.results
    assert (r[0].success, r[0].score) == (True, 0.25)
    assert (r[1].success, r[1].score) == (True, 0.75)
    assert not r[2].success
    assert str(r[2].error).startswith("CandidateError:")
    assert (r[3].success, r[3].score, r[3].info["returncode"]) == (False, 9.0, 3)
    score_file, cwd = r[4].info["stdout_tail"].split()
    assert cwd == str(repo)  # isolated: the branch is seen at the workspace's own path
    assert not Path(score_file).is_relative_to(repo)
    assert not exists(Path(score_file))  # cleaned up
    assert r[4].changes == ("made.txt",)
    assert not exists(repo / "made.txt")


async def test_results_over_64k(repo: Path) -> None:
    """Large payloads neither hang nor get lost: 2 MiB of stdout, 200 KiB of info."""
    big = "x" * 200_000

    async def big_info(b: ba.Branch) -> ba.Verdict:
        return ba.Verdict(True, 1.0, {"blob": big})

    spew = ba.Command([sys.executable, "-c", "import sys; sys.stdout.write('y' * (2 << 20))"])
    async with workspace(repo) as ws:
        with anyio.fail_after(30):
            outcome = await ba.BestOfN([big_info, spew]).run(ws)
    assert outcome.results[0].info["blob"] == big
    assert outcome.results[1].success
    assert outcome.results[1].info["stdout_chars"] == 2 << 20
    data = json.loads(outcome.to_json())
    assert data["winner"]["info"]["blob"] == big
    assert data["results"][1]["success"] is True


async def test_outcome_json(repo: Path) -> None:
    async with workspace(repo) as ws:
        outcome = await ba.BestOfN([writes("a", "a", 0.5), writes("b", "b", float("-inf"))]).run(ws)
    data = json.loads(outcome.to_json())
    assert data["strategy"] == "best_of_n"
    assert data["committed"] is True
    assert data["winner"]["index"] == 0
    assert data["results"][1]["score"] == "-inf"
    assert data["results"][0]["changes"] == ["a"]


def test_verdict_and_command_validation() -> None:
    one: Any = 1
    with pytest.raises(TypeError):
        ba.Verdict(one, 0.5)
    with pytest.raises(ValueError, match="NaN"):
        ba.Verdict(True, float("nan"))
    assert ba.Verdict(True, 3).score == 3.0
    with pytest.raises(ValueError, match="argv"):
        ba.Command("pytest -q")  # a str is a Sequence[str]: caught at run time
    with pytest.raises(ValueError, match="max_parallel"):
        ba.Speculate([ba.Command(["true"])], max_parallel=0)
    with pytest.raises(ValueError, match="timeout"):
        ba.BestOfN([ba.Command(["true"])], timeout=-1)


# -- nesting ------------------------------------------------------------------------------------


async def test_best_of_n_of_speculates(repo: Path) -> None:
    """A strategy stands where a candidate stands: its forks nest under the candidate's branch."""
    depths: list[int] = []

    def nested(text: str, score: float, ok: bool = True) -> Callable[[ba.Branch], Any]:
        async def candidate(b: ba.Branch) -> ba.Verdict:
            depths.append(b.depth)
            (b.path / "f.txt").write_text(text)
            return ba.Verdict(ok, score)

        return candidate

    inner_a = ba.Speculate([nested("a-fail", 0.0, ok=False), nested("a", 0.3)])
    inner_b = ba.Speculate([nested("b", 0.8)])
    inner_c = ba.Speculate([nested("c-fail", 1.0, ok=False)])
    async with workspace(repo) as ws:
        outcome = await ba.BestOfN([inner_a, inner_b, inner_c]).run(ws)
    assert set(depths) == {1}  # children of the BestOfN's branches (depth 0)
    assert [r.success for r in outcome.results] == [True, True, False]
    assert outcome.winner is not None
    assert outcome.winner.index == 1
    assert outcome.winner.score == 0.8
    assert outcome.winner.changes == ("f.txt",)
    inner = outcome.winner.info["outcome"]
    assert inner["strategy"] == "speculate"
    assert inner["winner"]["index"] == 0
    assert (repo / "f.txt").read_text() == "b"


async def test_strategy_on_a_branch_commits_into_it(repo: Path) -> None:
    async with workspace(repo) as ws:
        parent = await ws.fork()
        outcome = await ba.Speculate([writes("f.txt", "x")]).run(parent)
        assert outcome.committed
        assert parent.state is ba.BranchState.OPEN
        assert (parent.path / "f.txt").read_text() == "x"
        assert not (repo / "f.txt").exists()
        assert [b.name for b in ws.branches()] == [parent.name]
        await parent.commit()
    assert (repo / "f.txt").read_text() == "x"


# -- no branch left open -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["speculate", "best_of_n", "nested"])
async def test_outside_cancellation_leaves_nothing(repo: Path, kind: str) -> None:
    before = snapshot(repo)
    token = f"30.{secrets.randbelow(10**6):06d}"
    cands: list[ba.Candidate] = [ba.Command(["sleep", token]), sleeps_forever,
                                 ba.Command(["sleep", token], isolate=False)]
    strategy: ba.Strategy
    if kind == "speculate":
        strategy = ba.Speculate(cands)
    elif kind == "best_of_n":
        strategy = ba.BestOfN([*cands, writes("f.txt", "done")])
    else:
        strategy = ba.BestOfN([ba.Speculate(cands), ba.Speculate(cands)])
    async with workspace(repo) as ws:
        started = time.monotonic()
        with anyio.move_on_after(0.5) as scope:
            await strategy.run(ws)
        assert scope.cancelled_caught
        assert time.monotonic() - started < 3
        assert ws.branches() == []
    assert snapshot(repo) == before
    assert processes_with(token) == []


async def test_cancellation_from_a_sibling_task(repo: Path) -> None:
    token = f"30.{secrets.randbelow(10**6):06d}"
    async with workspace(repo) as ws:
        async with anyio.create_task_group() as tg:

            async def go() -> None:
                await ba.BestOfN([ba.Command(["sleep", token]), sleeps_forever]).run(ws)

            tg.start_soon(go)
            await anyio.sleep(0.3)
            tg.cancel_scope.cancel()
        assert ws.branches() == []
    assert processes_with(token) == []


async def test_exception_in_evaluate_fails_the_candidate(repo: Path) -> None:
    async def evaluate(b: ba.Branch) -> bool:
        raise RuntimeError("judge crashed")

    before = snapshot(repo)
    async with workspace(repo) as ws:
        outcome = await ba.BestOfN([writes("f.txt", "x"), writes("g.txt", "y")],
                                   evaluate=evaluate).run(ws)
    assert not outcome.committed
    assert [r.error for r in outcome.results] == ["RuntimeError: judge crashed"] * 2
    assert snapshot(repo) == before


async def test_base_exception_from_a_candidate_propagates_and_cleans_up(repo: Path) -> None:
    class Stop(BaseException):
        pass

    async def stops(b: ba.Branch) -> bool:
        await anyio.sleep(0.1)
        raise Stop

    async with workspace(repo) as ws:
        with pytest.raises(BaseExceptionGroup) as info:
            await ba.Speculate([stops, sleeps_forever]).run(ws)
        assert info.group_contains(Stop)
        assert ws.branches() == []


async def test_a_sync_loser_does_not_hold_the_outcome(repo: Path) -> None:
    """A sync callable cannot be interrupted: its thread is left to finish, the outcome is not."""

    def slow(b: ba.Branch) -> bool:
        time.sleep(1.5)
        return True

    async with workspace(repo) as ws:
        started = time.monotonic()
        outcome = await ba.Speculate([slow, writes("f.txt", "fast")]).run(ws)
        assert time.monotonic() - started < 1.2
    assert outcome.winner is not None
    assert outcome.winner.index == 1
    await anyio.sleep(2)  # let the abandoned thread finish while the loop still runs


class CountingExecutor:
    """An executor that delegates to the local one and counts what passes through."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.local = ba.LocalExecutor()

    async def execute(self, candidate: ba.Candidate, branch: ba.Branch) -> ba.Verdict:
        self.seen.append(branch.name)
        return await self.local.execute(candidate, branch)


async def test_candidates_go_through_the_executor_seam(repo: Path) -> None:
    ex = CountingExecutor()
    assert isinstance(ex, ba.Executor)

    async def evaluate(b: ba.Branch) -> float:
        return 1.0

    async with workspace(repo) as ws:
        outcome = await ba.BestOfN([writes("a", "a"), writes("b", "b")], evaluate=evaluate,
                                   executor=ex).run(ws)
    branches = [str(r.branch) for r in outcome.results]
    assert sorted(ex.seen) == sorted([*branches, *branches])  # candidate, then evaluate


async def test_no_file_descriptor_leaks_per_timed_out_candidate(repo: Path) -> None:
    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    cands: list[ba.Candidate] = [ba.Command(["sleep", "30"]), ba.Command(["sleep", "30"]),
                                 sleeps_forever]
    async with workspace(repo) as ws:
        await ba.Speculate(cands, timeout=0.3).run(ws)  # warm up lazily opened resources
        before = open_fds()
        for _ in range(5):
            outcome = await ba.Speculate(cands, timeout=0.3).run(ws)
            assert outcome.timed_out
        assert open_fds() == before
