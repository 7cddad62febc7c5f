"""The conformance suite every storage backend passes: :func:`check_backend`.

A backend (the built-in ``copy``, ``fuse`` and ``overlay``, or a third-party
one) is correct when a workspace opened on it behaves like a plain in-memory
model of snapshot isolation. Use it from a plain (sync) test function::

    from branchagent.testing import check_backend

    def test_my_backend() -> None:
        check_backend(MyBackend)  # a zero-argument callable returning a fresh Backend

It runs two kinds of checks and raises ``AssertionError`` on the first failure:

- *targeted checks* (:func:`backend_checks`): one async function per rule of
  the contract (first commit wins, conflicts change nothing, symlinks are
  never followed, modes and mtimes survive a commit, ...);
- a *model check* (:func:`check_model`): a hypothesis state machine that forks
  (nested), edits files in every way a tool does, writes into the base behind
  the workspace's back, commits and aborts at random, and compares after every
  step every open branch and the base with a plain dict model.

Each check can be run on its own, so a test suite can give each its own test
(``tests/test_conformance.py`` does). Needs hypothesis (``branchagent[test]``).

The model, written independently of the backends' own code:

- a fork sees its parent exactly as at the fork; later changes in the parent
  are invisible to it, and its own writes are invisible to everyone else;
- committing C into P (the base for a top-level branch), with S = P at C's
  fork: C-changed / P-changed are the paths whose type, content and mode (or
  link target) differ between S and C / S and P now. They conflict on a path
  changed on both sides to different entries (both deleted is the same), and
  on a path changed on one side below a path the other side changed into
  something that is not a directory (unless both deleted the path: say both
  ran ``rm -rf d``). A conflict raises ``ConflictError`` and
  changes nothing; otherwise C's entries replace P's on C-changed paths, C is
  COMMITTED, P's other open children and C's open descendants INVALIDATED;
- an abort closes the branch and its open descendants, and changes no tree.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import importlib.util
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar, cast

import anyio
import anyio.to_thread
import attrs
from anyio.from_thread import BlockingPortal, start_blocking_portal

from ._branch import Backend, Branch, BranchState, ChangeKind, EntryType, Usage
from ._workspace import Workspace, open_workspace
from .exceptions import (
    BranchClosed,
    BranchExists,
    BranchInvalidated,
    ConflictError,
    InvalidBranchName,
    PathEscapeError,
)

try:
    import hypothesis
    import hypothesis.strategies as st
    from hypothesis.stateful import (
        RuleBasedStateMachine,
        invariant,
        precondition,
        rule,
        run_state_machine_as_test,
    )
except ImportError as _exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "branchagent.testing needs hypothesis: pip install 'branchagent[test]'"
    ) from _exc

__all__ = [
    "BackendFactory",
    "BackendStateMachine",
    "Check",
    "MODEL_SEED",
    "Node",
    "SEED",
    "backend_checks",
    "check_backend",
    "check_model",
    "read_tree",
    "write_tree",
]

#: A zero-argument callable returning a fresh, unopened backend.
BackendFactory = Callable[[], Backend]
#: One targeted check: an async function of the factory; raises AssertionError on failure.
Check = Callable[[BackendFactory], Awaitable[None]]

FILE_MODES = (0o644, 0o600, 0o755)
DIR_MODES = (0o755, 0o700)
_T = TypeVar("_T")


# -- the tree model ------------------------------------------------------------------------


@attrs.frozen(repr=False)
class Node:
    """One entry of a tree as a user sees it: a file, a directory or a symlink.

    ``mtime_ns`` is only filled in by ``read_tree(..., mtimes=True)`` (files only).
    """

    kind: str  # "file" | "dir" | "symlink" | "other"
    data: bytes = b""
    mode: int = 0
    target: str = ""
    mtime_ns: int = 0

    @classmethod
    def file(cls, data: bytes, mode: int = 0o644) -> Node:
        return cls("file", data=data, mode=mode)

    @classmethod
    def dir(cls, mode: int = 0o755) -> Node:
        return cls("dir", mode=mode)

    @classmethod
    def symlink(cls, target: str) -> Node:
        return cls("symlink", target=target)

    @property
    def is_dir(self) -> bool:
        return self.kind == "dir"

    def same_content(self, other: Node) -> bool:
        """Same type and content (or target); mode and mtime ignored."""
        return (self.kind, self.data, self.target) == (other.kind, other.data, other.target)

    def __repr__(self) -> str:
        extra = f", mtime_ns={self.mtime_ns}" if self.mtime_ns else ""
        if self.kind == "file":
            return f"file({self.data!r}, {self.mode:#o}{extra})"
        if self.kind == "dir":
            return f"dir({self.mode:#o})"
        if self.kind == "symlink":
            return f"symlink({self.target!r})"
        return f"{self.kind}({self.mode:#o})"


Tree = dict[str, Node]


def read_tree(root: Path, *, mtimes: bool = False) -> Tree:
    """What ``root`` holds, never following symlinks (``mtimes``: record file mtimes)."""
    out: Tree = {}
    stack: list[tuple[str, str]] = [("", os.fspath(root))]
    while stack:
        rel_dir, abs_dir = stack.pop()
        with os.scandir(abs_dir) as it:
            for de in it:
                rel = f"{rel_dir}/{de.name}" if rel_dir else de.name
                st_ = os.lstat(de.path)
                perm = stat.S_IMODE(st_.st_mode)
                if stat.S_ISDIR(st_.st_mode):
                    out[rel] = Node.dir(perm)
                    stack.append((rel, de.path))
                elif stat.S_ISLNK(st_.st_mode):
                    out[rel] = Node.symlink(os.readlink(de.path))
                elif stat.S_ISREG(st_.st_mode):
                    out[rel] = Node("file", _read_file(de.path), perm,
                                    mtime_ns=st_.st_mtime_ns if mtimes else 0)
                else:
                    out[rel] = Node("other", mode=st_.st_mode)
    return out


def _read_file(path: str | os.PathLike[str]) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _write_file(path: str | os.PathLike[str], data: bytes, flags: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC | flags, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def _put(path: str | os.PathLike[str], data: bytes, mode: int = 0o644) -> None:
    """Create or overwrite a file with an exact mode, whatever the umask."""
    _write_file(path, data, os.O_CREAT | os.O_TRUNC)
    os.chmod(path, mode)


def write_tree(root: Path, tree: Mapping[str, Node]) -> None:
    """Create ``tree`` under the existing directory ``root`` (modes exact, umask ignored)."""
    paths = sorted(tree, key=lambda p: p.split("/"))
    for rel in paths:
        node, p = tree[rel], root / rel
        if node.kind == "dir":
            os.mkdir(p, 0o700)
        elif node.kind == "symlink":
            os.symlink(node.target, p)
        elif node.kind == "file":
            _write_file(p, node.data, os.O_CREAT | os.O_EXCL)
            os.chmod(p, node.mode)
            if node.mtime_ns:
                os.utime(p, ns=(node.mtime_ns, node.mtime_ns), follow_symlinks=False)
        else:
            raise ValueError(f"cannot create {node!r} at {rel!r}")
    for rel in reversed(paths):  # deepest first: a 0o500 parent would refuse children
        if tree[rel].kind == "dir":
            os.chmod(root / rel, tree[rel].mode)


def _remove_all(path: Path) -> None:
    """rmtree that also copes with directories left without write permission."""
    if not os.path.lexists(path):
        return
    if os.path.isdir(path) and not os.path.islink(path):
        for dirpath, _dirs, _files in os.walk(path):
            with contextlib.suppress(OSError):
                os.chmod(dirpath, 0o700)
        shutil.rmtree(path, ignore_errors=True)
    else:
        os.unlink(path)


def _describe_diff(expected: Mapping[str, Node], actual: Mapping[str, Node], limit: int = 12
                   ) -> str:
    lines = []
    for p in sorted(set(expected) | set(actual)):
        e, a = expected.get(p), actual.get(p)
        if e != a:
            lines.append(f"  {p!r}: expected {e!r}, found {a!r}")
    more = f"\n  ... and {len(lines) - limit} more" if len(lines) > limit else ""
    return "\n".join(lines[:limit]) + more


def _assert_tree(actual: Mapping[str, Node], expected: Mapping[str, Node], what: str) -> None:
    if dict(actual) != dict(expected):
        raise AssertionError(f"{what} differs from what it should hold:\n"
                             f"{_describe_diff(expected, actual)}")


def _ancestors(path: str) -> Iterator[str]:
    while "/" in path:
        path = path.rpartition("/")[0]
        yield path


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root + "/")


def model_changed(before: Mapping[str, Node], after: Mapping[str, Node]) -> set[str]:
    """Paths whose type, content, mode or link target differ between two trees."""
    return {p for p in set(before) | set(after) if before.get(p) != after.get(p)}


def model_conflicts(
    ours_changed: set[str], ours: Mapping[str, Node],
    theirs_changed: set[str], theirs: Mapping[str, Node],
) -> set[str]:
    """The paths on which a commit conflicts (see the module docstring)."""
    out = {p for p in ours_changed & theirs_changed if ours.get(p) != theirs.get(p)}
    for changed, other_changed, other in ((ours_changed, theirs_changed, theirs),
                                          (theirs_changed, ours_changed, ours)):
        for p in changed:
            if p not in ours and p not in theirs:
                continue  # deleted on both sides: they agree
            for a in _ancestors(p):
                if a in other_changed:
                    node = other.get(a)
                    if node is None or not node.is_dir:
                        out.add(p)
                        break
    return out


def _check_model_tree(tree: Mapping[str, Node], what: str) -> None:
    """The model's own sanity: every entry's parent is a directory."""
    for p in tree:
        parent = p.rpartition("/")[0]
        if parent and (parent not in tree or not tree[parent].is_dir):
            raise AssertionError(f"model bug: {what} holds {p!r} without a directory above it")


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


# -- targeted checks ------------------------------------------------------------------------------


async def check_first_commit_wins(factory: BackendFactory) -> None:
    """Of two siblings the first to commit wins; the other is invalidated and changes nothing."""
    async with _scratch() as tmp, _open(factory, tmp) as ws:
        b1, b2 = await ws.fork(), await ws.fork()

        def edit() -> None:
            _put(b1.path / "one.txt", b"1\n")
            _write_file(b1.path / "README.md", b"# from b1\n", os.O_TRUNC)
            _put(b2.path / "two.txt", b"2\n")
            _write_file(b2.path / "run.sh", b"#!/bin/sh\necho b2\n", os.O_TRUNC)

        await _fs(edit)
        await b1.commit()
        _assert_state(b1, BranchState.COMMITTED, "after its commit")
        _assert_state(b2, BranchState.INVALIDATED, "a sibling after the first commit")
        await _expect_raises(BranchInvalidated, b2.commit, "commit() of the losing sibling")
        await _assert_closed_ops(b2, "the losing sibling")
        expected = _with(SEED, {"one.txt": Node.file(b"1\n"),
                                "README.md": Node.file(b"# from b1\n", 0o644)})
        _assert_tree(await _tree(ws.path), expected, "the base after the first commit")
        if ws.branches():
            raise AssertionError(f"closed branches still listed: {ws.branches()}")


async def check_conflict_changes_nothing(factory: BackendFactory) -> None:
    """A conflicting commit raises ConflictError, changes no byte, and leaves the branch usable."""
    async with _scratch() as tmp, _open(factory, tmp) as ws:
        # 1. top-level branch against an outside write into the base (a parent change)
        b = await ws.fork()

        def edit_top() -> None:
            _write_file(b.path / "README.md", b"# branch\n", os.O_TRUNC)
            _put(b.path / "added.txt", b"added\n")
            _write_file(ws.path / "README.md", b"# outside\n", os.O_TRUNC)

        await _fs(edit_top)
        before_base, before_b = await _tree(ws.path, mtimes=True), await _tree(b.path, mtimes=True)
        exc = await _expect_raises(ConflictError, b.commit, "commit over an outside write")
        if "README.md" not in getattr(exc, "paths", ()):
            raise AssertionError(f"ConflictError.paths should name README.md: {exc!r}")
        _assert_tree(await _tree(ws.path, mtimes=True), before_base, "the base after a conflict")
        _assert_tree(await _tree(b.path, mtimes=True), before_b, "the branch after a conflict")
        _assert_state(b, BranchState.OPEN, "a branch whose commit conflicted")
        # resolved: the base goes back to the content the branch forked from
        await _fs(_write_file, ws.path / "README.md", SEED["README.md"].data, os.O_TRUNC)
        await b.commit()
        _assert_tree(await _tree(ws.path),
                     _with(SEED, {"README.md": Node.file(b"# branch\n"),
                                  "added.txt": Node.file(b"added\n")}),
                     "the base after the resolved commit")

        # 2. nested: the parent deleted a directory under which the child edited a file,
        #    and both changed the same file differently
        p = await ws.fork()
        c = await p.fork()

        def edit_nested() -> None:
            shutil.rmtree(p.path / "private")
            _write_file(p.path / "run.sh", b"parent\n", os.O_TRUNC)
            _write_file(c.path / "private" / "key", b"child key\n", os.O_TRUNC)
            _write_file(c.path / "run.sh", b"child\n", os.O_TRUNC)
            _put(c.path / "child.txt", b"child\n")

        await _fs(edit_nested)
        before_p, before_c = await _tree(p.path, mtimes=True), await _tree(c.path, mtimes=True)
        before_base = await _tree(ws.path, mtimes=True)
        exc = await _expect_raises(ConflictError, c.commit, "nested conflicting commit")
        paths = set(getattr(exc, "paths", ()))
        if not paths or not paths <= {"run.sh", "private/key", "private"}:
            raise AssertionError(f"ConflictError.paths should name run.sh and private/key: "
                                 f"{exc!r} paths={sorted(paths)}")
        _assert_tree(await _tree(p.path, mtimes=True), before_p, "the parent after a conflict")
        _assert_tree(await _tree(c.path, mtimes=True), before_c, "the child after a conflict")
        _assert_tree(await _tree(ws.path, mtimes=True), before_base, "the base after a conflict")
        _assert_state(c, BranchState.OPEN, "a child whose commit conflicted")
        _assert_state(p, BranchState.OPEN, "the parent of a conflicting child")

        def resolve_nested() -> None:  # take the parent's side on both paths
            shutil.rmtree(c.path / "private")
            _write_file(c.path / "run.sh", b"parent\n", os.O_TRUNC)

        await _fs(resolve_nested)
        await c.commit()
        expected = _with(SEED, {"private": None, "run.sh": Node.file(b"parent\n", 0o755),
                                "child.txt": Node.file(b"child\n"),
                                "README.md": Node.file(b"# branch\n"),
                                "added.txt": Node.file(b"added\n")})
        _assert_tree(await _tree(p.path), expected, "the parent after the resolved commit")


async def check_invalidation(factory: BackendFactory) -> None:
    """A commit invalidates its siblings (with their descendants) and its own descendants."""
    async with _scratch() as tmp, _open(factory, tmp) as ws:
        b1, b2 = await ws.fork("b-one"), await ws.fork("b-two")
        b1a, b1b, b2a = await b1.fork(), await b1.fork(), await b2.fork()
        b1a1, b1b1 = await b1a.fork(), await b1b.fork()
        await _fs(lambda: _put(b1a.path / "x.txt", b"x\n"))
        await b1a.commit()
        for br, state in ((b1a, BranchState.COMMITTED), (b1a1, BranchState.INVALIDATED),
                          (b1b, BranchState.INVALIDATED), (b1b1, BranchState.INVALIDATED),
                          (b1, BranchState.OPEN), (b2, BranchState.OPEN), (b2a, BranchState.OPEN)):
            _assert_state(br, state, "after a nested commit")
        for br in (b1a1, b1b, b1b1):
            await _assert_closed_ops(br, "an invalidated branch")
        await b1.commit()
        for br in (b2, b2a):
            _assert_state(br, BranchState.INVALIDATED, "after a top-level sibling committed")
            await _assert_closed_ops(br, "an invalidated branch")
        if ws.branches():
            raise AssertionError(f"no branch should be open, found {ws.branches()}")
        _assert_tree(await _tree(ws.path), _with(SEED, {"x.txt": Node.file(b"x\n")}), "the base")
        # aborting closes the whole subtree as ABORTED (not invalidated)
        a = await ws.fork()
        a1 = await a.fork()
        a2 = await a1.fork()
        await a.abort()
        for br in (a, a1, a2):
            _assert_state(br, BranchState.ABORTED, "after aborting an ancestor")
            await _assert_closed_ops(br, "an aborted branch")


async def check_nested_commits(factory: BackendFactory) -> None:
    """Depth-3 branches reach the base only through successive commits."""
    async with _scratch() as tmp, _open(factory, tmp) as ws:
        b1 = await ws.fork()
        await _fs(lambda: _put(b1.path / "l1.txt", b"1\n"))
        b2 = await b1.fork()
        await _fs(lambda: _put(b2.path / "l2.txt", b"2\n"))
        b3 = await b2.fork()
        await _fs(lambda: _put(b2.path / "l2-late.txt", b"late\n"))  # after b3's fork
        await _fs(lambda: _put(b3.path / "l3.txt", b"3\n"))
        if b3.depth != 2 or b3.parent is not b2 or b2.parent is not b1 or b1.parent is not None:
            raise AssertionError(f"wrong lineage: {b3.depth=} {b3.parent=} {b2.parent=}")
        s1 = _with(SEED, {"l1.txt": Node.file(b"1\n")})
        s2 = _with(s1, {"l2.txt": Node.file(b"2\n")})
        s3 = _with(s2, {"l3.txt": Node.file(b"3\n")})
        late = _with(s3, {"l2-late.txt": Node.file(b"late\n")})
        _assert_tree(await _tree(b3.path), s3, "depth-3 branch (must not see its parent's "
                     "later write)")
        await b3.commit()
        _assert_tree(await _tree(b2.path), late, "depth-2 branch after the depth-3 commit")
        _assert_tree(await _tree(b1.path), s1, "depth-1 branch before the depth-2 commit")
        _assert_tree(await _tree(ws.path), SEED, "the base before the depth-1 commit")
        await b2.commit()
        _assert_tree(await _tree(ws.path), SEED, "the base before the depth-1 commit")
        await b1.commit()
        _assert_tree(await _tree(ws.path), late, "the base after three successive commits")


async def check_empty_directories(factory: BackendFactory) -> None:
    """Empty directories (new, nested, private) survive a commit with their modes."""
    async with _scratch() as tmp, _open(factory, tmp) as ws:
        b = await ws.fork()

        def edit() -> None:
            for rel, mode in (("new", 0o755), ("deep", 0o755), ("deep/er", 0o700),
                              ("deep/er/est", 0o755), ("src/cache", 0o700), ("empty/keep", 0o755)):
                os.mkdir(b.path / rel)
                os.chmod(b.path / rel, mode)

        await _fs(edit)
        await b.commit()
        expected = _with(SEED, {"new": Node.dir(), "deep": Node.dir(), "deep/er": Node.dir(0o700),
                                "deep/er/est": Node.dir(), "src/cache": Node.dir(0o700),
                                "empty/keep": Node.dir()})
        _assert_tree(await _tree(ws.path), expected, "the base after committing empty directories")


async def check_symlinks_preserved(factory: BackendFactory) -> None:
    """Symlinks are forked and committed as symlinks (dangling, outside, loops): never followed."""
    async with _scratch() as tmp, _open(factory, tmp) as ws:
        outside_abs = os.fspath(tmp / "outside.txt")
        b = await ws.fork()
        seen = await _tree(b.path)
        for p in ("link", "dangling", "escape"):
            if seen.get(p) != SEED[p]:
                raise AssertionError(f"the fork shows {p!r} as {seen.get(p)!r}, "
                                     f"expected {SEED[p]!r} (not followed)")

        def edit() -> None:
            os.symlink(outside_abs, b.path / "abs-outside")
            os.symlink("../../nowhere/at/all", b.path / "src" / "dangling2")
            os.symlink("src", b.path / "srcdir")
            os.symlink("loop", b.path / "loop")
            os.unlink(b.path / "link")
            os.symlink("run.sh", b.path / "link")

        await _fs(edit)
        kinds = {c.path: c.entry_type for c in await b.changes()}
        for p in ("abs-outside", "src/dangling2", "srcdir", "loop", "link"):
            if kinds.get(p) is not EntryType.SYMLINK:
                raise AssertionError(f"changes() should list {p!r} as a symlink: {kinds}")
        await b.commit()
        expected = _with(SEED, {"abs-outside": Node.symlink(outside_abs),
                                "link": Node.symlink("run.sh"),
                                "src/dangling2": Node.symlink("../../nowhere/at/all"),
                                "srcdir": Node.symlink("src"), "loop": Node.symlink("loop")})
        _assert_tree(await _tree(ws.path), expected, "the base after committing symlinks")
        if await _fs((tmp / "outside.txt").read_bytes) != OUTSIDE:
            raise AssertionError("a file outside the workspace was written through a symlink")


async def check_modes_and_mtimes(factory: BackendFactory) -> None:
    """A fork shows modes and mtimes as they are; a commit keeps the branch's exactly."""
    mtime = 1_600_000_000_123_456_789
    async with _scratch() as tmp, _open(factory, tmp) as ws:
        await _fs(lambda: os.utime(ws.path / "README.md", ns=(mtime - 7, mtime - 7)))
        b = await ws.fork()
        base_now = await _tree(ws.path, mtimes=True)
        _assert_tree(await _tree(b.path, mtimes=True), base_now,
                     "a fresh fork (modes and file mtimes must match the parent)")

        def edit() -> None:
            _write_file(b.path / "README.md", b"# changed\n", os.O_TRUNC)
            os.utime(b.path / "README.md", ns=(mtime, mtime))
            _write_file(b.path / "tool.sh", b"#!/bin/sh\n", os.O_CREAT | os.O_EXCL)
            os.chmod(b.path / "tool.sh", 0o755)
            os.utime(b.path / "tool.sh", ns=(mtime + 1, mtime + 1))
            os.chmod(b.path / "src" / "app.py", 0o600)
            os.chmod(b.path / "run.sh", 0o644)
            os.chmod(b.path / "private", 0o755)
            os.chmod(b.path / "src", 0o700)

        await _fs(edit)
        branch_now = await _tree(b.path, mtimes=True)
        await b.commit()
        base_after = await _tree(ws.path, mtimes=True)
        for p in ("README.md", "tool.sh", "src/app.py", "run.sh", "private", "src"):
            if base_after.get(p) != branch_now.get(p):
                raise AssertionError(f"commit did not preserve {p!r}: the branch had "
                                     f"{branch_now.get(p)!r}, the base has {base_after.get(p)!r}")
        for p, want in (("README.md", mtime), ("tool.sh", mtime + 1)):
            got = base_after[p].mtime_ns
            if got != want:
                raise AssertionError(f"st_mtime_ns of {p!r} in the base is {got}, expected {want}")
        _assert_tree(base_after, branch_now, "the base after the commit (vs the branch)")


