"""Events the library emits on purpose, for progress displays and reports.

Logs are for people; events are an API. A workspace emits what happens to its
branches, and a strategy what happens to its candidates, each as an
:class:`Event`. Nobody listens by default, and then an event costs one
context-variable lookup. :func:`observe` subscribes a callback for the code
that runs inside it (it follows tasks started inside, as context variables do)::

    with ba.observe(print):
        await ba.BestOfN(candidates).run(ws)

Kinds, and the fields each sets (``data`` holds the rest):

- ``branch_forked``: ``branch``, ``parent``, ``depth``
- ``branch_committed``: ``branch``, ``parent``, ``depth``; ``data["invalidated"]``
  (the siblings that lost)
- ``branch_aborted``, ``branch_invalidated``: ``branch``, ``depth``
- ``candidate_started``: ``strategy``, ``index``, ``branch``, ``depth``
- ``candidate_finished``: ``strategy``, ``index``, ``branch``, ``depth``;
  ``data``: ``success``, ``score``, ``error``, ``duration``
- ``winner_committed``: ``strategy``, ``index``, ``branch``, ``depth``

A callback runs synchronously where the event happens: it must be quick and
must not raise (an exception from it is logged and dropped, never turned into
a failure of the operation that emitted the event).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import attrs

from ._log import get_logger

__all__ = ["Event", "emit", "observe"]

log = get_logger("branchagent.events")


@attrs.frozen(kw_only=True)
class Event:
    """One thing that happened to a branch or a candidate (see the module docs)."""

    kind: str
    branch: str | None = None
    parent: str | None = None
    depth: int | None = None
    strategy: str | None = None
    index: int | None = None
    data: Mapping[str, Any] = attrs.field(factory=dict)


Observer = Callable[[Event], None]

_observers: contextvars.ContextVar[tuple[Observer, ...]] = contextvars.ContextVar(
    "branchagent_observers", default=())


def emit(kind: str, **fields: Any) -> None:
    """Send an event to every observer of the current context (none: nothing happens)."""
    observers = _observers.get()
    if not observers:
        return
    known = {k: fields.pop(k) for k in ("branch", "parent", "depth", "strategy", "index")
             if k in fields}
    event = Event(kind=kind, data=fields, **known)
    for fn in observers:
        try:
            fn(event)
        except Exception:
            log.exception("event_observer_failed", kind=kind, observer=repr(fn))


@contextlib.contextmanager
def observe(callback: Observer) -> Iterator[None]:
    """Call ``callback(event)`` for every event emitted inside this block."""
    token = _observers.set((*_observers.get(), callback))
    try:
        yield
    finally:
        _observers.reset(token)
