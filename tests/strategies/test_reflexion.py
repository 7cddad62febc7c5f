"""Reflexion on real branches (copy backend), on asyncio and trio.

Every test also checks that no path leaves a branch open (the ``workspace``
helper asserts it before closing).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from structlog.testing import capture_logs

import branchagent as ba
from _support import processes_with, sleep_token, snapshot, workspace

pytestmark = pytest.mark.anyio


# -- helpers --------------------------------------------------------------------------


# -- attempts and feedback ------------------------------------------------------------------


async def test_feedback_flows_and_the_first_success_commits(repo: Path) -> None:
    seen: list[str | None] = []
    saw_earlier: list[bool] = []

    async def task(b: ba.Branch, feedback: str | None) -> ba.Verdict:
        seen.append(feedback)
        saw_earlier.append((b.path / "attempt.txt").exists())
        n = len(seen) - 1
        (b.path / "attempt.txt").write_text(f"attempt {n}\n")
        if n < 2:
            return ba.Verdict(False, info={"feedback": f"too small: {n}"})
        return ba.Verdict(True, 0.5)

    async with workspace(repo) as ws:
        outcome = await ba.Reflexion(task, max_attempts=5).run(ws)
    assert seen == [None, "too small: 0", "too small: 1"]
    assert saw_earlier == [False, False, False]  # every attempt starts from the target
    assert outcome.committed
    assert outcome.strategy == "reflexion"
    assert outcome.winner is not None
    assert outcome.winner.index == 2
    assert outcome.winner.score == 0.5
    assert outcome.winner.changes == ("attempt.txt",)
    assert [r.success for r in outcome.results] == [False, False, True]
    assert [r.info["received_feedback"] for r in outcome.results] == seen
    assert (repo / "attempt.txt").read_text() == "attempt 2\n"


async def test_default_feedback_describes_errors_and_garbage(repo: Path) -> None:
    seen: list[str | None] = []

    async def task(b: ba.Branch, feedback: str | None) -> Any:
        seen.append(feedback)
        if len(seen) == 1:
            raise ValueError("bad patch")
        if len(seen) == 2:
            return "yes"  # not a verdict: a failure, never a truthy success
        if len(seen) == 3:
            return (False, 0.25)
        return True

    async with workspace(repo) as ws:
        outcome = await ba.Reflexion(task, max_attempts=4).run(ws)
    assert seen[0] is None
    assert seen[1] == "ValueError: bad patch"
    assert seen[2] is not None
    assert seen[2].startswith("CandidateError: candidate returned str 'yes'")
    assert seen[3] == "the attempt did not succeed (score 0.25)"
    assert outcome.winner is not None
    assert outcome.winner.index == 3


async def test_critique_runs_in_the_failed_attempts_branch(repo: Path) -> None:
    """The critique sees what the attempt left; what it writes vanishes with the branch."""
    critiqued: list[tuple[str, int, str | None]] = []
    seen: list[str | None] = []

    async def task(b: ba.Branch, feedback: str | None) -> bool:
        seen.append(feedback)
        (b.path / "src" / "pkg" / "mod.py").write_text(f"def f():\n    return {len(seen)}\n")
        return len(seen) == 3

    async def critique(b: ba.Branch, result: ba.Result) -> str:
        assert b.name == result.branch
        assert b.state is ba.BranchState.OPEN
        assert not result.success
        text = (b.path / "src" / "pkg" / "mod.py").read_text()
        (b.path / "critique-notes.txt").write_text("scratch")
        critiqued.append((b.name, result.index, result.error))
        return f"attempt {result.index} wrote {text.split()[-1]}; make it 3"

    before = snapshot(repo)
    async with workspace(repo) as ws:
        outcome = await ba.Reflexion(task, max_attempts=3, critique=critique).run(ws)
    assert seen == [None, "attempt 0 wrote 1; make it 3", "attempt 1 wrote 2; make it 3"]
    assert [(i, e) for _, i, e in critiqued] == [(0, None), (1, None)]
    assert [name for name, _, _ in critiqued] == [r.branch for r in outcome.results[:2]]
    assert outcome.results[0].info["critique"]["feedback"] == "attempt 0 wrote 1; make it 3"
    assert outcome.results[0].info["critique"]["error"] is None
    assert "critique" not in outcome.results[2].info
    assert outcome.winner is not None
    assert outcome.winner.index == 2
    assert outcome.winner.changes == ("src/pkg/mod.py",)
    after = snapshot(repo)
    assert "critique-notes.txt" not in after
    assert after == {**before, "src/pkg/mod.py": b"def f():\n    return 3\n"}


async def test_a_raising_critique_is_recorded_and_its_error_is_the_feedback(repo: Path) -> None:
    seen: list[str | None] = []

    async def task(b: ba.Branch, feedback: str | None) -> bool:
        seen.append(feedback)
        (b.path / "f.txt").write_text(str(len(seen)))
        return len(seen) == 3

    calls = 0

    async def critique(b: ba.Branch, result: ba.Result) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("critic crashed")
        return 42  # not text

    async with workspace(repo) as ws:
        with anyio.fail_after(10):
            outcome = await ba.Reflexion(task, max_attempts=3, critique=critique).run(ws)
    assert seen[:2] == [None, "RuntimeError: critic crashed"]
    assert seen[2] is not None
    assert seen[2].startswith("CandidateError: the critique returned int 42")
    first = outcome.results[0].info["critique"]
    assert first["error"] == "RuntimeError: critic crashed"
    assert first["feedback"] is None
    assert outcome.results[0].error is None  # the attempt's own result is untouched
    assert outcome.committed
    assert (repo / "f.txt").read_text() == "3"


async def test_sync_task_and_sync_critique(repo: Path) -> None:
    def task(b: ba.Branch, feedback: str | None) -> tuple[bool, float]:
        (b.path / "f.txt").write_text(feedback or "first")
        return (feedback == "sync critique of 0", 1.5)

    def critique(b: ba.Branch, result: ba.Result) -> str:
        assert (b.path / "f.txt").read_text() == "first"
        return f"sync critique of {result.index}"

    async with workspace(repo) as ws:
        outcome = await ba.Reflexion(task, max_attempts=2, critique=critique).run(ws)
    assert outcome.winner is not None
    assert outcome.winner.index == 1
    assert outcome.winner.score == 1.5
    assert (repo / "f.txt").read_text() == "sync critique of 0"


async def test_critique_can_isolate_itself_with_branch_call(repo: Path) -> None:
    """A critique may run its work in a sandboxed process in the failed branch."""

    def read_in_child(b: Any) -> str:
        return f"{os.getpid()}:" + (Path(b.path) / "f.txt").read_text()

    async def task(b: ba.Branch, feedback: str | None) -> bool:
        (b.path / "f.txt").write_text("v1" if feedback is None else "v2")
        return feedback is not None

    async def critique(b: ba.Branch, result: ba.Result) -> str:
        text: str = await b.call(read_in_child, isolate=False)
        return text

    async with workspace(repo) as ws:
        outcome = await ba.Reflexion(task, max_attempts=2, critique=critique).run(ws)
    feedback = outcome.results[1].info["received_feedback"]
    pid, content = feedback.split(":")
    assert int(pid) != os.getpid()
    assert content == "v1"
    assert outcome.committed


async def test_exhausted_attempts_commit_nothing(repo: Path) -> None:
    calls: list[int] = []

    async def task(b: ba.Branch, feedback: str | None) -> bool:
        (b.path / "README.md").write_text("broken\n")
        return False

    async def critique(b: ba.Branch, result: ba.Result) -> str:
        calls.append(result.index)
        return "no"

    before = snapshot(repo)
    async with workspace(repo) as ws:
        with capture_logs() as logs:
            outcome = await ba.Reflexion(task, max_attempts=3, critique=critique).run(ws)
    assert not outcome.committed
    assert outcome.winner is None
    assert not outcome.timed_out
    assert len(outcome.results) == 3
    assert calls == [0, 1]  # the last failure is not critiqued
    assert snapshot(repo) == before
    assert [e["event"] for e in logs].count("critique_finished") == 2
    assert [e["event"] for e in logs].count("winner_committed") == 0


# -- commands ---------------------------------------------------------------------------------


async def test_command_task_gets_the_feedback_in_its_environment(repo: Path) -> None:
    script = (
        'if [ -z "$BRANCHAGENT_FEEDBACK" ]; then echo "need a hint" >&2; exit 3; fi\n'
        'printf "%s" "$BRANCHAGENT_FEEDBACK" > feedback.txt\n'
    )
    async with workspace(repo) as ws:
        outcome = await ba.Reflexion(ba.Command(["sh", "-c", script]), max_attempts=2).run(ws)
    assert [r.success for r in outcome.results] == [False, True]
    assert outcome.results[0].info["returncode"] == 3
    got = (repo / "feedback.txt").read_text()
    assert got == outcome.results[1].info["received_feedback"]
    assert got == "exit status 3\nstderr:\nneed a hint"


async def test_command_critique_output_is_the_feedback(repo: Path) -> None:
    """A failing check is the usual critique: its output counts, whatever its exit status."""
    seen: list[str | None] = []

    async def task(b: ba.Branch, feedback: str | None) -> bool:
        seen.append(feedback)
        (b.path / "answer.txt").write_text("41" if feedback is None else "42")
        return feedback is not None

    critique = ba.Command(["sh", "-c", 'echo "answer was $(cat answer.txt)"; '
                                       'echo "why: $BRANCHAGENT_FEEDBACK" >&2; exit 1'])
    async with workspace(repo) as ws:
        outcome = await ba.Reflexion(task, max_attempts=2, critique=critique).run(ws)
    assert seen == [None, "answer was 41\nwhy: the attempt did not succeed"]
    record = outcome.results[0].info["critique"]
    assert record["returncode"] == 1
    assert record["error"] is None
    assert (repo / "answer.txt").read_text() == "42"


async def test_large_feedback_is_capped_for_the_environment(repo: Path) -> None:
    """One environment string may hold 128 KiB: a Command gets the last 64 KiB of the feedback."""

    async def critique(b: ba.Branch, result: ba.Result) -> str:
        return "x" * 300_000 + "END"

    script = ('test -n "$BRANCHAGENT_FEEDBACK" || exit 1\n'
              'printf "%s" "$BRANCHAGENT_FEEDBACK" | tail -c 3 > tail.txt\n'
              'printf "%s" "$BRANCHAGENT_FEEDBACK" | wc -c > size.txt\n')
    async with workspace(repo) as ws:
        outcome = await ba.Reflexion(ba.Command(["sh", "-c", script]), max_attempts=2,
                                     critique=critique).run(ws)
    assert outcome.committed, outcome.results
    assert len(outcome.results[1].info["received_feedback"]) == 300_003
    assert 0 < int((repo / "size.txt").read_text()) <= 64 * 1024
    assert (repo / "tail.txt").read_text() == "END"


# -- bounds and cleanup -------------------------------------------------------------------------


async def test_timeout_bounds_wall_time_and_kills_the_attempt(repo: Path) -> None:
    token = sleep_token()
    seen: list[str | None] = []

    async def task(b: ba.Branch, feedback: str | None) -> bool:
        seen.append(feedback)
        if feedback is None:
            return False
        r = await b.run(["sleep", token])
        return r.ok

    before = snapshot(repo)
    async with workspace(repo) as ws:
        started = time.monotonic()
        outcome = await ba.Reflexion(task, max_attempts=5, timeout=0.5).run(ws)
        elapsed = time.monotonic() - started
    assert elapsed < 3
    assert outcome.timed_out
    assert not outcome.committed
    assert len(outcome.results) == 2
    assert outcome.results[1].error == "TimeoutError: the strategy's timeout expired"
    assert snapshot(repo) == before
    assert processes_with(token) == []


async def test_a_hanging_critique_is_cut_by_the_timeout(repo: Path) -> None:
    token = sleep_token()

    async def task(b: ba.Branch, feedback: str | None) -> bool:
        return False

    critique = ba.Command(["sleep", token])
    async with workspace(repo) as ws:
        started = time.monotonic()
        outcome = await ba.Reflexion(task, max_attempts=3, critique=critique,
                                     timeout=0.5).run(ws)
        assert time.monotonic() - started < 3
    assert outcome.timed_out
    assert len(outcome.results) == 1
    record = outcome.results[0].info["critique"]
    assert record["error"] == "TimeoutError: the strategy's timeout expired during the critique"
    assert processes_with(token) == []


@pytest.mark.parametrize("where", ["task", "critique"])
async def test_outside_cancellation_leaves_nothing(repo: Path, where: str) -> None:
    token = sleep_token()

    async def task(b: ba.Branch, feedback: str | None) -> bool:
        if where == "task":
            await b.run(["sleep", token])
        return False

    async def critique(b: ba.Branch, result: ba.Result) -> str:
        await b.run(["sleep", token], isolate=False)
        return "unreachable"

    before = snapshot(repo)
    async with workspace(repo) as ws:
        started = time.monotonic()
        with anyio.move_on_after(0.5) as scope:
            await ba.Reflexion(task, max_attempts=3, critique=critique).run(ws)
        assert scope.cancelled_caught
        assert time.monotonic() - started < 3
        assert ws.branches() == []
    assert snapshot(repo) == before
    assert processes_with(token) == []


async def test_a_base_exception_in_the_critique_propagates_and_cleans_up(repo: Path) -> None:
    class Stop(BaseException):
        pass

    async def task(b: ba.Branch, feedback: str | None) -> bool:
        return False

    async def critique(b: ba.Branch, result: ba.Result) -> str:
        raise Stop

    async with workspace(repo) as ws:
        with pytest.raises(Stop):
            await ba.Reflexion(task, max_attempts=2, critique=critique).run(ws)
        assert ws.branches() == []


async def test_a_refused_commit_is_fed_back_and_retried(repo: Path) -> None:
    """The base changed the attempt's path behind its back: the next attempt hears why."""
    seen: list[str | None] = []

    async def task(b: ba.Branch, feedback: str | None) -> bool:
        seen.append(feedback)
        if feedback is None:
            (b.path / "README.md").write_text("branch\n")
            (repo / "README.md").write_text("outside\n")
        else:
            (b.path / "other.txt").write_text("ok")
        return True

    async with workspace(repo) as ws:
        outcome = await ba.Reflexion(task, max_attempts=3).run(ws)
    assert seen[1] is not None
    assert seen[1].startswith("ConflictError:")
    assert outcome.results[0].error == seen[1]
    assert outcome.winner is not None
    assert outcome.winner.index == 1
    assert (repo / "README.md").read_text() == "outside\n"
    assert (repo / "other.txt").read_text() == "ok"