async def check_sibling_isolation(factory: BackendFactory) -> None:
    """A branch never sees its siblings', children's or parent's later writes."""
    async with _scratch() as tmp, _open(factory, tmp) as ws:
        b1, b2 = await ws.fork(), await ws.fork()
        c = await b1.fork()

        def edit(root: Path, tag: bytes) -> None:
            fd = os.open(root / "README.md", os.O_WRONLY | os.O_CLOEXEC)  # in place
            try:
                os.write(fd, tag)
            finally:
                os.close(fd)
            _write_file(root / "src" / "app.py", tag, os.O_APPEND)
            os.truncate(root / "src" / "data.bin", 3)
            os.chmod(root / "run.sh", 0o600)
            _put(root / "new.txt", tag)
            os.unlink(root / "escape")
            os.rename(root / "private", root / "moved")

        def edited(tag: bytes) -> Tree:
            return _with(SEED, {
                "private": None, "escape": None,
                "README.md": Node.file(tag + SEED["README.md"].data[len(tag):], 0o644),
                "src/app.py": Node.file(SEED["src/app.py"].data + tag, 0o644),
                "src/data.bin": Node.file(SEED["src/data.bin"].data[:3], 0o600),
                "run.sh": Node.file(SEED["run.sh"].data, 0o600),
                "new.txt": Node.file(tag), "moved": Node.dir(0o700),
                "moved/key": SEED["private/key"]})

        await _fs(edit, b1.path, b"B1")
        _assert_tree(await _tree(b2.path), SEED, "a sibling after the other one wrote")
        _assert_tree(await _tree(c.path), SEED, "a child after its parent wrote")
        _assert_tree(await _tree(ws.path), SEED, "the base after a branch wrote")
        await _fs(edit, b2.path, b"B2")
        await _fs(edit, c.path, b"CC")
        _assert_tree(await _tree(b1.path), edited(b"B1"), "a branch after its sibling and "
                     "its child wrote")
        _assert_tree(await _tree(b2.path), edited(b"B2"), "the second sibling")
        _assert_tree(await _tree(c.path), edited(b"CC"), "the child")
        _assert_tree(await _tree(ws.path), SEED, "the base")


