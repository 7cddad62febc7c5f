"""Manifests of views: digests, entries, and which paths a branch may have changed.

A commit or ``changes()`` looks only at the paths either side may have changed
since the fork (:func:`delta_paths`: what the branch's own layers hold, delete or
hide) and scans those through a view (:func:`scan_paths`), reusing digests of
files that did not change (:class:`DigestCache`, with git's racy rule).
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Iterable, Iterator

import attrs

from ..._branch import EntryType
from ..._manifest import RACY_MARGIN_NS, Entry, Manifest, hash_file
from ._layers import Found, Layer, View, join, sparse_of
from ._sparse import Sparse, hash_sparse

__all__ = ["DigestCache", "ViewScan", "delta_paths", "descendants", "entry_of", "scan_paths",
           "scan_view"]


class DigestCache:
    """Content digests by real path, trusted while (ino, size, mtime, ctime) hold.

    A digest is reused only when the file's ctime is older than the moment it
    was computed minus a margin (the "racy git" rule of :mod:`.._manifest`).
    """

    def __init__(self) -> None:
        self._d: dict[str, tuple[tuple[int, int, int, int], str, int]] = {}

    def digest(self, real: str, st: os.stat_result, sparse: Sparse | None = None) -> str:
        key = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        hit = self._d.get(real)
        if hit is not None and hit[0] == key and key[3] < hit[2] - RACY_MARGIN_NS:
            return hit[1]
        started = time.time_ns()
        digest = hash_sparse(real, sparse) if sparse is not None else hash_file(real)
        self._d[real] = (key, digest, started)
        if len(self._d) > 1_000_000:
            self._d.clear()
        return digest

    def forget_under(self, directory: str) -> None:
        prefix = directory.rstrip("/") + "/"
        for k in [k for k in self._d if k.startswith(prefix)]:
            del self._d[k]


def entry_of(f: Found, cache: DigestCache) -> Entry | None:
    """The manifest entry of ``f`` (as :func:`.._manifest.scan` would make it)."""
    st = f.st
    mode = st.st_mode
    perm = stat.S_IMODE(mode)
    if stat.S_ISREG(mode):
        return Entry(EntryType.FILE, perm, st.st_mtime_ns, st.st_size,
                     cache.digest(f.real, st, sparse_of(f)), uid=st.st_uid, gid=st.st_gid)
    if stat.S_ISDIR(mode):
        return Entry(EntryType.DIR, perm, uid=st.st_uid, gid=st.st_gid)
    if stat.S_ISLNK(mode):
        return Entry(EntryType.SYMLINK, 0o777, target=os.readlink(f.real),
                     uid=st.st_uid, gid=st.st_gid)
    if stat.S_ISFIFO(mode):
        return Entry(EntryType.FIFO, perm, uid=st.st_uid, gid=st.st_gid)
    return None


@attrs.define
class ViewScan:
    """A view's manifest, the real path of each non-directory, and which entries its
    layers hold (the others show through from the base)."""

    manifest: Manifest
    reals: dict[str, str]
    owned: set[str]
    sparse: dict[str, Sparse] = attrs.Factory(dict)  # files whose real file is not whole


def scan_view(view: View, cache: DigestCache) -> ViewScan:
    """Walk a view (see :class:`ViewScan`)."""
    out: Manifest = {}
    reals: dict[str, str] = {}
    owned: set[str] = set()
    for f in view.walk():
        try:
            e = entry_of(f, cache)
        except FileNotFoundError:
            continue
        if e is None:
            continue
        out[f.path] = e
        if e.type is not EntryType.DIR:
            reals[f.path] = f.real
        if f.layer is not None:
            owned.add(f.path)
    return ViewScan(out, reals, owned)


def _walk_layer(tree: str) -> Iterator[tuple[str, bool]]:
    """(path, is a real directory) for every entry of a layer's tree."""
    stack = [(tree, "")]
    while stack:
        real, rel = stack.pop()
        try:
            it = os.scandir(real)
        except (FileNotFoundError, NotADirectoryError):
            continue
        with it:
            for de in it:
                p = join(rel, de.name)
                is_dir = de.is_dir(follow_symlinks=False)
                yield p, is_dir
                if is_dir:
                    stack.append((de.path, p))


def descendants(view: View, path: str) -> Iterator[str]:
    """Every path strictly below directory ``path`` of ``view`` (none if not a directory)."""
    f = view.resolve(path)
    if f is None or f.dirs is None:
        return
    stack = [f]
    while stack:
        d = stack.pop()
        assert d.dirs is not None
        for c in view.listdir(d.path, d.dirs):
            yield c.path
            if c.dirs is not None:
                stack.append(c)


def delta_paths(layers: list[Layer], below: View) -> set[str]:
    """Every path where ``layers`` stacked on ``below`` may differ from ``below`` alone.

    That is what the layers hold, what they delete (whiteouts), and what a
    deletion, an opaque directory or a non-directory hides in ``below``. The
    cost grows with the layers' contents, not with the workspace.
    """
    out: set[str] = set()
    hides: set[str] = set()
    for layer in layers:
        for p, is_dir in _walk_layer(layer.tree):
            out.add(p)
            if not is_dir:
                hides.add(p)
        for d, names in list(layer.whiteouts.items()):
            for n in list(names):
                p = join(d, n)
                out.add(p)
                hides.add(p)
        hides.update(layer.opaque)
    for p in hides:
        out.update(descendants(below, p))
    return out


def scan_paths(view: View, paths: Iterable[str], cache: DigestCache) -> ViewScan:
    """Like :func:`scan_view`, for ``paths`` only (those not visible are left out)."""
    out: Manifest = {}
    reals: dict[str, str] = {}
    owned: set[str] = set()
    sparse: dict[str, Sparse] = {}
    dirs: dict[str, Found | None] = {"": view.root()}

    def resolve(p: str) -> Found | None:
        if p in dirs:
            return dirs[p]
        head, _, name = p.rpartition("/")
        parent = resolve(head)
        f = None
        if parent is not None and parent.dirs is not None:
            f = view.lookup(head, parent.dirs, name)
        if f is None or f.dirs is not None:
            dirs[p] = f
        return f

    for p in sorted(paths):
        f = resolve(p)
        if f is None:
            continue
        try:
            e = entry_of(f, cache)
        except FileNotFoundError:
            continue
        if e is None:
            continue
        out[p] = e
        if e.type is not EntryType.DIR:
            reals[p] = f.real
            sp = sparse_of(f)
            if sp is not None:
                sparse[p] = sp
        if f.layer is not None:
            owned.add(p)
    return ViewScan(out, reals, owned, sparse)
