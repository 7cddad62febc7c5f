"""One readers-writer lock for the agent side (anyio: asyncio or trio)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import anyio

__all__ = ["RWLock"]


class RWLock:
    """Many holders of :meth:`shared`, or one of :meth:`exclusive`.

    ``writers_first``: a waiting writer holds back new readers, so a stream of
    readers cannot starve it (else readers join whenever no writer holds the lock,
    so readers of one tree, such as forks of one parent, never wait for each
    other). An uncontended acquire does not yield to the event loop. Release is
    shielded: a cancelled holder always lets the others in.
    """

    def __init__(self, *, writers_first: bool = False) -> None:
        self._cond = anyio.Condition(anyio.Lock(fast_acquire=True))
        self._writers_first = writers_first
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0

    @asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        async with self._cond:
            while self._writer or (self._writers_first and self._waiting_writers):
                await self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with anyio.CancelScope(shield=True):
                async with self._cond:
                    self._readers -= 1
                    self._cond.notify_all()

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        async with self._cond:
            self._waiting_writers += 1
            try:
                while self._writer or self._readers:
                    await self._cond.wait()
            except BaseException:  # gave up waiting: readers it held back may go on
                self._waiting_writers -= 1
                self._cond.notify_all()
                raise
            self._waiting_writers -= 1
            self._writer = True
        try:
            yield
        finally:
            with anyio.CancelScope(shield=True):
                async with self._cond:
                    self._writer = False
                    self._cond.notify_all()

    def hold(self, exclusive: bool) -> AbstractAsyncContextManager[None]:
        """:meth:`exclusive` when ``exclusive``, else :meth:`shared`."""
        return self.exclusive() if exclusive else self.shared()