async def check_base_unchanged_before_commit(factory: BackendFactory) -> None:
    """Forks, edits, changes(), diff() and aborts never touch the base's bytes, modes or mtimes."""
    async with _scratch() as tmp, _open(factory, tmp) as ws:
        before = await _tree(ws.path, mtimes=True)
        b = await ws.fork()
        c = await b.fork()

        def edit(root: Path) -> None:
            fd = os.open(root / "README.md", os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, b"XX")
            finally:
                os.close(fd)
            os.utime(root / "run.sh", ns=(1, 1))
            os.chmod(root / "src" / "app.py", 0o600)
            os.chmod(root / "private", 0o755)
            os.rename(root / "src", root / "lib")
            shutil.rmtree(root / "empty")
            os.unlink(root / "link")
            os.symlink("elsewhere", root / "link")
            _write_file(root / "private" / "key", b"new", os.O_TRUNC)

        await _fs(edit, b.path)
        await _fs(edit, c.path)
        await c.changes()
        await c.diff()
        await b.changes()
        await b.diff()
        _assert_tree(await _tree(ws.path, mtimes=True), before, "the base before any commit")
        await c.commit()
        _assert_tree(await _tree(ws.path, mtimes=True), before, "the base after a nested commit")
        await b.abort()
        _assert_tree(await _tree(ws.path, mtimes=True), before, "the base after an abort")


