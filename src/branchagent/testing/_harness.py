"""What every targeted check starts from (the seed tree, a scratch directory) and its assertions."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.to_thread

from .._branch import Backend, Branch, BranchState
from .._workspace import Workspace, open_workspace
from ..exceptions import (
    BranchClosed,
    BranchInvalidated,
)
from ._model import Node, Tree, _remove_all, _under, read_tree, write_tree

#: A zero-argument callable returning a fresh, unopened backend.
BackendFactory = Callable[[], Backend]
#: One targeted check: an async function of the factory; raises AssertionError on failure.
Check = Callable[[BackendFactory], Awaitable[None]]

_T = TypeVar("_T")


#: The tree every check starts from: files of every mode, a nested and a private
#: directory, an empty directory, a binary file, and symlinks (relative, dangling,
#: and one pointing outside the workspace, to ``../outside.txt``).
SEED: Mapping[str, Node] = {
    "README.md": Node.file(b"# demo\n", 0o644),
    "run.sh": Node.file(b"#!/bin/sh\necho hi\n", 0o755),
    "src": Node.dir(0o755),
    "src/app.py": Node.file(b"def f():\n    return 1\n", 0o644),
    "src/data.bin": Node.file(bytes(range(256)) * 4, 0o600),
    "private": Node.dir(0o700),
    "private/key": Node.file(b"secret\n", 0o600),
    "empty": Node.dir(0o755),
    "link": Node.symlink("README.md"),
    "dangling": Node.symlink("nowhere"),
    "escape": Node.symlink("../outside.txt"),
}
OUTSIDE = b"outside the workspace: never touched\n"


def _seed(tmp: Path) -> None:
    (tmp / "repo").mkdir()
    write_tree(tmp / "repo", SEED)
    (tmp / "outside.txt").write_bytes(OUTSIDE)


# -- helpers for the targeted checks ----------------------------------------------------------


async def _fs(fn: Callable[..., _T], *args: Any) -> _T:
    """Run blocking filesystem work off the event loop (a backend may serve it from there)."""
    return await anyio.to_thread.run_sync(fn, *args)


@contextlib.asynccontextmanager
async def _scratch() -> AsyncIterator[Path]:
    """A temporary directory holding ``repo/`` (the seed tree) and ``outside.txt``."""
    tmp = Path(await _fs(tempfile.mkdtemp, None, "branchagent-conformance-"))
    try:
        await _fs(_seed, tmp)
        yield tmp
    finally:
        with anyio.CancelScope(shield=True):
            await _fs(_remove_all, tmp)


def _open(factory: BackendFactory, tmp: Path, *, keep_branches: bool = False
          ) -> contextlib.AbstractAsyncContextManager[Workspace]:
    return open_workspace(tmp / "repo", backend=factory(), state_dir=tmp / "state",
                          keep_branches=keep_branches)


async def _tree(root: Path, *, mtimes: bool = False) -> Tree:
    return await _fs(lambda: read_tree(root, mtimes=mtimes))


async def _expect_raises(
    exc_type: type[BaseException],
    fn: Callable[[], Awaitable[object]],
    what: str,
    *,
    not_type: type[BaseException] | None = None,
) -> BaseException:
    try:
        await fn()
    except Exception as exc:
        if not isinstance(exc, exc_type) or (not_type is not None and isinstance(exc, not_type)):
            raise AssertionError(f"{what}: expected {exc_type.__name__}, got {exc!r}") from exc
        return exc
    raise AssertionError(f"{what}: expected {exc_type.__name__}, nothing was raised")


def _assert_state(b: Branch, state: BranchState, what: str) -> None:
    if b.state is not state:
        raise AssertionError(f"{what}: branch {b.name!r} is {b.state.value}, "
                             f"expected {state.value}")


async def _assert_closed_ops(b: Branch, what: str) -> None:
    """Every operation on a closed branch raises the right error (abort is a no-op)."""
    invalidated = b.state is BranchState.INVALIDATED
    exc_type = BranchInvalidated if invalidated else BranchClosed
    not_type = None if invalidated else BranchInvalidated
    for op, fn in (("fork", b.fork), ("commit", b.commit), ("changes", b.changes),
                   ("diff", b.diff)):
        await _expect_raises(exc_type, fn, f"{what}: {op}() on {b.state.value} {b.name!r}",
                             not_type=not_type)
    state = b.state
    await b.abort()  # a no-op, never an error
    _assert_state(b, state, f"{what}: abort() on a closed branch")


def _with(tree: Mapping[str, Node], changes: Mapping[str, Node | None]) -> Tree:
    """``tree`` with some paths set, in order (``None`` deletes the path and what is below)."""
    out = dict(tree)
    for path, node in changes.items():
        if node is None:
            for p in [p for p in out if _under(p, path)]:
                del out[p]
        else:
            out[path] = node
    return out


def _changes_summary(changes: Iterable[object]) -> str:
    return "\n".join(f"  {c!r}" for c in changes) or "  (none)"
