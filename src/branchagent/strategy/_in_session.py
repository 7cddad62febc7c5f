"""InSession: a candidate that acts on the live interpreter of its node."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import attrs

from .._branch import Branch
from .._limits import Limits

if TYPE_CHECKING:
    from .._session import Session

__all__ = ["InSession", "node_session", "session_of"]


def session_of(branch: Branch) -> Session | None:
    """The live node session of ``branch``, or ``None``: after a strategy committed an
    :class:`InSession` winner that was a child of its target, the winner's interpreter,
    moved into the target (its memory as the winner left it; the target's files as the
    winner's commit made them). A search over the target with ``InSession`` candidates
    forks its root nodes from it."""
    from .._workspace import WorkspaceBranch

    if not isinstance(branch, WorkspaceBranch):
        return None
    return next((s for s in branch._sessions if s._node and not s.closed), None)


async def node_session(branch: Branch, *, setup: str = "",
                       limits: Limits | None = None) -> Session:
    """The session of ``branch`` as a node of a search: a fork of its parent branch's node
    session when there is one (memory as the parent node left it), else a fresh
    interpreter that runs ``setup``. It stays open while ``branch`` does (so the node's
    children can fork it) and ends with it."""
    from .._workspace import WorkspaceBranch

    if not isinstance(branch, WorkspaceBranch):
        raise TypeError(f"InSession needs a workspace branch (one with .session()), not "
                        f"{type(branch).__name__}")
    parent = branch.parent
    source = session_of(parent) if parent is not None else None
    if source is not None:
        session = await branch.session(fork_of=source)
    else:
        session = await branch.session(limits=limits)
        if setup:
            try:
                await session.exec(setup)
            except BaseException:
                await session.close()
                raise
    session._node = True
    return session


@attrs.frozen
class InSession:
    """A candidate run on the live Python interpreter of its node.

    ``await fn(session)`` returns what a candidate returns (``bool``, a score,
    ``(bool, score)``, a :class:`Verdict`). ``session`` sees the candidate's branch at
    the workspace's path, and its memory is the parent node's as that node's candidate
    left it: a fork of the parent's session (:func:`node_session`). Where the parent is
    the strategy's target, a fresh interpreter runs ``setup`` first (once per root
    node: every deeper node inherits its result by fork, never re-running it).

    So a tree search (``TreeSearch``, ``Beam``) over ``InSession`` candidates
    backtracks to any earlier node's memory for the cost of one fork. Each open node
    keeps its interpreter alive (its pages shared copy-on-write with its relatives)
    until its branch is committed or aborted. A committed winner that is a child of the
    target leaves its interpreter in the target (:func:`session_of`); a deeper winner's
    lineage commits a level at a time, and its node sessions end (a forked interpreter
    follows one commit). ``SpeculativeExecution`` refuses ``InSession`` actions.
    """

    fn: Callable[[Session], Awaitable[Any]]
    setup: str = attrs.field(default="", kw_only=True)
    limits: Limits | None = attrs.field(default=None, kw_only=True)

    async def __call__(self, branch: Branch) -> Any:
        session = await node_session(branch, setup=self.setup, limits=self.limits)
        return await self.fn(session)