async def check_delete_then_recreate(factory: BackendFactory) -> None:
    """Deleting then recreating a path (same or other type) shows the new entry, then commits it."""
    async with _scratch() as tmp, _open(factory, tmp) as ws:
        b = await ws.fork()

        def edit() -> None:
            os.unlink(b.path / "README.md")
            _put(b.path / "README.md", b"# new readme\n")
            os.chmod(b.path / "README.md", 0o600)
            shutil.rmtree(b.path / "src")
            os.mkdir(b.path / "src")
            os.chmod(b.path / "src", 0o755)
            _put(b.path / "src" / "new.py", b"new\n")
            os.chmod(b.path / "src" / "new.py", 0o644)
            os.unlink(b.path / "run.sh")
            os.mkdir(b.path / "run.sh")
            os.chmod(b.path / "run.sh", 0o700)
            os.unlink(b.path / "link")
            _put(b.path / "link", b"now a file\n")
            os.chmod(b.path / "link", 0o644)
            os.rmdir(b.path / "empty")
            os.symlink("README.md", b.path / "empty")

        await _fs(edit)
        expected = _with(SEED, {"src": None, "README.md": Node.file(b"# new readme\n", 0o600),
                                "run.sh": Node.dir(0o700),
                                "link": Node.file(b"now a file\n", 0o644),
                                "empty": Node.symlink("README.md")})
        expected |= {"src": Node.dir(0o755), "src/new.py": Node.file(b"new\n", 0o644)}
        _assert_tree(await _tree(b.path), expected, "the branch after delete-then-recreate")
        c = await b.fork()
        _assert_tree(await _tree(c.path), expected, "a child forked after delete-then-recreate")
        await _fs(lambda: os.unlink(c.path / "src" / "new.py"))
        await _fs(lambda: _put(c.path / "src" / "new.py", b"again\n"))
        await c.commit()
        expected["src/new.py"] = Node.file(b"again\n", 0o644)
        _assert_tree(await _tree(b.path), expected, "the branch after the child's commit")
        await b.commit()
        _assert_tree(await _tree(ws.path), expected, "the base after delete-then-recreate")


async def check_directory_rename(factory: BackendFactory) -> None:
    """Renames of directories (also over an empty one) and of files over files commit."""
    async with _scratch() as tmp, _open(factory, tmp) as ws:
        b = await ws.fork()

        def edit() -> None:
            os.rename(b.path / "src", b.path / "lib")
            os.rename(b.path / "private", b.path / "empty")  # over an empty directory
            os.rename(b.path / "run.sh", b.path / "README.md")  # over a file
            os.rename(b.path / "dangling", b.path / "lib" / "dangling")

        await _fs(edit)
        expected = _with(SEED, {"src": None, "private": None, "empty": None, "run.sh": None,
                                "dangling": None, "README.md": SEED["run.sh"]})
        expected |= {"lib": SEED["src"], "lib/app.py": SEED["src/app.py"],
                     "lib/data.bin": SEED["src/data.bin"], "lib/dangling": SEED["dangling"],
                     "empty": SEED["private"], "empty/key": SEED["private/key"]}
        _assert_tree(await _tree(b.path), expected, "the branch after renames")
        await b.commit()
        _assert_tree(await _tree(ws.path), expected, "the base after committing renames")


async def check_changes_kinds(factory: BackendFactory) -> None:
    """changes() says ADDED / MODIFIED / DELETED with types; chmod and touch are metadata_only."""
    async with _scratch() as tmp, _open(factory, tmp) as ws:
        b = await ws.fork()
        if await b.changes():
            raise AssertionError(f"a fresh fork has changes: {await b.changes()}")

        def edit() -> None:
            _put(b.path / "new.txt", b"new\n")
            _write_file(b.path / "README.md", b"# modified\n", os.O_TRUNC)
            os.unlink(b.path / "run.sh")
            os.chmod(b.path / "src" / "app.py", 0o600)
            os.utime(b.path / "src" / "data.bin", ns=(1_500_000_000_000_000_000,) * 2)
            os.mkdir(b.path / "newdir")
            os.rmdir(b.path / "empty")
            os.symlink("new.txt", b.path / "newlink")
            os.unlink(b.path / "private" / "key")
            os.mkdir(b.path / "private" / "key")
            os.chmod(b.path / "private", 0o755)

        await _fs(edit)
        F, D, L = EntryType.FILE, EntryType.DIR, EntryType.SYMLINK
        A, M, X = ChangeKind.ADDED, ChangeKind.MODIFIED, ChangeKind.DELETED
        want = {
            "new.txt": (A, F, None, False),
            "README.md": (M, F, F, False),
            "run.sh": (X, F, F, False),
            "src/app.py": (M, F, F, True),
            "src/data.bin": (M, F, F, True),
            "newdir": (A, D, None, False),
            "empty": (X, D, D, False),
            "newlink": (A, L, None, False),
            "private/key": (M, D, F, False),
            "private": (M, D, D, True),
        }
        changes = await b.changes()
        got = {c.path: (c.kind, c.entry_type, c.old_type, c.metadata_only) for c in changes}
        if got != want or len(changes) != len(got):
            lines = [f"  {p}: expected {want.get(p)}, got {got.get(p)}"
                     for p in sorted(set(want) | set(got)) if want.get(p) != got.get(p)]
            raise AssertionError("changes() is wrong:\n" + "\n".join(lines)
                                 + f"\nall changes:\n{_changes_summary(changes)}")


async def check_diff(factory: BackendFactory) -> None:
    """diff() is unified text; binary files are noted, never dumped."""
    async with _scratch() as tmp, _open(factory, tmp) as ws:
        b = await ws.fork()

        def edit() -> None:
            _write_file(b.path / "README.md", b"# changed\nsecond line\n", os.O_TRUNC)
            _write_file(b.path / "src" / "data.bin", b"\x00\xff\x00MARKER-IN-BINARY", os.O_TRUNC)
            _put(b.path / "added.txt", b"fresh line\n")
            os.unlink(b.path / "run.sh")

        await _fs(edit)
        text = await b.diff()
        if not isinstance(text, str):  # a third-party workspace could get this wrong
            raise AssertionError(f"diff() must return str, not {type(text).__name__}")  # noqa: TRY004
        for needle in ("--- a/README.md", "+++ b/README.md", "@@", "-# demo", "+# changed",
                       "+second line", "+fresh line", "-echo hi", "src/data.bin"):
            if needle not in text:
                raise AssertionError(f"diff() lacks {needle!r}:\n{text}")
        if "Binary files" not in text:
            raise AssertionError(f"diff() should note the binary file:\n{text}")
        if "\x00" in text or "\ufffd" in text or "MARKER-IN-BINARY" in text:
            raise AssertionError(f"diff() dumped binary content:\n{text!r}")
        if await b.diff() != text:
            raise AssertionError("diff() is not deterministic")


async def check_invalid_names(factory: BackendFactory) -> None:
    """Invalid branch names raise InvalidBranchName and create nothing; 255 bytes is fine."""
    async with _scratch() as tmp, _open(factory, tmp) as ws:
        parent = await ws.fork("parent")

        def listing() -> set[str]:
            out: set[str] = set()
            for dirpath, dirs, files in os.walk(tmp):
                out.update(os.path.join(dirpath, n) for n in dirs + files)
            return out

        before, before_tree = await _fs(listing), await _tree(ws.path, mtimes=True)
        bad: list[object] = ["a/b", "..", ".", ".x", "@x", "a\x00b", "x" * 256, "é" * 128, "",
                             "../escape", "/abs", "tab\tname", 7]
        for name in bad:
            for what, fork in (("Workspace.fork", ws.fork), ("Branch.fork", parent.fork)):
                await _expect_raises(InvalidBranchName, functools.partial(fork, cast("str", name)),
                                     f"{what}({name!r})")
        await _expect_raises(BranchExists, lambda: ws.fork("parent"), "fork with a taken name")
        if [x.name for x in ws.branches()] != ["parent"]:
            raise AssertionError(f"invalid names created branches: {ws.branches()}")
        after = await _fs(listing)
        if after != before:
            raise AssertionError(f"invalid names created files: {sorted(after ^ before)}")
        _assert_tree(await _tree(ws.path, mtimes=True), before_tree, "the base")
        longest = "n" * 255
        b = await ws.fork(longest)
        if b.name != longest:
            raise AssertionError("a 255-byte name was not kept")
        await _fs(lambda: _put(b.path / "long.txt", b"ok\n"))
        deep = await parent.fork("é" * 127 + "n")  # 255 bytes of UTF-8
        await deep.abort()
        await b.commit()
        _assert_tree(await _tree(ws.path), _with(SEED, {"long.txt": Node.file(b"ok\n")}),
                     "the base after a 255-byte-named branch committed")


async def check_closed_branch_operations(factory: BackendFactory) -> None:
    """Operations on committed and aborted branches raise BranchClosed and change nothing."""
    async with _scratch() as tmp, _open(factory, tmp) as ws:
        done = await ws.fork()
        await _fs(lambda: _put(done.path / "done.txt", b"done\n"))
        await done.commit()
        gone = await ws.fork()
        await _fs(lambda: _put(gone.path / "gone.txt", b"gone\n"))
        await gone.abort()
        before = await _tree(ws.path, mtimes=True)
        names = [x.name for x in ws.branches()]
        for br in (done, gone):
            await _assert_closed_ops(br, "a closed branch")

            async def resolve(b: Branch = br) -> None:
                b.resolve("README.md")

            await _expect_raises(BranchClosed, resolve, f"resolve() on {br.state.value}",
                                 not_type=BranchInvalidated)
        _assert_state(done, BranchState.COMMITTED, "after operations on it")
        _assert_state(gone, BranchState.ABORTED, "after operations on it")
        _assert_tree(await _tree(ws.path, mtimes=True), before, "the base after refused ops")
        if [x.name for x in ws.branches()] != names:
            raise AssertionError("operations on closed branches changed the branch list")


