"""Cascaded on real branches (copy backend), on asyncio and trio.

Every test also checks that no path leaves a branch open (the ``workspace``
helper asserts it before closing).
"""

from __future__ import annotations

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


# -- waves --------------------------------------------------------------------------------------


async def test_waves_grow_and_stop_at_the_first_success(repo: Path) -> None:
    calls: list[tuple[int, str | None]] = []

    async def task(b: ba.Branch, attempt: int, feedback: str | None) -> Any:
        calls.append((attempt, feedback))
        (b.path / f"attempt-{attempt}.txt").write_text(str(attempt))
        if attempt == 0:
            raise ValueError("wave zero fails")
        if attempt < 3:
            return ba.Verdict(False, info={"feedback": f"attempt {attempt} says no"})
        if attempt != 3:
            await anyio.sleep(30)  # cancelled when attempt 3 wins
        with anyio.fail_after(10):  # the whole third wave is running before 3 wins
            while len(calls) < 7:  # noqa: ASYNC110 (the other attempts append)
                await anyio.sleep(0.01)
        return ba.Verdict(True, float(attempt))

    before = snapshot(repo)
    async with workspace(repo) as ws:
        with capture_logs() as logs:
            outcome = await ba.Cascaded(task, fan_out=(1, 2, 4, 8)).run(ws)
    assert outcome.strategy == "cascaded"
    assert outcome.info == {"fan_out": [1, 2, 4, 8], "waves": 3}
    assert sorted(a for a, _ in calls) == list(range(7))  # the fourth wave never ran
    assert len(outcome.results) == 7
    assert [r.info["wave"] for r in outcome.results] == [0, 1, 1, 2, 2, 2, 2]
    feedback = dict(calls)
    assert feedback[0] is None
    assert feedback[1] == feedback[2] == "attempt 0 failed:\nValueError: wave zero fails"
    assert feedback[3] == feedback[6] == (
        "attempt 0 failed:\nValueError: wave zero fails\n\n"
        "attempt 1 failed:\nattempt 1 says no\n\n"
        "attempt 2 failed:\nattempt 2 says no")
    assert outcome.results[3].info["received_feedback"] == feedback[3]
    assert outcome.winner is not None
    assert outcome.winner.index == 3
    assert outcome.winner.score == 3.0
    for r in outcome.results[4:]:
        assert r.error == "Cancelled: candidate 3 succeeded first"
    assert snapshot(repo) == {**before, "attempt-3.txt": b"3"}
    assert [e["event"] for e in logs].count("winner_committed") == 1


async def test_first_wins_within_a_wave_kills_the_rest(repo: Path) -> None:
    token = sleep_token()

    async def task(b: ba.Branch, attempt: int, feedback: str | None) -> bool:
        if attempt == 0:
            return False
        if attempt != 2:
            r = await b.run(["sleep", token])
            return r.ok
        await anyio.sleep(0.2)
        (b.path / "f.txt").write_text("fast")
        return True

    async with workspace(repo) as ws:
        started = time.monotonic()
        outcome = await ba.Cascaded(task, fan_out=(1, 4)).run(ws)
        elapsed = time.monotonic() - started
    assert elapsed < 3, f"the outcome took {elapsed:.1f} s: it waited for a loser"
    assert outcome.winner is not None
    assert outcome.winner.index == 2
    assert (repo / "f.txt").read_text() == "fast"
    assert processes_with(token) == []


async def test_command_task_gets_attempt_and_feedback(repo: Path) -> None:
    script = (
        'if [ "$BRANCHAGENT_ATTEMPT" -lt 1 ]; then echo "try harder" >&2; exit 2; fi\n'
        'echo "$BRANCHAGENT_ATTEMPT" > attempt.txt\n'
        'printf "%s" "$BRANCHAGENT_FEEDBACK" > feedback.txt\n'
    )
    async with workspace(repo) as ws:
        outcome = await ba.Cascaded(ba.Command(["sh", "-c", script]), fan_out=(1, 1)).run(ws)
    assert [r.success for r in outcome.results] == [False, True]
    assert outcome.results[0].info["returncode"] == 2
    assert (repo / "attempt.txt").read_text() == "1\n"
    assert (repo / "feedback.txt").read_text() == (
        "attempt 0 failed:\nexit status 2\nstderr:\ntry harder")