# -- nesting ---------------------------------------------------------------------------------------


async def test_a_task_may_run_a_strategy_and_return_its_outcome(repo: Path) -> None:
    async def task(b: ba.Branch, feedback: str | None) -> ba.Outcome:
        ok = feedback is not None

        async def write(c: ba.Branch) -> bool:
            (c.path / "f.txt").write_text("inner")
            return ok

        return await ba.Speculate([write]).run(b)

    async with workspace(repo) as ws:
        outcome = await ba.Reflexion(task, max_attempts=2).run(ws)
    assert outcome.results[1].info["received_feedback"] == (
        "the nested speculate committed nothing")
    assert outcome.winner is not None
    assert outcome.winner.index == 1
    assert outcome.winner.info["outcome"]["strategy"] == "speculate"
    assert (repo / "f.txt").read_text() == "inner"


async def test_reflexion_inside_best_of_n_and_on_a_branch(repo: Path) -> None:
    def reflexion(tag: str, succeed_on: int, score: float) -> ba.Reflexion:
        async def task(b: ba.Branch, feedback: str | None) -> ba.Verdict:
            n = 0 if feedback is None else int(feedback) + 1
            (b.path / "f.txt").write_text(f"{tag}{n}")
            return ba.Verdict(n == succeed_on, score, {"feedback": str(n)})

        return ba.Reflexion(task, max_attempts=3)

    async with workspace(repo) as ws:
        parent = await ws.fork()
        outcome = await ba.BestOfN([reflexion("a", 1, 0.2), reflexion("b", 2, 0.9),
                                    reflexion("c", 5, 5.0)]).run(parent)
        assert [r.success for r in outcome.results] == [True, True, False]
        assert outcome.winner is not None
        assert outcome.winner.index == 1
        assert outcome.winner.info["outcome"]["winner"]["index"] == 2
        assert (parent.path / "f.txt").read_text() == "b2"
        assert not (repo / "f.txt").exists()
        assert [b.name for b in ws.branches()] == [parent.name]
        await parent.abort()


# -- the registry and validation -------------------------------------------------------------


def test_registered_and_validated() -> None:
    assert ba.get_strategy("reflexion") is ba.Reflexion

    def task(b: ba.Branch, feedback: str | None) -> bool:
        return True

    with pytest.raises(ValueError, match="max_attempts"):
        ba.Reflexion(task, max_attempts=0)
    with pytest.raises(ValueError, match="max_attempts"):
        ba.Reflexion(task, max_attempts=True)
    with pytest.raises(TypeError, match="task"):
        ba.Reflexion(42, max_attempts=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="critique"):
        ba.Reflexion(task, max_attempts=1, critique="be nicer")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout"):
        ba.Reflexion(task, max_attempts=1, timeout=0)
    assert "max_attempts=1" in repr(ba.Reflexion(task, max_attempts=1))