async def check_resolve_escapes(factory: BackendFactory) -> None:
    """Branch.resolve() refuses paths that leave the branch (``..``, symlinks out)."""
    async with _scratch() as tmp, _open(factory, tmp) as ws:
        b = await ws.fork()
        await _fs(lambda: os.symlink(os.fspath(tmp / "outside.txt"), b.path / "abs-out"))
        real = Path(await _fs(os.path.realpath, b.path))
        for raw in ("../x", "src/../../x", "escape", "abs-out", "/etc/passwd", "a\x00b"):
            async def call(r: str = raw) -> None:
                b.resolve(r)

            await _expect_raises(PathEscapeError, call, f"resolve({raw!r})")
        for raw, want in (("src/app.py", real / "src" / "app.py"),
                          ("link", real / "README.md"),
                          ("src/../README.md", real / "README.md"),
                          ("not/yet", real / "not" / "yet"),
                          (os.fspath(ws.path / "src" / "app.py"), real / "src" / "app.py")):
            got = b.resolve(raw)
            if got != want:
                raise AssertionError(f"resolve({raw!r}) gave {got}, expected {want}")


class _Boom(Exception):
    pass


async def check_branch_context_manager(factory: BackendFactory) -> None:
    """``branch()`` commits on clean exit, aborts on error, and aborts when its commit conflicts."""
    async with _scratch() as tmp, _open(factory, tmp) as ws:
        async with ws.branch() as ok:
            await _fs(lambda: _put(ok.path / "ok.txt", b"ok\n"))
            async with ok.branch("inner") as inner:
                await _fs(lambda: _put(inner.path / "inner.txt", b"in\n"))
            _assert_state(inner, BranchState.COMMITTED, "a nested branch() after a clean exit")
        _assert_state(ok, BranchState.COMMITTED, "branch() after a clean exit")
        expected = _with(SEED, {"ok.txt": Node.file(b"ok\n"), "inner.txt": Node.file(b"in\n")})
        _assert_tree(await _tree(ws.path), expected, "the base after branch() committed")

        failed: Branch | None = None
        try:
            async with ws.branch() as failed:
                await _fs(_put, failed.path / "bad.txt", b"bad\n")
                raise _Boom  # noqa: TRY301
        except _Boom:
            pass
        if failed is None:
            raise AssertionError("branch() did not yield a branch")
        _assert_state(failed, BranchState.ABORTED, "branch() after an exception")
        _assert_tree(await _tree(ws.path), expected, "the base after branch() aborted")

        conflicted: Branch | None = None
        try:
            async with ws.branch() as conflicted:
                await _fs(_write_file, conflicted.path / "README.md", b"# mine\n", os.O_TRUNC)
                await _fs(_write_file, ws.path / "README.md", b"# theirs\n", os.O_TRUNC)
        except ConflictError:
            pass
        else:
            raise AssertionError("branch() exit should raise ConflictError from its commit")
        if conflicted is None:
            raise AssertionError("branch() did not yield a branch")
        _assert_state(conflicted, BranchState.ABORTED, "branch() whose commit conflicted")
        if ws.branches():
            raise AssertionError(f"branch() leaked a branch: {ws.branches()}")
        _assert_tree(await _tree(ws.path),
                     _with(expected, {"README.md": Node.file(b"# theirs\n", 0o644)}),
                     "the base after branch() conflicted")


async def check_workspace_exit(factory: BackendFactory) -> None:
    """Leaving the workspace aborts every open branch; the base holds exactly what was committed."""
    async with _scratch() as tmp:
        async with _open(factory, tmp) as ws:
            done = await ws.fork()
            await _fs(lambda: _put(done.path / "done.txt", b"done\n"))
            await done.commit()
            b1, b2 = await ws.fork(), await ws.fork()
            c = await b1.fork()
            d = await c.fork()
            for br in (b1, b2, c, d):
                await _fs(_put, br.path / f"{br.name}.txt", b"x\n")
            root = ws.path
        for br in (b1, b2, c, d):
            _assert_state(br, BranchState.ABORTED, "an open branch after the workspace closed")
        expected = _with(SEED, {"done.txt": Node.file(b"done\n")})
        _assert_tree(await _tree(root), expected, "the base after the workspace closed")
        async with _open(factory, tmp) as ws2:
            if ws2.branches():
                raise AssertionError(f"aborted branches came back: {ws2.branches()}")
        _assert_tree(await _tree(root), expected, "the base after reopening")


async def check_reopen_keeps_branches(factory: BackendFactory) -> None:
    """Branches kept by ``keep_branches=True`` are listed after reopening and can be committed."""
    async with _scratch() as tmp:
        async with _open(factory, tmp, keep_branches=True) as ws:
            k1 = await ws.fork("keep1")
            await _fs(lambda: _put(k1.path / "k1.txt", b"one\n"))
            k2 = await k1.fork("keep2")
            await _fs(lambda: _put(k2.path / "k2.txt", b"two\n"))
            lost = await ws.fork("lost")
            await lost.abort()
        async with _open(factory, tmp) as ws:
            names = {b.name: b for b in ws.branches()}
            if set(names) != {"keep1", "keep2"}:
                raise AssertionError(f"reopened workspace lists {sorted(names)}, "
                                     "expected ['keep1', 'keep2']")
            r1, r2 = names["keep1"], names["keep2"]
            if r2.parent is not r1 or r1.parent is not None:
                raise AssertionError(f"lineage lost on reopen: keep2.parent={r2.parent!r}")
            s1 = _with(SEED, {"k1.txt": Node.file(b"one\n")})
            s2 = _with(s1, {"k2.txt": Node.file(b"two\n")})
            _assert_tree(await _tree(r1.path), s1, "keep1 after reopening")
            _assert_tree(await _tree(r2.path), s2, "keep2 after reopening")
            _assert_tree(await _tree(ws.path), SEED, "the base after reopening")
            await r2.commit()
            await r1.commit()
            _assert_tree(await _tree(ws.path), s2, "the base after committing reopened branches")


def _assert_usage(got: Usage, nbytes: int, files: int, what: str) -> None:
    if (got.bytes, got.files) != (nbytes, files):
        raise AssertionError(f"{what}: usage() is {got!r}, expected bytes={nbytes}, "
                             f"files={files}")


async def check_usage(factory: BackendFactory) -> None:
    """``usage()``: a fresh branch holds nothing; a file made counts its size, a file
    changed its whole size, a symlink its target's length; directories and deletions
    count nothing; a sibling and a child hold none of the parent's files."""
    async with _scratch() as tmp, _open(factory, tmp) as ws:
        b = await ws.fork()
        _assert_usage(await b.usage(), 0, 0, "a fresh branch")

        def edit() -> None:
            _put(b.path / "new.bin", b"n" * 5000)
            os.mkdir(b.path / "newdir")
            os.symlink("new.bin", b.path / "newdir" / "ln")
            _write_file(b.path / "README.md", b"more\n", os.O_APPEND)
            os.unlink(b.path / "run.sh")

        await _fs(edit)
        readme = len(SEED["README.md"].data) + len(b"more\n")
        _assert_usage(await b.usage(), 5000 + len("new.bin") + readme, 3,
                      "a branch that made a file and a symlink, changed one, deleted one")
        await _fs(os.unlink, b.path / "new.bin")
        _assert_usage(await b.usage(), len("new.bin") + readme, 2,
                      "the same branch after deleting the file it made")
        _assert_usage(await (await ws.fork()).usage(), 0, 0, "its fresh sibling")
        _assert_usage(await (await b.fork()).usage(), 0, 0, "its fresh child")


_CHECKS: dict[str, Check] = {
    "first_commit_wins": check_first_commit_wins,
    "conflict_changes_nothing": check_conflict_changes_nothing,
    "invalidation": check_invalidation,
    "nested_commits": check_nested_commits,
    "empty_directories": check_empty_directories,
    "symlinks_preserved": check_symlinks_preserved,
    "modes_and_mtimes": check_modes_and_mtimes,
    "sibling_isolation": check_sibling_isolation,
    "base_unchanged_before_commit": check_base_unchanged_before_commit,
    "delete_then_recreate": check_delete_then_recreate,
    "directory_rename": check_directory_rename,
    "changes_kinds": check_changes_kinds,
    "diff": check_diff,
    "invalid_names": check_invalid_names,
    "closed_branch_operations": check_closed_branch_operations,
    "resolve_escapes": check_resolve_escapes,
    "branch_context_manager": check_branch_context_manager,
    "workspace_exit": check_workspace_exit,
    "reopen_keeps_branches": check_reopen_keeps_branches,
    "usage": check_usage,
}


def backend_checks() -> dict[str, Check]:
    """The targeted checks by name: ``await checks[name](factory)`` runs one."""
    return dict(_CHECKS)


# -- the model check: a hypothesis state machine ----------------------------------------------

