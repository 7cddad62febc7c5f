"""The one readers-writer lock: readers share, a writer is alone, writers_first holds back
new readers while a writer waits, and a cancelled waiter lets the others in."""

from __future__ import annotations

import anyio
import pytest

from branchagent._rwlock import RWLock

pytestmark = pytest.mark.anyio


async def test_readers_share_and_a_writer_waits_for_them() -> None:
    lock = RWLock()
    log: list[str] = []

    async def writer() -> None:
        async with lock.exclusive():
            log.append("w")

    # two readers at once (no deadlock); the writer is held back, then given up
    async with lock.shared(), lock.shared(), anyio.create_task_group() as tg:
        tg.start_soon(writer)
        await anyio.sleep(0.05)
        assert log == []
        log.append("readers done")
        tg.cancel_scope.cancel()
    async with lock.exclusive():
        log.append("w2")
    assert log == ["readers done", "w2"]


@pytest.mark.parametrize("writers_first", [False, True])
async def test_writers_first_holds_back_new_readers(writers_first: bool) -> None:
    lock = RWLock(writers_first=writers_first)
    order: list[str] = []
    first = anyio.Event()
    release = anyio.Event()

    async def reader(tag: str, hold: anyio.Event | None = None) -> None:
        async with lock.shared():
            order.append(tag)
            if hold is not None:
                first.set()
                await hold.wait()

    async def writer() -> None:
        async with lock.hold(True):
            order.append("w")

    async with anyio.create_task_group() as tg:
        tg.start_soon(reader, "r1", release)
        await first.wait()
        tg.start_soon(writer)
        await anyio.sleep(0.05)
        tg.start_soon(reader, "r2")
        await anyio.sleep(0.05)
        release.set()
    assert order == (["r1", "w", "r2"] if writers_first else ["r1", "r2", "w"])


async def test_a_cancelled_writer_lets_readers_in() -> None:
    lock = RWLock(writers_first=True)
    got = anyio.Event()
    async with lock.shared():
        with anyio.move_on_after(0.05):
            async with lock.exclusive():
                pytest.fail("the writer got in past a reader")

        async def reader() -> None:
            async with lock.shared():
                got.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(reader)
            with anyio.fail_after(2):
                await got.wait()
