"""The model check: a hypothesis state machine compared with a plain dict model."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import ClassVar, cast

import attrs
from anyio.from_thread import BlockingPortal, start_blocking_portal

from .._branch import Branch, BranchState, ChangeKind, EntryType
from .._workspace import Workspace
from ..exceptions import (
    BranchClosed,
    BranchExists,
    BranchInvalidated,
    ConflictError,
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

from ._harness import OUTSIDE, BackendFactory, _changes_summary, _open
from ._model import (
    DIR_MODES,
    FILE_MODES,
    Node,
    Tree,
    _assert_tree,
    _check_model_tree,
    _remove_all,
    _under,
    _write_file,
    model_changed,
    model_conflicts,
    read_tree,
    write_tree,
)

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
    writes, as docs/design.md allows: "Departures from the design brief").
    ``settings`` is a parent for the hypothesis settings (database, phases,
    verbosity, ...).
    """
    machine = BackendStateMachine.for_backend(factory, outside_writes=outside_writes,
                                              anyio_backend=anyio_backend)
    run_state_machine_as_test(machine, settings=hypothesis.settings(
        settings, max_examples=examples, stateful_step_count=steps, deadline=None,
        suppress_health_check=_HEALTH))
