"""The portable backend: a fork copies the tree; a commit moves files by rename.

Works on any POSIX filesystem. A fork copies every entry of the parent
(reflink with FICLONE where the filesystem supports it, a plain copy
otherwise), preserving modes, mtimes, owners (as root), xattrs and symlinks
(never followed). The parent's manifest at fork time is kept with the
branch; commit compares it with both sides to find conflicts, then moves
the branch's changed files into the parent with the journal of
:mod:`branchagent._journal`.

Layout under the state directory::

    copy/branches/<name>/tree/           the branch's files (Branch.path)
    copy/branches/<name>/manifest.json   the parent's manifest at the fork
    copy/branches/<name>/parent.json     the parent's name (null: the base)
    journal/                             commit transactions

Limits: the fork cost grows with the tree (it is a copy); hard links inside
the tree are copied as separate files; sockets and devices are skipped.

Disk. A branch is a plain directory on the workspace's filesystem, so nothing
here can stop a process from filling it: :meth:`CopyBackend.set_disk_limit`
says so (``None``), and the workspace reports the limit as not enforced.
:meth:`CopyBackend.usage` counts what the branch's copy differs by from its
fork (files added or changed, at their whole size, found by ``lstat`` against
the fork's manifest, without hashing); the unchanged rest of the copy is not
counted, though without reflinks it takes the whole tree's size on disk.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Sequence
from pathlib import Path

import anyio
import anyio.to_thread

from .. import _journal
from .._branch import Change, EntryType, Usage
from .._fileops import Reflinks, copy_file, tree_usage
from .._manifest import (
    Entry,
    HashCache,
    Manifest,
    hash_file,
    scan,
    to_changes,
)
from .._merge import plan_merge
from .._protocols import SavedBranches
from ..exceptions import WorkspaceClosed, WorkspaceCorrupt

__all__ = ["CopyBackend"]

def copy_tree(src: Path, dst: Path) -> None:
    """Copy ``src`` to a new directory ``dst`` with metadata; symlinks stay symlinks."""
    as_root = os.geteuid() == 0
    reflinks = Reflinks()
    dirs: list[tuple[str, os.stat_result]] = []
    os.mkdir(dst, 0o700)
    dirs.append((os.fspath(dst), os.stat(src)))
    stack = [(os.fspath(src), os.fspath(dst))]
    while stack:
        s_dir, d_dir = stack.pop()
        with os.scandir(s_dir) as it:
            for de in it:
                d = os.path.join(d_dir, de.name)
                st = de.stat(follow_symlinks=False)
                mode = st.st_mode
                if stat.S_ISDIR(mode):
                    os.mkdir(d, 0o700)
                    dirs.append((d, st))
                    stack.append((de.path, d))
                    continue
                if stat.S_ISREG(mode):
                    copy_file(de.path, d, st, reflinks=reflinks, as_root=as_root)
                    continue
                if stat.S_ISLNK(mode):
                    os.symlink(os.readlink(de.path), d)
                elif stat.S_ISFIFO(mode):
                    os.mkfifo(d, stat.S_IMODE(mode))
                    os.utime(d, ns=(st.st_atime_ns, st.st_mtime_ns))
                else:
                    continue  # sockets, devices: not tracked
                if as_root:
                    os.lchown(d, st.st_uid, st.st_gid)
    # Directory metadata last, deepest first, so child creation does not bump mtimes.
    for d, st in reversed(dirs):
        os.chmod(d, stat.S_IMODE(st.st_mode))
        if as_root:
            os.lchown(d, st.st_uid, st.st_gid)
        os.utime(d, ns=(st.st_atime_ns, st.st_mtime_ns))


def _make_writable_and_remove(path: Path) -> None:
    """rmtree that also removes entries of directories without write permission."""
    if not os.path.lexists(path):
        return
    if os.path.isdir(path) and not os.path.islink(path):
        for dirpath, _dirnames, _files in os.walk(path):
            try:
                os.chmod(dirpath, 0o700)
            except FileNotFoundError:
                pass
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _unchanged(e: Entry | None, st: os.stat_result, real: str) -> bool:
    """Whether a non-directory still looks as at the fork (by ``lstat``: no hashing)."""
    if e is None:
        return False
    mode = st.st_mode
    if stat.S_ISLNK(mode):
        return e.type is EntryType.SYMLINK and e.target == os.readlink(real)
    if stat.S_IMODE(mode) != e.mode:
        return False
    if stat.S_ISREG(mode):
        return (e.type is EntryType.FILE and e.size == st.st_size
                and e.mtime_ns == st.st_mtime_ns)
    return stat.S_ISFIFO(mode) and e.type is EntryType.FIFO


class CopyBackend:
    """Fork by copying; commit by journaled rename. See the module docstring."""

    name = "copy"
    #: How this backend enforces disk limits: it cannot (see the module docstring).
    disk_limits: str | None = None
    #: A top-level branch is a full copy: writes into the base from outside do not show.
    isolates_outside_writes = True
    #: The workspace keeps the branch tree (branches.json); this backend keeps no records.
    keeps_branches = False

    def __init__(self) -> None:
        self._root: Path | None = None
        self._state: Path | None = None
        self._caches: dict[str | None, HashCache] = {}
        self._manifests: dict[str, Manifest] = {}
        self._parents: dict[str, str | None] = {}

    # -- helpers -------------------------------------------------------------

    def _require(self) -> tuple[Path, Path]:
        if self._root is None or self._state is None:
            raise WorkspaceClosed("the copy backend is not open")
        return self._root, self._state

    def _branch_dir(self, name: str) -> Path:
        return self._require()[1] / "copy" / "branches" / name

    @property
    def views_root(self) -> Path:
        """The directory holding every branch's view (sessions bind views from here)."""
        return self._require()[1] / "copy" / "branches"

    def path(self, name: str | None) -> Path:
        root, _ = self._require()
        if name is None:
            return root
        return self._branch_dir(name) / "tree"

    def exists(self, name: str) -> bool:
        d = self._branch_dir(name)
        return (d / "tree").is_dir() and (d / "manifest.json").is_file()

    def _scan(self, name: str | None) -> Manifest:
        manifest, cache = scan(self.path(name), self._caches.get(name))
        self._caches[name] = cache
        return manifest

    def _parent_of(self, name: str) -> str | None:
        """The branch ``name`` was forked from (``None``: the base), as recorded at the fork.

        A branch made before the record existed finds it in the workspace's branch tree.
        """
        if name in self._parents:
            return self._parents[name]
        try:
            parent = json.loads((self._branch_dir(name) / "parent.json").read_bytes())
        except FileNotFoundError:
            tree = json.loads((self._require()[1] / "branches.json").read_bytes())
            parent = tree["branches"][name]["parent"]
        if parent is not None and not isinstance(parent, str):
            raise WorkspaceCorrupt(f"branch {name!r}: its parent record is {parent!r}")
        self._parents[name] = parent
        return parent

    def _fork_manifest(self, name: str) -> Manifest:
        m = self._manifests.get(name)
        if m is None:
            raw = json.loads((self._branch_dir(name) / "manifest.json").read_bytes())
            m = {p: Entry.from_json(e) for p, e in raw.items()}
            self._manifests[name] = m
        return m

    # -- Backend protocol ----------------------------------------------------

    async def open(self, root: Path, state_dir: Path) -> None:
        self._root, self._state = root, state_dir
        (state_dir / "copy" / "branches").mkdir(parents=True, exist_ok=True)
        await anyio.to_thread.run_sync(_journal.recover, state_dir / "journal")

    def _create_sync(self, name: str, parent: str | None) -> Path:
        d = self._branch_dir(name)
        d.mkdir(parents=True)
        try:
            manifest = self._scan(parent)
            copy_tree(self.path(parent), d / "tree")
            data = json.dumps({p: e.to_json() for p, e in manifest.items()})
            (d / "manifest.json").write_text(data)
            (d / "parent.json").write_text(json.dumps(parent))
        except BaseException:
            _make_writable_and_remove(d)
            raise
        self._manifests[name] = manifest
        self._parents[name] = parent
        return d / "tree"

    async def create(self, name: str, parent: str | None) -> Path:
        return await anyio.to_thread.run_sync(self._create_sync, name, parent)

    def _commit_sync(self, name: str) -> list[Change]:
        _, state = self._require()
        parent = self._parent_of(name)
        snapshot = self._fork_manifest(name)
        ours = self._scan(name)
        theirs = self._scan(parent)
        tree = self.path(name)
        paths = plan_merge(name, snapshot, ours, theirs)
        ops = _journal.build_plan(paths, theirs, ours, lambda p: tree / p)
        _journal.apply(self.path(parent), state / "journal", ops,
                       release=self._released_by_commit(name))
        # The parent's hash cache stays valid: every file the commit placed has a new
        # (inode, size, mtime, ctime) key, so the next scan rehashes exactly those.
        changes = to_changes(snapshot, ours)
        self._release(name)
        return changes

    def _released_by_commit(self, name: str) -> list[Path]:
        """What the journal removes once a commit of ``name`` is done (also when it is
        finished by recovery after a crash): then the branch is gone for good."""
        return [self._branch_dir(name)]

    async def commit(self, name: str) -> list[Change]:
        return await anyio.to_thread.run_sync(self._commit_sync, name)

    def _release(self, name: str) -> None:
        self._manifests.pop(name, None)
        self._caches.pop(name, None)
        self._parents.pop(name, None)
        _make_writable_and_remove(self._branch_dir(name))

    async def abort(self, name: str) -> None:
        await anyio.to_thread.run_sync(self._release, name)

    async def abort_many(self, names: Sequence[str]) -> None:
        """Release every branch of ``names`` in one worker-thread hop; the first error
        is raised once all were tried."""

        def run() -> None:
            first: OSError | None = None
            for name in names:
                try:
                    self._release(name)
                except OSError as exc:
                    first = first or exc
            if first is not None:
                raise first

        await anyio.to_thread.run_sync(run)

    def saved_branches(self) -> SavedBranches | None:
        """None: the workspace keeps this backend's branch tree (``branches.json``)."""
        return None

    def read_saved_branches(self, state_dir: Path) -> SavedBranches | None:
        return None

    async def changes(self, name: str, parent: str | None) -> list[Change]:
        def run() -> list[Change]:
            return to_changes(self._fork_manifest(name), self._scan(name))

        return await anyio.to_thread.run_sync(run)

    def _usage_sync(self, name: str) -> Usage:
        fork = self._fork_manifest(name)
        tree = self.path(name)
        total, files = tree_usage(
            os.fspath(tree), lambda rel, st, path: _unchanged(fork.get(rel), st, path))
        return Usage(bytes=total, files=files)

    async def usage(self, name: str) -> Usage:
        """What the branch's copy differs by from its fork (see the module docstring)."""
        return await anyio.to_thread.run_sync(self._usage_sync, name)

    async def set_disk_limit(self, name: str, limit: int | None) -> str | None:
        """Nothing can cap a plain directory: never enforced here."""
        return None

    async def old_content(self, name: str, parent: str | None, path: str) -> bytes | None:
        def run() -> bytes | None:
            entry = self._fork_manifest(name).get(path)
            if entry is None or entry.type is not EntryType.FILE:
                return None
            src = self.path(parent) / path
            try:
                if not stat.S_ISREG(os.lstat(src).st_mode):
                    return None  # replaced (by a symlink, a directory) since: never follow
                data = src.read_bytes()
                digest = hash_file(src)
            except OSError:
                return None
            return data if digest == entry.digest else None

        return await anyio.to_thread.run_sync(run)

    async def aclose(self) -> None:
        self._caches.clear()
        self._manifests.clear()
        self._parents.clear()
        self._root = self._state = None