async def test_sync_task_and_a_task_returning_an_outcome(repo: Path) -> None:
    def sync_task(b: ba.Branch, attempt: int, feedback: str | None) -> tuple[bool, float]:
        (b.path / "f.txt").write_text(f"sync {attempt}")
        return (attempt == 1, 0.5)

    async def nested_task(b: ba.Branch, attempt: int, feedback: str | None) -> ba.Outcome:
        async def inner(c: ba.Branch) -> bool:
            (c.path / "g.txt").write_text(f"nested {attempt}")
            return attempt > 0

        return await ba.Speculate([inner]).run(b)

    async with workspace(repo) as ws:
        first = await ba.Cascaded(sync_task, fan_out=(1, 1)).run(ws)
        second = await ba.Cascaded(nested_task, fan_out=(1, 1)).run(ws)
    assert first.winner is not None
    assert first.winner.index == 1
    assert (repo / "f.txt").read_text() == "sync 1"
    assert second.winner is not None
    assert second.winner.index == 1
    assert second.results[1].info["received_feedback"] == (
        "attempt 0 failed:\nthe nested speculate committed nothing")
    assert (repo / "g.txt").read_text() == "nested 1"


async def test_all_waves_fail(repo: Path) -> None:
    async def task(b: ba.Branch, attempt: int, feedback: str | None) -> Any:
        (b.path / "README.md").write_text("broken\n")
        return "garbage" if attempt % 2 else False

    before = snapshot(repo)
    async with workspace(repo) as ws:
        outcome = await ba.Cascaded(task).run(ws)  # the default fan_out: 1, 2, 4
    assert len(outcome.results) == 7
    assert not outcome.committed
    assert not outcome.timed_out
    assert outcome.winner is None
    assert str(outcome.results[1].error).startswith("CandidateError:")
    assert snapshot(repo) == before


# -- bounds and cleanup ------------------------------------------------------------------------


async def test_wave_timeout_moves_on_to_the_next_wave(repo: Path) -> None:
    token = sleep_token()

    async def task(b: ba.Branch, attempt: int, feedback: str | None) -> bool:
        if attempt < 3:
            r = await b.run(["sleep", token])
            return r.ok
        (b.path / "f.txt").write_text(feedback or "")
        return True

    async with workspace(repo) as ws:
        started = time.monotonic()
        outcome = await ba.Cascaded(task, fan_out=(1, 2, 2), wave_timeout=0.3).run(ws)
        assert time.monotonic() - started < 3
    assert not outcome.timed_out  # the waves' bound, not the strategy's
    assert outcome.winner is not None
    assert outcome.winner.info["wave"] == 2
    wave_error = "TimeoutError: the wave's timeout expired (wave_timeout=0.3 s)"
    assert [r.error for r in outcome.results[:3]] == [wave_error] * 3
    assert (repo / "f.txt").read_text().startswith(f"attempt 0 failed:\n{wave_error}\n\n")
    assert processes_with(token) == []


async def test_timeout_bounds_wall_time(repo: Path) -> None:
    token = sleep_token()

    async def task(b: ba.Branch, attempt: int, feedback: str | None) -> bool:
        if attempt == 0:
            return False
        r = await b.run(["sleep", token])
        return r.ok

    before = snapshot(repo)
    async with workspace(repo) as ws:
        started = time.monotonic()
        outcome = await ba.Cascaded(task, fan_out=(1, 3, 9), wave_timeout=10,
                                    timeout=0.5).run(ws)
        assert time.monotonic() - started < 3
    assert outcome.timed_out
    assert not outcome.committed
    assert len(outcome.results) == 4  # the third wave never started
    for r in outcome.results[1:]:
        assert r.error == "TimeoutError: the strategy's timeout expired"
    assert snapshot(repo) == before
    assert processes_with(token) == []


