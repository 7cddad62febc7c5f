"""Atomic application of a branch's changes to a target tree, through a journal.

A commit is a list of :class:`Op` on paths of the target tree. :func:`apply`
runs it in four steps:

1. *intent*: the plan is written to ``<journal>/<txn>/plan.json`` and fsynced;
2. *apply*: each op moves the old entry (if any) into ``<txn>/backup/<i>``
   with rename(2), then places the new one (rename from the source, or a
   copy when the source is on another filesystem or in a read-only directory);
3. *done*: a ``done`` marker is written and fsynced: the point of no return;
4. *cleanup*: backups, and the source trees the commit releases, are removed.

If an op fails (ENOSPC, EACCES, ...) every op already applied is undone in
reverse, the source files are moved back, and :class:`CommitFailed` is
raised: nothing changed. If the process dies at any instant, :func:`recover`
(run when the workspace is opened again) rolls an unfinished transaction
back from the plan and the backups, or finishes the cleanup of a done one.
Rollback is idempotent, so a crash during recovery is recovered too.

Nothing is ever deleted before ``done``: undone entries go to ``<txn>/trash``.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import json
import os
import shutil
import stat
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import attrs

from ._branch import EntryType
from ._log import get_logger
from ._manifest import Entry, parent_of
from .exceptions import CommitFailed, PathEscapeError, WorkspaceCorrupt

__all__ = ["Op", "OpKind", "apply", "build_plan", "fault", "recover", "remove_tree",
           "write_durable"]

log = get_logger("branchagent.journal")

#: Test hook: called as ``FAULT_HOOK(step)`` between journal steps. A crash
#: test sets it to something that kills the process at a chosen step.
FAULT_HOOK: Callable[[str], None] | None = None


def _fault(step: str) -> None:
    if FAULT_HOOK is not None:
        FAULT_HOOK(step)


def fault(step: str) -> None:
    """Call :data:`FAULT_HOOK` (crash tests) at ``step`` of another crash-safe procedure."""
    _fault(step)


def write_durable(path: Path, data: bytes) -> None:
    """Write ``path`` whole and fsync it and its directory (a crash leaves it or nothing)."""
    _write_durable(path, data)


class OpKind(enum.Enum):
    ADD = "add"  # nothing there; place new
    REPLACE = "replace"  # move old away; place new
    REMOVE = "remove"  # move old away
    ATTR = "attr"  # directory stays; mode changes


@attrs.frozen
class Op:
    path: str
    kind: OpKind
    new: Entry | None
    source: str = ""  # absolute path of the new file's content (files only)
    old_mode: int = 0  # ATTR: for rollback

    def to_json(self) -> dict[str, object]:
        return {
            "path": self.path,
            "kind": self.kind.value,
            "new": self.new.to_json() if self.new is not None else None,
            "source": self.source,
            "old_mode": self.old_mode,
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, object]) -> Op:
        new = raw["new"]
        return cls(
            path=str(raw["path"]),
            kind=OpKind(raw["kind"]),
            new=Entry.from_json(new) if isinstance(new, list) else None,
            source=str(raw["source"]),
            old_mode=int(raw["old_mode"]),  # type: ignore[call-overload]
        )


def _depth_key(path: str) -> tuple[str, ...]:
    return tuple(path.split("/"))


def build_plan(
    paths: Iterable[str],
    target_now: Mapping[str, Entry],
    new_state: Mapping[str, Entry],
    source_of: Callable[[str], Path],
) -> list[Op]:
    """Ops that make each of ``paths`` in the target look as in ``new_state``.

    Parents come before children. Paths already in the wanted state, and
    descendants of a directory that is moved away whole, are left out.
    """
    ops: list[Op] = []
    removed_dirs: list[str] = []
    for p in sorted(paths, key=_depth_key):
        if any(p.startswith(d + "/") for d in removed_dirs):
            continue
        old, new = target_now.get(p), new_state.get(p)
        if old is None and new is None:
            continue
        if old is not None and new is not None and old.same(new):
            continue
        src = os.fspath(source_of(p)) if new is not None and new.type is EntryType.FILE else ""
        if new is None:
            ops.append(Op(p, OpKind.REMOVE, None))
        elif old is None:
            ops.append(Op(p, OpKind.ADD, new, src))
        elif old.type is EntryType.DIR and new.type is EntryType.DIR:
            ops.append(Op(p, OpKind.ATTR, new, old_mode=old.mode))
            continue
        else:
            ops.append(Op(p, OpKind.REPLACE, new, src))
        if old is not None and old.type is EntryType.DIR:
            removed_dirs.append(p)
    return ops


def _fsync_path(path: Path, *, directory: bool = False) -> None:
    fd = os.open(path, (os.O_RDONLY | os.O_DIRECTORY) if directory else os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durable(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_path(path.parent, directory=True)


def _check_parent_chain(root: Path, rel: str) -> None:
    """Refuse to write through a symlinked directory inside the target tree."""
    parent = parent_of(rel)
    if not parent:
        return
    real = os.path.realpath(root / parent)
    if real != os.path.join(os.path.realpath(root), parent):
        raise PathEscapeError(
            f"{parent!r} in {root} is not a plain directory (symlink?); "
            "refusing to write through it"
        )


def _place(root: Path, op: Op, *, as_root: bool) -> None:
    new = op.new
    assert new is not None
    dest = root / op.path
    if new.type is EntryType.DIR:
        os.mkdir(dest, 0o700)
    elif new.type is EntryType.SYMLINK:
        os.symlink(new.target, dest)
    elif new.type is EntryType.FIFO:
        os.mkfifo(dest, new.mode)
    else:
        try:
            os.rename(op.source, dest)
        except OSError as exc:
            # EXDEV: another filesystem. EACCES/EPERM: the source sits in a read-only
            # directory of the branch (not root); copying needs no write access there.
            if exc.errno not in (errno.EXDEV, errno.EACCES, errno.EPERM):
                raise
            shutil.copy2(op.source, dest, follow_symlinks=False)
            os.chmod(dest, new.mode)
    if as_root and new.uid >= 0:
        os.lchown(dest, new.uid, new.gid)


def _finish_dirs(root: Path, ops: list[Op]) -> None:
    """Set directory modes after their children are in place (deepest first)."""
    for op in reversed(ops):
        if op.new is not None and op.new.type is EntryType.DIR:
            os.chmod(root / op.path, op.new.mode)


def apply(
    root: Path, journal_dir: Path, ops: list[Op], *, release: Iterable[Path] = ()
) -> None:
    """Apply ``ops`` to ``root`` atomically (see the module docstring).

    ``release`` names trees (the committed branch's storage) removed once the
    commit is done; the plan records them so recovery after ``done`` removes
    them too, and a committed branch never reappears after a crash.
    """
    if not ops:
        return
    txn = journal_dir / f"txn-{uuid.uuid4().hex}"
    backup = txn / "backup"
    plan = {"root": os.fspath(root), "ops": [op.to_json() for op in ops],
            "release": [os.fspath(p) for p in release]}
    as_root = os.geteuid() == 0
    done_ops = 0
    applying = False
    try:
        os.makedirs(backup)
        _write_durable(txn / "plan.json", json.dumps(plan).encode())
        _fault("intent")
        applying = True
        for i, op in enumerate(ops):
            _check_parent_chain(root, op.path)
            dest = root / op.path
            if op.kind is OpKind.ATTR:
                pass  # modes are set by _finish_dirs
            else:
                if op.kind in (OpKind.REPLACE, OpKind.REMOVE):
                    _move(dest, backup / str(i))
                if op.kind in (OpKind.ADD, OpKind.REPLACE):
                    _place(root, op, as_root=as_root)
            done_ops = i + 1
            _fault(f"op:{i}")
        _finish_dirs(root, ops)
        _write_durable(txn / "done", b"done\n")
    except BaseException as exc:
        if os.path.lexists(txn / "done"):  # its fsync failed: not done, and must not look so
            os.unlink(txn / "done")
        if applying:
            _rollback(root, txn, ops, upto=done_ops + 1)
        _remove_txn(txn)
        if isinstance(exc, OSError):
            raise CommitFailed(
                exc.errno or errno.EIO,
                f"commit rolled back, nothing changed: {exc.strerror or exc}",
                exc.filename,
            ) from exc
        raise
    _fault("done")
    _release(plan["release"])
    _remove_txn(txn)
    _fault("cleaned")


def _remove_txn(txn: Path) -> None:
    _release([os.fspath(txn)])  # backups may hold read-only directories


def _release(paths: object) -> None:
    """Remove the trees a done commit releases (directories without write permission too)."""
    for raw in paths if isinstance(paths, list) else []:
        path = str(raw)
        if os.path.isdir(path) and not os.path.islink(path):
            with contextlib.suppress(OSError):
                remove_tree(path)


def remove_tree(path: str) -> None:
    """Remove ``path`` and everything below it without following symlinks; directories
    without write or search permission are opened (chmod 700) as they are met. No error
    when ``path`` is already gone. (One scandir per directory, no per-file stat.)"""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(path)
        return
    stack, dirs = [path], []
    while stack:
        d = stack.pop()
        dirs.append(d)
        try:
            it = os.scandir(d)
        except PermissionError:
            os.chmod(d, 0o700)
            it = os.scandir(d)
        with it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
                    continue
                try:
                    os.unlink(e.path)
                except PermissionError:
                    os.chmod(d, 0o700)
                    os.unlink(e.path)
                except FileNotFoundError:
                    pass
    for d in reversed(dirs):
        try:
            os.rmdir(d)
        except PermissionError:
            os.chmod(os.path.dirname(d), 0o700)
            os.rmdir(d)


def _lexists(path: Path) -> bool:
    return os.path.lexists(path)


def _rollback(root: Path, txn: Path, ops: list[Op], *, upto: int | None = None) -> None:
    """Undo ``ops[:upto]`` in reverse. Idempotent: safe after a crash at any point."""
    backup = txn / "backup"
    trash = txn / "trash"
    count = len(ops) if upto is None else min(upto, len(ops))
    # Directories this commit made or changed may be read-only by now (_finish_dirs);
    # give them back write access so their entries can move. Undoing restores modes.
    for op in ops[:count]:
        d = root / op.path
        if (op.new is not None and op.new.type is EntryType.DIR
                and os.path.isdir(d) and not os.path.islink(d)):
            os.chmod(d, stat.S_IMODE(os.lstat(d).st_mode) | 0o700)
    for i in reversed(range(count)):
        op = ops[i]
        dest = root / op.path
        saved = backup / str(i)
        if op.kind is OpKind.ATTR:
            if os.path.isdir(dest) and not os.path.islink(dest):
                os.chmod(dest, op.old_mode)
            continue
        placed = (op.kind is OpKind.ADD and _lexists(dest)) or (
            op.kind is OpKind.REPLACE and _lexists(saved) and _lexists(dest)
        )
        if placed:
            if op.source and not _lexists(Path(op.source)) and not os.path.isdir(dest):
                os.rename(dest, op.source)  # give the file back to the branch
            elif os.path.isdir(dest) and not os.path.islink(dest):
                try:
                    os.rmdir(dest)
                except OSError:
                    os.makedirs(trash, exist_ok=True)
                    _move(dest, trash / str(i))
            else:
                os.makedirs(trash, exist_ok=True)
                _move(dest, trash / str(i))
        if _lexists(saved):
            _move(saved, dest)


def _move(src: Path, dst: Path) -> None:
    """rename(2); across mounts (a commit into a branch mounted with overlayfs, whose
    tree is not the journal's mount), a copy that appears at ``dst`` whole (made beside
    it, then renamed), after which ``src`` is removed. A crash in between leaves ``src``
    in place and ``dst`` either absent or whole, so a rollback redoes or finishes it."""
    try:
        os.rename(src, dst)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    else:
        return
    part = dst.parent / f".{dst.name}.branchagent-part"
    remove_tree(os.fspath(part))  # left by a crash in an earlier try
    st = os.lstat(src)
    if stat.S_ISDIR(st.st_mode):
        shutil.copytree(src, part, symlinks=True)
    elif stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(src), part)
    elif stat.S_ISFIFO(st.st_mode):
        os.mkfifo(part, stat.S_IMODE(st.st_mode))
    else:
        shutil.copy2(src, part, follow_symlinks=False)
    if os.geteuid() == 0:
        os.lchown(part, st.st_uid, st.st_gid)
    if os.path.isdir(dst) and not os.path.islink(dst):
        remove_tree(os.fspath(dst))  # a restore whose source removal a crash cut short
    os.rename(part, dst)
    remove_tree(os.fspath(src))


def recover(journal_dir: Path) -> list[str]:
    """Finish or roll back every transaction left by a crash. Returns what was done."""
    report: list[str] = []
    if not journal_dir.is_dir():
        return report
    for txn in sorted(journal_dir.iterdir()):
        if not txn.name.startswith("txn-"):
            continue
        if (txn / "done").exists():
            # The commit is complete; storage we fail to release is only space.
            with contextlib.suppress(OSError, ValueError, AttributeError):
                _release(json.loads((txn / "plan.json").read_bytes()).get("release"))
            _remove_txn(txn)
            report.append(f"{txn.name}: completed")
            continue
        plan_path = txn / "plan.json"
        if not plan_path.exists():
            _remove_txn(txn)  # crashed before the intent was durable: nothing was applied
            report.append(f"{txn.name}: discarded (no intent)")
            continue
        try:
            plan = json.loads(plan_path.read_bytes())
            root = Path(plan["root"])
            ops = [Op.from_json(o) for o in plan["ops"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise WorkspaceCorrupt(f"unreadable commit journal {plan_path}: {exc}") from exc
        _rollback(root, txn, ops)
        _remove_txn(txn)
        report.append(f"{txn.name}: rolled back")
        log.warning("commit_rolled_back", txn=txn.name, root=str(root), ops=len(ops))
    return report