MAX_OPEN = 5  # open branches at once
MAX_LEVELS = 3  # top-level branches, their children, and grandchildren
_NAMES = ("a", "b", "d")  # few names, so that edits (and commits) collide
#: The model check's starting tree: small, so that edits collide and commits conflict.
MODEL_SEED: Mapping[str, Node] = {
    "a": Node.file(b"hello\n", 0o644),
    "b": Node.file(b"#!/bin/sh\n", 0o755),
    "d": Node.dir(0o755),
    "d/a": Node.file(b"", 0o600),
    "e": Node.dir(0o700),
    "l": Node.symlink("../outside.txt"),
}
_CONTENTS = st.one_of(
    st.sampled_from([b"", b"x", b"hello\n", b"hello\nworld\n", b"\x00\xffbin"]),
    st.binary(max_size=8),
)
_TIMES_NS = (1_000_000_000_000_000_000, 1_600_000_000_123_456_789, 1_700_000_000_000_000_001)
_FILE_OPS = ("write", "append", "truncate", "mkdir", "rmdir", "rename", "symlink", "chmod",
             "delete", "recreate", "touch")


class _MBranch:
    """The model of one branch: the real handle, its snapshot at the fork, its tree now.

    A plain class: hypothesis prints drawn values with ``__repr__`` only for those.
    """

    def __init__(self, real: Branch, parent: _MBranch | None, snapshot: Tree, uid: int) -> None:
        self.real = real
        self.parent = parent
        self.snapshot = snapshot
        self.tree = dict(snapshot)
        self.uid = uid
        self.state = BranchState.OPEN
        self.children: list[_MBranch] = []

    @property
    def depth(self) -> int:
        """0 for a top-level branch, like ``Branch.depth``."""
        return 0 if self.parent is None else self.parent.depth + 1

    def open_descendants(self) -> list[_MBranch]:
        out: list[_MBranch] = []
        for c in self.children:
            if c.state is BranchState.OPEN:
                out.append(c)
                out.extend(c.open_descendants())
        return out

    def __repr__(self) -> str:
        return f"<{self.state.value} branch {self.real.name!r} #{self.uid} depth={self.depth}>"


@attrs.define(eq=False)
class _Target:
    """Where a file operation happens: a real directory and the model tree it must match."""

    label: str
    root: Path
    tree: Tree


def _errnames(codes: Iterable[int]) -> str:
    return "/".join(errno.errorcode.get(c, str(c)) for c in codes)


def _remove_model(tree: Tree, path: str) -> None:
    for p in [p for p in tree if _under(p, path)]:
        del tree[p]


def _remove_real(path: Path) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)


