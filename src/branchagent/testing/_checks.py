"""The targeted checks: one async function per rule of the contract."""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path
from typing import cast

from .._branch import Branch, BranchState, ChangeKind, EntryType, Usage
from ..exceptions import (
    BranchClosed,
    BranchExists,
    BranchInvalidated,
    ConflictError,
    InvalidBranchName,
    PathEscapeError,
)
from ._harness import (
    OUTSIDE,
    SEED,
    BackendFactory,
    Check,
    _assert_closed_ops,
    _assert_state,
    _changes_summary,
    _expect_raises,
    _fs,
    _open,
    _scratch,
    _tree,
    _with,
)
from ._model import Node, Tree, _assert_tree, _put, _write_file


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
