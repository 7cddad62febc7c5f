"""ba.observe: events reach the observers of the context that emits them, and only those."""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest
from structlog.testing import capture_logs

import branchagent as ba
from branchagent._events import emit

pytestmark = pytest.mark.anyio


def test_nobody_listening_is_a_no_op() -> None:
    emit("branch_forked", branch="b1", depth=0)  # nothing to assert but "does not fail"
    seen: list[ba.Event] = []
    with ba.observe(seen.append):
        pass
    emit("branch_forked", branch="b2", depth=0)
    assert seen == []


def test_known_fields_and_data() -> None:
    seen: list[ba.Event] = []
    with ba.observe(seen.append):
        emit("candidate_finished", strategy="best_of_n", index=2, branch="b3", depth=1,
             success=True, score=0.5)
    assert seen == [ba.Event(kind="candidate_finished", strategy="best_of_n", index=2,
                             branch="b3", depth=1, data={"success": True, "score": 0.5})]


def test_nested_observers_both_see_inner_events() -> None:
    outer: list[str] = []
    inner: list[str] = []
    with ba.observe(lambda e: outer.append(e.kind)):
        emit("a")
        with ba.observe(lambda e: inner.append(e.kind)):
            emit("b")
        emit("c")
    assert outer == ["a", "b", "c"]
    assert inner == ["b"]


async def test_events_follow_tasks_started_inside(anyio_backend: str) -> None:
    seen: list[str] = []

    async def child(name: str) -> None:
        await anyio.lowlevel.checkpoint()
        emit("branch_forked", branch=name)

    with ba.observe(lambda e: seen.append(str(e.branch))):
        async with anyio.create_task_group() as tg:
            tg.start_soon(child, "x")
            tg.start_soon(child, "y")
    async with anyio.create_task_group() as tg:  # started outside: not observed
        tg.start_soon(child, "z")
    assert sorted(seen) == ["x", "y"]


def test_a_failing_observer_is_logged_and_does_not_stop_the_others() -> None:
    seen: list[str] = []

    def bad(_e: ba.Event) -> None:
        raise RuntimeError("boom")

    with capture_logs() as logs, ba.observe(bad), ba.observe(lambda e: seen.append(e.kind)):
        emit("branch_aborted", branch="b")
    assert seen == ["branch_aborted"]
    assert [e["event"] for e in logs] == ["event_observer_failed"]