class BackendStateMachine(RuleBasedStateMachine):
    """Random forks, edits, outside writes, commits and aborts, checked against a dict model.

    Get a runnable class with :meth:`for_backend`; :func:`check_model` runs it.
    Rules are sync; the async API is driven through an anyio blocking portal.
    """

    factory: ClassVar[BackendFactory]
    outside_writes: ClassVar[bool] = True
    anyio_backend: ClassVar[str] = "asyncio"

    @classmethod
    def for_backend(
        cls,
        factory: BackendFactory,
        *,
        outside_writes: bool = True,
        anyio_backend: str = "asyncio",
    ) -> type[BackendStateMachine]:
        """A subclass bound to ``factory`` (``outside_writes``: also write into the base)."""
        attrs_ = {"factory": staticmethod(factory), "outside_writes": outside_writes,
                  "anyio_backend": anyio_backend}
        return cast("type[BackendStateMachine]", type(cls.__name__, (cls,), attrs_))

    def __init__(self) -> None:
        super().__init__()
        if not hasattr(type(self), "factory"):
            raise TypeError("use BackendStateMachine.for_backend(factory) to get a runnable class")
        self._cleanup = contextlib.ExitStack()
        self._ws_stack = contextlib.ExitStack()
        try:
            self.tmp = Path(tempfile.mkdtemp(prefix="branchagent-model-"))
            self._cleanup.callback(_remove_all, self.tmp)
            (self.tmp / "repo").mkdir()
            write_tree(self.tmp / "repo", MODEL_SEED)
            (self.tmp / "outside.txt").write_bytes(OUTSIDE)
            self.portal: BlockingPortal = self._cleanup.enter_context(
                start_blocking_portal(self.anyio_backend))
            self.ws: Workspace = self._ws_stack.enter_context(
                self.portal.wrap_async_context_manager(_open(type(self).factory, self.tmp)))
        except BaseException:
            self._ws_stack.close()
            self._cleanup.close()
            raise
        self.base: Tree = dict(MODEL_SEED)
        self.branches: list[_MBranch] = []
        self.names_used: set[str] = set()
        self.counter = 0
        self.targets = ("a", "b/c", "../outside.txt", "..", ".", "nowhere",
                        os.fspath(self.tmp / "outside.txt"))

    def teardown(self) -> None:
        # Hypothesis calls this in a ``finally``: when a step already failed, only clean
        # up, so that a second error here does not hide the first one.
        failed = sys.exc_info()[1] is not None
        try:
            root = self.ws.path
            self._ws_stack.close()  # leaving the workspace aborts every open branch
            if failed:
                return
            for b in self.branches:
                if b.state is BranchState.OPEN:
                    b.state = BranchState.ABORTED
                self._check_state(b, "after the workspace closed")
            _assert_tree(read_tree(root), self.base, "the base after the workspace closed")
        finally:
            self._cleanup.close()

    # -- model helpers ---------------------------------------------------------------------

    def _open(self) -> list[_MBranch]:
        return [b for b in self.branches if b.state is BranchState.OPEN]

    def _closed(self) -> list[_MBranch]:
        return [b for b in self.branches if b.state is not BranchState.OPEN]

    def _parent_tree(self, b: _MBranch) -> Tree:
        return self.base if b.parent is None else b.parent.tree

    def _branch_target(self, data: st.DataObject) -> _Target:
        b = data.draw(st.sampled_from(self._open()), label="branch")
        return _Target(f"branch {b.real.name!r}", b.real.path, b.tree)

    def _deepest_first(self) -> list[_MBranch]:
        return sorted(self._open(), key=lambda b: -b.depth)

    def _parent_target(self, b: _MBranch) -> _Target | None:
        """Where a parent change of ``b`` can be made (None: the base, without outside writes)."""
        if b.parent is not None:
            return _Target(f"branch {b.parent.real.name!r}", b.parent.real.path, b.parent.tree)
        return self._base_target() if self.outside_writes else None

    def _base_target(self) -> _Target:
        return _Target("the base (outside write)", self.ws.path, self.base)

    def _pick(self, data: st.DataObject, tree: Tree, label: str, *,
              kinds: tuple[str, ...] | None = None, new: bool = False) -> str | None:
        """An existing path (of ``kinds``), or with ``new`` also a free name in a directory."""
        cands = sorted(p for p, n in tree.items() if kinds is None or n.kind in kinds)
        if new:
            dirs = [""] + [p for p, n in tree.items() if n.is_dir]
            free = {f"{d}/{n}" if d else n for d in dirs for n in _NAMES} - set(tree)
            cands += sorted(free)
        if not cands:
            return None
        return data.draw(st.sampled_from(cands), label=label)

    def _expect(self, what: str, expected: tuple[int, ...], action: Callable[[], None]) -> bool:
        """Run ``action``; the model expects success, or one of the ``expected`` errnos."""
        hypothesis.note(what + (f" (expect {_errnames(expected)})" if expected else ""))
        hypothesis.event(f"file op expecting {_errnames(expected) or 'success'}")
        try:
            action()
        except OSError as exc:
            if not expected:
                raise AssertionError(f"{what}: the model expected success, got {exc!r}") from exc
            if exc.errno not in expected:
                raise AssertionError(f"{what}: expected {_errnames(expected)}, got {exc!r}"
                                     ) from exc
            return False
        if expected:
            raise AssertionError(f"{what}: succeeded, the model expected {_errnames(expected)}")
        return True

    def _check_state(self, b: _MBranch, when: str) -> None:
        if b.real.depth != b.depth:
            raise AssertionError(f"{b!r} has depth {b.real.depth} in reality")
        if b.real.state is not b.state:
            raise AssertionError(f"{when}: {b!r} is {b.real.state.value} in reality, "
                                 f"{b.state.value} in the model")

    # -- file operations (on a branch, or on the base from outside) ---------------------------

    def _op_write(self, t: _Target, data: st.DataObject) -> None:
        p = self._pick(data, t.tree, "path", new=True)
        if p is None:
            return
        content = data.draw(_CONTENTS, label="content")
        mode = data.draw(st.sampled_from(FILE_MODES), label="mode")
        node = t.tree.get(p)
        expected: tuple[int, ...] = ()
        if node is not None and node.kind != "file":
            expected = (errno.EISDIR,) if node.is_dir else (errno.ELOOP,)

        def act() -> None:
            _write_file(t.root / p, content, os.O_CREAT | os.O_TRUNC)
            if node is None:
                os.chmod(t.root / p, mode)

        if self._expect(f"{t.label}: write {p!r} <- {content!r} mode {mode:#o}", expected, act):
            t.tree[p] = Node.file(content, mode if node is None else node.mode)

    def _op_append(self, t: _Target, data: st.DataObject) -> None:
        p = self._pick(data, t.tree, "file", kinds=("file",))
        if p is None:
            return
        content = data.draw(_CONTENTS, label="content")
        old = t.tree[p]
        if self._expect(f"{t.label}: append {p!r} <- {content!r}", (),
                        lambda: _write_file(t.root / p, content, os.O_APPEND)):
            t.tree[p] = Node.file(old.data + content, old.mode)

    def _op_truncate(self, t: _Target, data: st.DataObject) -> None:
        p = self._pick(data, t.tree, "file", kinds=("file",))
        if p is None:
            return
        old = t.tree[p]
        size = data.draw(st.integers(0, len(old.data) + 3), label="size")
        if self._expect(f"{t.label}: truncate {p!r} to {size}", (),
                        lambda: os.truncate(t.root / p, size)):
            grown = old.data[:size] + b"\0" * max(0, size - len(old.data))
            t.tree[p] = Node.file(grown, old.mode)

    def _op_mkdir(self, t: _Target, data: st.DataObject) -> None:
        p = self._pick(data, t.tree, "path", new=True)
        if p is None:
            return
        mode = data.draw(st.sampled_from(DIR_MODES), label="mode")
        expected = (errno.EEXIST,) if p in t.tree else ()

        def act() -> None:
            os.mkdir(t.root / p, 0o700)
            os.chmod(t.root / p, mode)

        if self._expect(f"{t.label}: mkdir {p!r} mode {mode:#o}", expected, act):
            t.tree[p] = Node.dir(mode)

    def _op_rmdir(self, t: _Target, data: st.DataObject) -> None:
        p = self._pick(data, t.tree, "dir", kinds=("dir",))
        if p is None:
            return
        full = any(q.startswith(p + "/") for q in t.tree)
        expected = (errno.ENOTEMPTY, errno.EEXIST) if full else ()
        if self._expect(f"{t.label}: rmdir {p!r}", expected, lambda: os.rmdir(t.root / p)):
            del t.tree[p]

    def _op_rename(self, t: _Target, data: st.DataObject) -> None:
        src = self._pick(data, t.tree, "source")
        if src is None:
            return
        dst = self._pick(data, t.tree, "destination", new=True)
        assert dst is not None
        if src != dst and (_under(dst, src) or _under(src, dst)):
            hypothesis.note(f"{t.label}: rename {src!r} -> {dst!r} skipped (nested paths)")
            return
        s, d = t.tree[src], t.tree.get(dst)
        expected: tuple[int, ...] = ()
        if src != dst and d is not None:
            if s.is_dir and not d.is_dir:
                expected = (errno.ENOTDIR,)
            elif not s.is_dir and d.is_dir:
                expected = (errno.EISDIR,)
            elif s.is_dir and any(q.startswith(dst + "/") for q in t.tree):
                expected = (errno.ENOTEMPTY, errno.EEXIST)
        if self._expect(f"{t.label}: rename {src!r} -> {dst!r}", expected,
                        lambda: os.rename(t.root / src, t.root / dst)) and src != dst:
            moved = {dst + p[len(src):]: n for p, n in t.tree.items() if _under(p, src)}
            _remove_model(t.tree, src)
            _remove_model(t.tree, dst)
            t.tree.update(moved)

    def _op_symlink(self, t: _Target, data: st.DataObject) -> None:
        p = self._pick(data, t.tree, "path", new=True)
        if p is None:
            return
        target = data.draw(st.sampled_from(self.targets), label="target")
        expected = (errno.EEXIST,) if p in t.tree else ()
        if self._expect(f"{t.label}: symlink {p!r} -> {target!r}", expected,
                        lambda: os.symlink(target, t.root / p)):
            t.tree[p] = Node.symlink(target)

    def _op_chmod(self, t: _Target, data: st.DataObject) -> None:
        p = self._pick(data, t.tree, "path", kinds=("file", "dir"))
        if p is None:
            return
        old = t.tree[p]
        mode = data.draw(st.sampled_from(DIR_MODES if old.is_dir else FILE_MODES), label="mode")
        if self._expect(f"{t.label}: chmod {p!r} {mode:#o}", (),
                        lambda: os.chmod(t.root / p, mode)):
            t.tree[p] = attrs.evolve(old, mode=mode)

    def _op_delete(self, t: _Target, data: st.DataObject) -> None:
        p = self._pick(data, t.tree, "path")
        if p is None:
            return
        if self._expect(f"{t.label}: delete {p!r}", (), lambda: _remove_real(t.root / p)):
            _remove_model(t.tree, p)

    def _op_recreate(self, t: _Target, data: st.DataObject) -> None:
        p = self._pick(data, t.tree, "path")
        if p is None:
            return
        kind = data.draw(st.sampled_from(["file", "dir", "symlink"]), label="new kind")
        if kind == "file":
            node = Node.file(data.draw(_CONTENTS, label="content"),
                             data.draw(st.sampled_from(FILE_MODES), label="mode"))
        elif kind == "dir":
            node = Node.dir(data.draw(st.sampled_from(DIR_MODES), label="mode"))
        else:
            node = Node.symlink(data.draw(st.sampled_from(self.targets), label="target"))

        def act() -> None:
            _remove_real(t.root / p)
            write_tree(t.root, {p: node})

        if self._expect(f"{t.label}: delete then recreate {p!r} as {node!r}", (), act):
            _remove_model(t.tree, p)
            t.tree[p] = node

    def _op_touch(self, t: _Target, data: st.DataObject) -> None:
        p = self._pick(data, t.tree, "file", kinds=("file",))
        if p is None:
            return
        ns = data.draw(st.sampled_from(_TIMES_NS), label="mtime_ns")
        self._expect(f"{t.label}: touch {p!r} mtime_ns={ns}", (),
                     lambda: os.utime(t.root / p, ns=(ns, ns), follow_symlinks=False))

    # -- rules ---------------------------------------------------------------------------------

    @precondition(lambda self: len(self._open()) < MAX_OPEN)
    @rule(data=st.data())
    def fork(self, data: st.DataObject) -> None:
        parents: list[_MBranch | None] = [
            b for b in self._deepest_first() if b.depth + 1 < MAX_LEVELS]
        parents.append(None)
        parent = data.draw(st.sampled_from(parents), label="parent (None: the base)")
        choice = data.draw(st.sampled_from([None, "<fresh>", *sorted(self.names_used)]),
                           label="name")
        name = f"n{self.counter}" if choice == "<fresh>" else choice
        self.counter += 1
        fork = self.ws.fork if parent is None else parent.real.fork
        where = "the base" if parent is None else repr(parent)
        hypothesis.note(f"fork {where} as {name!r}")
        if name is not None and name in {b.real.name for b in self._open()}:
            with contextlib.suppress(BranchExists):
                self.portal.call(fork, name)
                raise AssertionError(f"fork({name!r}) succeeded although {name!r} is open")
            return
        real = self.portal.call(fork, name)
        hypothesis.event(f"fork at depth {real.depth}")
        if name is not None and real.name != name:
            raise AssertionError(f"fork({name!r}) gave a branch named {real.name!r}")
        snapshot = dict(self.base if parent is None else parent.tree)
        mb = _MBranch(real, parent, snapshot, uid=len(self.branches))
        self.branches.append(mb)
        self.names_used.add(real.name)
        if parent is not None:
            parent.children.append(mb)

    @precondition(lambda self: bool(self._open()))
    @rule(data=st.data())
    def edit(self, data: st.DataObject) -> None:
        """One to four file operations, each on an open branch, straight on its directory."""
        for _ in range(data.draw(st.integers(1, 4), label="operations")):
            target = self._branch_target(data)
            op = data.draw(st.sampled_from(_FILE_OPS), label="operation")
            getattr(self, f"_op_{op}")(target, data)

    @precondition(lambda self: self.outside_writes)
    @rule(data=st.data())
    def outside_write(self, data: st.DataObject) -> None:
        """A file operation straight on the base: a parent change for top-level branches."""
        op = data.draw(st.sampled_from(_FILE_OPS), label="operation on the base")
        getattr(self, f"_op_{op}")(self._base_target(), data)

    @precondition(lambda self: bool(self._open()))
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        """Edit a branch and its parent a little, then commit (3 in 4) or abort the branch.

        The edits make this rule useful on its own: hypothesis often disables
        other rules for a whole run ("swarm testing").
        """
        b = data.draw(st.sampled_from(self._deepest_first()), label="branch to finish")
        parent = self._parent_target(b)
        for target, count in ((_Target(f"branch {b.real.name!r}", b.real.path, b.tree),
                               data.draw(st.integers(0, 2), label="edits in the branch")),
                              (parent, 0 if parent is None else data.draw(
                                  st.integers(0, 2), label="edits in its parent"))):
            for _ in range(count):
                assert target is not None
                op = data.draw(st.sampled_from(_FILE_OPS), label="operation")
                getattr(self, f"_op_{op}")(target, data)
        how = data.draw(st.sampled_from(["commit", "commit", "commit", "abort"]), label="how")
        if how == "abort":
            self._abort(b)
        else:
            self._commit(b)

    def _commit(self, b: _MBranch) -> None:
        parent_tree = self._parent_tree(b)
        ours = model_changed(b.snapshot, b.tree)
        theirs = model_changed(b.snapshot, parent_tree)
        conflicts = model_conflicts(ours, b.tree, theirs, parent_tree)
        hypothesis.note(f"commit {b!r}; model conflicts: {sorted(conflicts)}")
        try:
            self.portal.call(b.real.commit)
        except ConflictError as exc:
            if not conflicts:
                raise AssertionError(f"commit of {b!r} raised {exc!r}, but the model sees no "
                                     f"conflict (branch changed {sorted(ours)}, parent changed "
                                     f"{sorted(theirs)})") from exc
            if not exc.paths or not set(exc.paths) <= ours | theirs:
                raise AssertionError(f"ConflictError.paths {exc.paths} should name some of "
                                     f"{sorted(conflicts)}") from exc
            hypothesis.event("commit: conflict")
            return  # nothing changed: the invariant checks every tree
        if conflicts:
            raise AssertionError(f"commit of {b!r} succeeded, but the model expected a conflict "
                                 f"on {sorted(conflicts)}")
        for p in sorted(ours, key=lambda p: p.split("/")):
            if p in b.tree:
                parent_tree[p] = b.tree[p]
            else:
                parent_tree.pop(p, None)
        _check_model_tree(parent_tree, "the parent after a commit")
        hypothesis.event(f"commit: applied {'nothing' if not ours else 'changes'}"
                         f" at depth {b.depth}")
        b.state = BranchState.COMMITTED
        for d in b.open_descendants():
            d.state = BranchState.INVALIDATED
        siblings = b.parent.children if b.parent is not None else [
            x for x in self.branches if x.parent is None]
        for s in siblings:
            if s is not b and s.state is BranchState.OPEN:
                for d in [s, *s.open_descendants()]:
                    d.state = BranchState.INVALIDATED

    def _abort(self, b: _MBranch) -> None:
        hypothesis.note(f"abort {b!r}")
        victims = [b, *b.open_descendants()]
        self.portal.call(b.real.abort)
        for v in victims:
            v.state = BranchState.ABORTED

    @precondition(lambda self: bool(self.branches))
    @rule(data=st.data())
    def inspect(self, data: st.DataObject) -> None:
        """changes() and diff() of an open branch, or any operation on a closed one."""
        b = data.draw(st.sampled_from(self.branches), label="branch to inspect")
        if b.state is BranchState.OPEN:
            self._inspect_open(b)
        else:
            self._use_closed(b, data)

    def _use_closed(self, b: _MBranch, data: st.DataObject) -> None:
        op = data.draw(st.sampled_from(["fork", "commit", "changes", "diff", "abort"]),
                       label="operation")
        hypothesis.note(f"{op}() on {b!r}")
        if op == "abort":
            self.portal.call(b.real.abort)
            return
        invalidated = b.state is BranchState.INVALIDATED
        exc_type = BranchInvalidated if invalidated else BranchClosed
        try:
            self.portal.call(getattr(b.real, op))
        except BranchClosed as exc:
            if not isinstance(exc, exc_type) or (not invalidated
                                                 and isinstance(exc, BranchInvalidated)):
                raise AssertionError(f"{op}() on {b!r} raised {exc!r}, expected "
                                     f"{exc_type.__name__}") from exc
        else:
            raise AssertionError(f"{op}() on {b!r} did not raise {exc_type.__name__}")

    def _inspect_open(self, b: _MBranch) -> None:
        """changes() and diff() agree with the model."""
        hypothesis.note(f"changes() and diff() of {b!r}")
        changes = self.portal.call(b.real.changes)
        snap, now = b.snapshot, b.tree
        changed = model_changed(snap, now)
        content = {p for p in changed
                   if not (p in snap and p in now and snap[p].same_content(now[p]))}
        by_path = {c.path: c for c in changes}
        what = f"changes() of {b!r}:\n{_changes_summary(changes)}\n"
        if len(by_path) != len(changes):
            raise AssertionError(what + "lists a path twice")
        real_content = {p for p, c in by_path.items() if not c.metadata_only}
        if real_content != content:
            raise AssertionError(what + f"content changes should be {sorted(content)}")
        if not changed <= set(by_path):
            raise AssertionError(what + f"misses {sorted(changed - set(by_path))}")
        kinds = {"file": EntryType.FILE, "dir": EntryType.DIR, "symlink": EntryType.SYMLINK}
        for p, c in by_path.items():
            old, new = snap.get(p), now.get(p)
            want: tuple[ChangeKind, EntryType, EntryType | None]
            if old is None and new is not None:
                want = (ChangeKind.ADDED, kinds[new.kind], None)
            elif new is None and old is not None:
                want = (ChangeKind.DELETED, kinds[old.kind], kinds[old.kind])
            elif new is not None and old is not None:
                want = (ChangeKind.MODIFIED, kinds[new.kind], kinds[old.kind])
            else:
                raise AssertionError(what + f"lists {p!r}, which exists on neither side")
            if (c.kind, c.entry_type, c.old_type) != want:
                raise AssertionError(what + f"{p!r} should be {want}")
        text = self.portal.call(b.real.diff)
        for p in content:
            if f"a/{p}" not in text:
                raise AssertionError(f"diff() of {b!r} does not mention {p!r}:\n{text}")

    @invariant()
    def trees_match_model(self) -> None:
        _assert_tree(read_tree(self.ws.path), self.base, "the base")
        if (self.tmp / "outside.txt").read_bytes() != OUTSIDE:
            raise AssertionError("a file outside the workspace was written")
        for b in self.branches:
            self._check_state(b, "branch states")
            if b.state is BranchState.OPEN:
                _assert_tree(read_tree(b.real.path), b.tree, f"{b!r}")
        listed = sorted(x.name for x in self.ws.branches())
        expected = sorted(b.real.name for b in self._open())
        if listed != expected:
            raise AssertionError(f"Workspace.branches() lists {listed}, expected {expected}")