async def test_outside_cancellation_leaves_nothing(repo: Path) -> None:
    token = sleep_token()

    async def task(b: ba.Branch, attempt: int, feedback: str | None) -> bool:
        if attempt > 0:
            await b.run(["sleep", token], isolate=attempt % 2 == 0)
        return False

    before = snapshot(repo)
    async with workspace(repo) as ws:
        started = time.monotonic()
        with anyio.move_on_after(0.5) as scope:
            await ba.Cascaded(task).run(ws)
        assert scope.cancelled_caught
        assert time.monotonic() - started < 3
        assert ws.branches() == []
    assert snapshot(repo) == before
    assert processes_with(token) == []


async def test_a_refused_commit_is_fed_forward(repo: Path) -> None:
    async def task(b: ba.Branch, attempt: int, feedback: str | None) -> bool:
        if attempt == 0:
            (b.path / "README.md").write_text("branch\n")
            (repo / "README.md").write_text("outside\n")  # the base, behind the branch's back
            return True
        (b.path / "f.txt").write_text(feedback or "")
        return True

    async with workspace(repo) as ws:
        outcome = await ba.Cascaded(task, fan_out=(1, 1)).run(ws)
    assert str(outcome.results[0].error).startswith("ConflictError:")
    assert outcome.winner is not None
    assert outcome.winner.index == 1
    assert (repo / "f.txt").read_text().startswith("attempt 0 failed:\nConflictError:")
    assert (repo / "README.md").read_text() == "outside\n"


# -- nesting ---------------------------------------------------------------------------------------


async def test_cascaded_inside_best_of_n(repo: Path) -> None:
    def cascade(tag: str, succeed_from: int, score: float) -> ba.Cascaded:
        async def task(b: ba.Branch, attempt: int, feedback: str | None) -> ba.Verdict:
            (b.path / "f.txt").write_text(f"{tag}{attempt}")
            return ba.Verdict(attempt >= succeed_from, score)

        return ba.Cascaded(task, fan_out=(1, 1, 1))

    async with workspace(repo) as ws:
        outcome = await ba.BestOfN([cascade("a", 0, 0.1), cascade("b", 2, 0.7),
                                    cascade("c", 9, 9.0)]).run(ws)
    assert [r.success for r in outcome.results] == [True, True, False]
    assert outcome.winner is not None
    assert outcome.winner.index == 1
    assert outcome.winner.info["outcome"]["winner"]["index"] == 2
    assert (repo / "f.txt").read_text() == "b2"


async def test_cascaded_on_a_branch(repo: Path) -> None:
    async def task(b: ba.Branch, attempt: int, feedback: str | None) -> bool:
        (b.path / "f.txt").write_text("x")
        return True

    async with workspace(repo) as ws:
        parent = await ws.fork()
        outcome = await ba.Cascaded(task).run(parent)
        assert outcome.committed
        assert (parent.path / "f.txt").read_text() == "x"
        assert not (repo / "f.txt").exists()
        assert [b.name for b in ws.branches()] == [parent.name]
        await parent.abort()


# -- the registry and validation -------------------------------------------------------------


def test_registered_and_validated() -> None:
    assert ba.get_strategy("cascaded") is ba.Cascaded

    def task(b: ba.Branch, attempt: int, feedback: str | None) -> bool:
        return True

    for bad in [(), (1, 0), (2, True), [1.5], (-1,)]:
        with pytest.raises(ValueError, match="fan_out"):
            ba.Cascaded(task, fan_out=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout"):
        ba.Cascaded(task, wave_timeout=0)
    with pytest.raises(TypeError, match="task"):
        ba.Cascaded(ba.Speculate([ba.Command(["true"])]))  # type: ignore[arg-type]
    assert ba.Cascaded(task, fan_out=[3, 5]).fan_out == (3, 5)
    assert "fan_out=(1, 2, 4)" in repr(ba.Cascaded(task))