_HEALTH = [hypothesis.HealthCheck.too_slow, hypothesis.HealthCheck.filter_too_much,
           hypothesis.HealthCheck.data_too_large]


def check_model(
    factory: BackendFactory,
    *,
    examples: int = 200,
    steps: int = 50,
    outside_writes: bool = True,
    anyio_backend: str = "asyncio",
    settings: hypothesis.settings | None = None,
) -> None:
    """Run :class:`BackendStateMachine`: ``examples`` random runs of ``steps`` steps each.

    ``outside_writes=False`` stops writing into the base behind the workspace's
    back (for a backend that does not isolate top-level branches from such
    writes, which DESIGN.md allows). ``settings`` is a parent for the
    hypothesis settings (database, phases, verbosity, ...).
    """
    machine = BackendStateMachine.for_backend(factory, outside_writes=outside_writes,
                                              anyio_backend=anyio_backend)
    run_state_machine_as_test(machine, settings=hypothesis.settings(
        settings, max_examples=examples, stateful_step_count=steps, deadline=None,
        suppress_health_check=_HEALTH))


def _anyio_backends() -> list[str]:
    return ["asyncio"] + (["trio"] if importlib.util.find_spec("trio") is not None else [])


def _runner(check: Check, factory: BackendFactory, loop: str) -> Callable[[], None]:
    async def main() -> None:
        await check(factory)

    return lambda: anyio.run(main, backend=loop)


def check_backend(
    factory: BackendFactory,
    *,
    examples: int = 200,
    steps: int = 50,
    outside_writes: bool = True,
    anyio_backends: Iterable[str] | None = None,
    only: Iterable[str] | None = None,
    settings: hypothesis.settings | None = None,
) -> None:
    """Run the whole conformance suite against ``factory``'s backend; AssertionError on failure.

    ``factory`` returns a fresh, unopened backend each call. The targeted
    checks (:func:`backend_checks`) run on each of ``anyio_backends`` (asyncio,
    and trio when installed); the model check (:func:`check_model`, named
    ``"model"``) runs ``examples`` x ``steps`` on the first. ``only`` restricts
    the run to some check names. Call it from sync code: it runs its own loops.
    """
    checks = backend_checks()
    names = [*checks, "model"] if only is None else list(only)
    unknown = sorted(set(names) - {*checks, "model"})
    if unknown:
        raise ValueError(f"unknown checks {unknown}; known: {sorted([*checks, 'model'])}")
    loops = list(anyio_backends) if anyio_backends is not None else _anyio_backends()
    for name in names:
        runs: list[tuple[str, Callable[[], None]]]
        if name == "model":
            runs = [(loops[0], lambda: check_model(
                factory, examples=examples, steps=steps, outside_writes=outside_writes,
                anyio_backend=loops[0], settings=settings))]
        else:
            runs = [(loop, _runner(checks[name], factory, loop)) for loop in loops]
        for loop, run in runs:
            try:
                run()
            except AssertionError as exc:
                raise AssertionError(f"conformance check {name!r} failed ({loop}): {exc}"
                                     ) from exc
            except Exception as exc:
                raise AssertionError(f"conformance check {name!r} raised ({loop}): {exc!r}"
                                     ) from exc
