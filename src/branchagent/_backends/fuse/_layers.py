"""Copy-on-write layers: what a branch of the FUSE backend sees, and how it changes.

A branch's *view* is a stack of layers over the live base directory, top
first. Each layer is a sparse directory tree (``<layer>/tree``) plus two
sets kept in memory and in an append-only log (``<layer>/meta.log``):

- *whiteouts*: paths deleted in this layer; nothing below shows through;
- *opaque* directories: made in this layer; nothing below them shows through.

Only the top layer of a branch is ever written. A fork freezes the parent's
top layer: parent and child each get a fresh empty top above it, so both
see the parent exactly as at the fork (snapshot isolation) and the fork
costs O(1), whatever the size of the workspace.

Lookup walks a directory's *sources* (the layers where it exists as a
directory, top first, down to an opaque one): the first layer holding the
name wins, a whiteout hides it, and a directory merges with the directories
of the same name below it. Invariants: a layer holding an entry or a
whiteout at ``a/b`` holds the directory ``a``; the top layer never holds a
whiteout where it holds an entry.

Sparse records are in ``._sparse``, manifests of views (digests, the paths a
branch may have changed) in ``._scan``, and the byte copying in ``.._fileops``.

Copy-up. A small file (under 1 MiB) is copied whole, with FICLONE where the
filesystem has reflinks. A larger one is copied up *sparse* (see
:class:`Sparse`): the top layer gets a file of the same size holding no data
and a record of where its missing bytes live; a write first fills only the
64 KiB chunks it touches partly, reads take missing chunks from below, and
nothing else is copied until something needs the whole file (a commit, a
content digest, a hard link): then the missing chunks are filled in place.
Writing a few bytes into a 1 GB file therefore copies 64 KiB, and an aborted
branch never copies the rest. Records live in the layer's ``sparse.log``, so a
restarted filesystem process reads such a file as before.

Disk limits. A branch's cost is what its own layers hold (:func:`tree_usage`):
the apparent size of their regular files (a hard-linked file once) plus the
target length of their symlinks, and the number of those entries; directories
and whiteouts cost nothing. A file copied up counts at its whole size, also
when the copy-up was sparse or a reflink (a commit makes it whole). While a
branch has a limit, its :class:`Quota` follows that figure write by write (a
size delta, never a walk) and the filesystem refuses what would pass it with
``EDQUOT``; :meth:`View.copy_up` charges the copies it makes.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
from collections.abc import Iterator

import attrs

from ... import _journal
from ..._fileops import copy_data, copy_metadata, tree_usage
from ._sparse import CHUNK, Sparse

__all__ = [
    "CHUNK",
    "SPARSE_MIN",
    "Found",
    "Layer",
    "Quota",
    "Source",
    "Sparse",
    "View",
    "cost",
    "join",
    "parent_of",
    "rmtree",
    "sparse_of",
    "split",
    "tree_usage",
    "whole_file",
]

#: Files at least this large are copied up sparse; smaller ones whole.
SPARSE_MIN = 1 << 20
_AS_ROOT = os.geteuid() == 0


def join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def parent_of(path: str) -> str:
    return path.rpartition("/")[0]


def split(path: str) -> tuple[str, str]:
    head, _, tail = path.rpartition("/")
    return head, tail


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root + "/")


# -- disk limits ------------------------------------------------------------------------------


class Quota:
    """A branch's disk limit and, while one is set, the bytes its own layers hold.

    ``used`` is kept up to date only while ``limit`` is set (it is computed by a
    walk when a limit is set, then moved by each change's size delta).
    """

    __slots__ = ("limit", "used")

    def __init__(self) -> None:
        self.limit: int | None = None
        self.used = 0

    def __repr__(self) -> str:
        return f"<Quota {self.used}/{self.limit}>"

    def room(self) -> int:
        """Bytes the branch may still grow by (only meaningful while ``limit`` is set)."""
        assert self.limit is not None
        return self.limit - self.used

    def check(self, grow: int) -> None:
        """Raise ``EDQUOT`` if growing by ``grow`` bytes would pass the limit."""
        if grow > 0 and self.limit is not None and self.used + grow > self.limit:
            raise OSError(errno.EDQUOT, "the branch's disk limit is reached")

    def charge(self, delta: int) -> None:
        """The layers now hold ``delta`` bytes more (or fewer)."""
        if self.limit is not None:
            self.used += delta


def cost(st: os.stat_result) -> int:
    """What an entry costs towards a disk limit (see the module docstring)."""
    if stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
        return st.st_size
    return 0


# -- sparse copy-up ---------------------------------------------------------------------------


class Layer:
    """One sparse tree plus its whiteouts and opaque directories (see the module docstring)."""

    def __init__(self, lid: str, directory: str) -> None:
        self.id = lid
        self.dir = directory
        self.tree = os.path.join(directory, "tree")
        self.whiteouts: dict[str, set[str]] = {}  # directory path -> names deleted in it
        self.opaque: set[str] = set()
        self.dirty = False  # written since it was made (a clean top can be shared by a fork)
        self.sparse: dict[str, Sparse] = {}  # path -> record of a file copied up sparse
        self._log_fd: int | None = None
        self._sparse_fd: int | None = None

    def __repr__(self) -> str:
        return f"<Layer {self.id}>"

    # -- persistence ---------------------------------------------------------

    @classmethod
    def create(cls, lid: str, directory: str, root_like: os.stat_result | None) -> Layer:
        """A new empty layer whose root directory copies ``root_like``'s metadata."""
        os.makedirs(directory)
        layer = cls(lid, directory)
        os.mkdir(layer.tree, 0o700)
        if root_like is not None:
            copy_metadata(None, layer.tree, root_like)
        return layer

    @classmethod
    def load(cls, lid: str, directory: str) -> Layer:
        layer = cls(lid, directory)
        if not os.path.isdir(layer.tree):
            raise FileNotFoundError(errno.ENOENT, "layer tree missing", layer.tree)
        layer.dirty = True  # unknown: never shared as if clean
        try:
            with open(os.path.join(directory, "meta.log"), "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            raw = b""
        for line in raw.splitlines():
            try:
                op, path = json.loads(line)
            except ValueError:
                continue  # a torn last line after a crash: the op before it stands
            layer._apply(str(op), str(path))
        try:
            with open(os.path.join(directory, "sparse.log"), "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            raw = b""
        for line in raw.splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            layer._apply_sparse(rec)
        return layer

    def _apply_sparse(self, rec: list[object]) -> None:
        op, path = str(rec[0]), str(rec[1])
        if op == "s":
            lid, lower_path, lower_real, limit = rec[2:6]
            self.sparse[path] = Sparse(self, path, None if lid is None else str(lid),
                                       str(lower_path), str(lower_real), int(limit))  # type: ignore[call-overload]
            return
        if op == "d":  # removed (with everything below)
            for p in [p for p in self.sparse if _under(p, path)]:
                self.sparse.pop(p).close()
            return
        sp = self.sparse.get(path)
        if sp is None:
            return
        if op == "c":
            sp.present.update(int(c) for c in rec[2])  # type: ignore[attr-defined]
        elif op == "t":
            sp.limit = min(sp.limit, int(rec[2]))  # type: ignore[call-overload]
        elif op == "m":
            sp.done = True
            self.sparse.pop(path).close()

    def log_sparse(self, rec: list[object]) -> None:
        """Append one sparse-record change to ``sparse.log`` (and apply the structural ones)."""
        self.dirty = True
        if rec[0] == "d":
            self._apply_sparse(rec)
        if self._sparse_fd is None:
            self._sparse_fd = os.open(os.path.join(self.dir, "sparse.log"),
                                      os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                                      0o600)
        os.write(self._sparse_fd, json.dumps(rec).encode() + b"\n")

    def drop_missing(self) -> None:
        """After a crash: forget records whose file is gone (an unlink before its log line)
        and lower limits to the file's size (a truncate before its log line)."""
        for p in list(self.sparse):
            try:
                st = os.lstat(self.real(p))
            except OSError:
                st = None
            if st is None or not stat.S_ISREG(st.st_mode):
                self.sparse.pop(p).close()
            elif st.st_size < self.sparse[p].limit:
                self.sparse[p].limit = st.st_size

    def sparse_under(self, path: str) -> list[Sparse]:
        return [sp for p, sp in self.sparse.items() if _under(p, path)]

    def fill_under(self, path: str) -> None:
        """Make every sparse file at or below ``path`` whole (see :meth:`Sparse.fill`)."""
        for sp in self.sparse_under(path):
            sp.fill()

    def forget_sparse(self, path: str) -> None:
        """The file (or tree) at ``path`` was removed from this layer."""
        if any(_under(p, path) for p in self.sparse):
            self.log_sparse(["d", path])

    def _apply(self, op: str, path: str) -> None:
        d, n = split(path)
        if op == "w":
            self.whiteouts.setdefault(d, set()).add(n)
        elif op == "W":
            names = self.whiteouts.get(d)
            if names is not None:
                names.discard(n)
                if not names:
                    del self.whiteouts[d]
        elif op == "o":
            self.opaque.add(path)
        elif op == "O":
            self.opaque.discard(path)
        elif op == "U":  # drop everything strictly below path
            self._drop_under(path)

    def _log(self, op: str, path: str) -> None:
        self.dirty = True
        self._apply(op, path)
        if self._log_fd is None:
            self._log_fd = os.open(os.path.join(self.dir, "meta.log"),
                                   os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.write(self._log_fd, json.dumps([op, path]).encode() + b"\n")

    def close(self) -> None:
        if self._log_fd is not None:
            os.close(self._log_fd)
            self._log_fd = None
        if self._sparse_fd is not None:
            os.close(self._sparse_fd)
            self._sparse_fd = None

    def release(self) -> None:
        """Close everything, also the files below that sparse records hold open."""
        self.close()
        for sp in self.sparse.values():
            sp.close()

    def compact(self) -> None:
        """Rewrite the logs as the current state (done when the layer is frozen)."""
        self.close()
        sparse_path = os.path.join(self.dir, "sparse.log")
        recs = []
        for sp in self.sparse.values():
            recs.append(json.dumps(["s", sp.path, sp.lower_lid, sp.lower_path, sp.lower_real,
                                    sp.limit]))
            if sp.present:
                recs.append(json.dumps(["c", sp.path, sorted(sp.present)]))
        if recs:
            with open(sparse_path + ".tmp", "w") as f:
                f.write("\n".join(recs) + "\n")
            os.replace(sparse_path + ".tmp", sparse_path)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(sparse_path)
        lines = [json.dumps(["w", join(d, n)]) for d, names in self.whiteouts.items()
                 for n in sorted(names)]
        lines += [json.dumps(["o", p]) for p in sorted(self.opaque)]
        log_path = os.path.join(self.dir, "meta.log")
        if not lines:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(log_path)
            return
        tmp = log_path + ".tmp"
        with open(tmp, "w") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(tmp, log_path)

    # -- whiteouts and opaque directories -------------------------------------

    def is_whiteout(self, parent: str, name: str) -> bool:
        names = self.whiteouts.get(parent)
        return names is not None and name in names

    def whiteouts_in(self, parent: str) -> set[str]:
        return self.whiteouts.get(parent, set())

    def add_whiteout(self, path: str) -> None:
        self._log("w", path)

    def remove_whiteout(self, path: str) -> None:
        if self.is_whiteout(*split(path)):
            self._log("W", path)

    def set_opaque(self, path: str) -> None:
        if path not in self.opaque:
            self._log("o", path)

    def clear_opaque(self, path: str) -> None:
        if path in self.opaque:
            self._log("O", path)

    def drop_under(self, path: str) -> None:
        """Forget whiteouts and opaque marks strictly below ``path``."""
        prefix = path + "/" if path else ""
        if any(d == path or d.startswith(prefix) for d in self.whiteouts) or any(
            p.startswith(prefix) for p in self.opaque
        ):
            self._log("U", path)

    def _drop_under(self, path: str) -> None:
        prefix = path + "/" if path else ""
        for d in [d for d in self.whiteouts if d == path or d.startswith(prefix)]:
            del self.whiteouts[d]
        self.opaque = {p for p in self.opaque if not p.startswith(prefix) or p == path}

    def real(self, path: str) -> str:
        return os.path.join(self.tree, path) if path else self.tree


# -- views -----------------------------------------------------------------------------------

#: Where a directory exists: (layer, its real path); layer None is the base.
Source = tuple[Layer | None, str]


@attrs.define
class Found:
    """A visible entry of a view: the topmost layer holding it, and its stat."""

    path: str
    layer: Layer | None
    real: str
    st: os.stat_result
    dirs: list[Source] | None  # for a directory: its sources (merged, top first)

    @property
    def is_dir(self) -> bool:
        return self.dirs is not None


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


class View:
    """A branch's stack of layers (top first) over the base directory ``base``."""

    def __init__(self, layers: list[Layer], base: str, quota: Quota | None = None) -> None:
        self.layers = layers
        self.base = base
        self.quota = quota  # charged by copy_up (the filesystem's views; a commit's are not)

    @property
    def top(self) -> Layer:
        return self.layers[0]

    def lower(self) -> View:
        """The same view without its top layer."""
        return View(self.layers[1:], self.base)

    def root_sources(self) -> list[Source]:
        out: list[Source] = [(layer, layer.tree) for layer in self.layers]
        out.append((None, self.base))
        return out

    def root(self) -> Found:
        src = self.root_sources()
        layer, real = src[0]
        return Found("", layer, real, os.lstat(real), src)

    def lookup(self, parent: str, sources: list[Source], name: str) -> Found | None:
        """The entry ``name`` in directory ``parent`` whose sources are ``sources``."""
        path = join(parent, name)
        found: Found | None = None
        for layer, realdir in sources:
            if layer is not None and layer.is_whiteout(parent, name):
                break
            real = os.path.join(realdir, name)
            st = _lstat(real)
            if st is None:
                continue
            if stat.S_ISDIR(st.st_mode):
                if found is None:
                    found = Found(path, layer, real, st, [])
                elif found.dirs is None:
                    break
                assert found.dirs is not None
                found.dirs.append((layer, real))
                if layer is not None and path in layer.opaque:
                    break
            else:
                if found is None:
                    found = Found(path, layer, real, st, None)
                break
        return found

    def resolve(self, path: str) -> Found | None:
        """The entry at ``path`` (``""``: the root), or None."""
        cur = self.root()
        if not path:
            return cur
        for name in path.split("/"):
            if cur.dirs is None:
                return None
            nxt = self.lookup(cur.path, cur.dirs, name)
            if nxt is None:
                return None
            cur = nxt
        return cur

    def names(self, path: str, sources: list[Source]) -> list[str]:
        """Candidate names in a directory (``lookup`` decides which are visible)."""
        seen: dict[str, None] = {}
        for _layer, realdir in sources:
            try:
                entries = os.listdir(realdir)
            except (FileNotFoundError, NotADirectoryError):
                continue
            for n in entries:
                seen.setdefault(n, None)
        return list(seen)

    def listdir(self, path: str, sources: list[Source]) -> list[Found]:
        """The visible entries of a directory, sorted by name."""
        out = []
        for n in sorted(self.names(path, sources)):
            f = self.lookup(path, sources, n)
            if f is not None:
                out.append(f)
        return out

    def walk(self) -> Iterator[Found]:
        """Every visible entry below the root (parents before children)."""
        stack = [self.root()]
        while stack:
            d = stack.pop()
            assert d.dirs is not None
            for f in self.listdir(d.path, d.dirs):
                yield f
                if f.dirs is not None:
                    stack.append(f)

    # -- writing into the top layer -----------------------------------------------------

    def ensure_dir(self, path: str) -> str:
        """The top layer's copy of visible directory ``path``, made (copied up) if needed."""
        top = self.top
        real = top.real(path)
        if not path:
            return real
        st = _lstat(real)
        if st is not None and stat.S_ISDIR(st.st_mode):
            return real
        found = self.resolve(path)
        if found is None or not found.is_dir:
            raise FileNotFoundError(errno.ENOENT, "no such directory in the branch", path)
        self.ensure_dir(parent_of(path))
        os.mkdir(real, 0o700)
        copy_metadata(found.real, real, found.st)
        top.dirty = True
        return real

    def copy_up(self, found: Found, *, size: int | None = None) -> str:
        """Make the top layer hold non-directory ``found``; return its real path there.

        ``size`` (files): keep only that many bytes (``0``: copy no data at all).
        """
        top = self.top
        if found.layer is top:
            return found.real
        st = found.st
        q = self.quota
        if q is not None and q.limit is not None:
            grow = cost(st) if size is None or not stat.S_ISREG(st.st_mode) else size
            q.check(grow)
        else:
            grow = 0
        self.ensure_dir(parent_of(found.path))
        dst = top.real(found.path)
        if stat.S_ISREG(st.st_mode):
            below = found.layer.sparse.get(found.path) if found.layer is not None else None
            limit = st.st_size if size is None else min(size, st.st_size)
            if limit >= SPARSE_MIN:
                self._sparse_copy_up(found, dst, limit, st.st_size if size is None else size,
                                     below)
            else:
                if below is not None:
                    below.fill()
                copy_data(found.real, dst, size)
        elif stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(found.real), dst)
        elif stat.S_ISFIFO(st.st_mode):
            os.mkfifo(dst, 0o600)
        else:
            os.mknod(dst, st.st_mode, st.st_rdev)
        copy_metadata(found.real, dst, st, keep_mtime=size is None)
        top.dirty = True
        if q is not None:
            q.charge(grow)
        found.layer, found.real = top, dst
        found.st = os.lstat(dst)
        return dst

    def _sparse_copy_up(self, found: Found, dst: str, limit: int, size: int,
                        below: Sparse | None) -> None:
        top = self.top
        lid = found.layer.id if found.layer is not None else None
        # Logged before the file exists: a record whose file is missing is dropped on load,
        # while a file without its record would read zeros where the data below is.
        top.log_sparse(["s", found.path, lid, found.path, found.real, limit])
        sp = Sparse(top, found.path, lid, found.path, found.real, limit)
        sp.lower = below
        try:
            fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(fd, size)
            finally:
                os.close(fd)
            sp._lower_fd()  # hold what is below now, whatever replaces it later
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(dst)
            top.log_sparse(["d", found.path])
            sp.close()
            raise
        top.sparse[found.path] = sp

    def lower_has(self, path: str) -> bool:
        """Whether the layers below the top (or the base) show something at ``path``."""
        return self.lower().resolve(path) is not None

    def remove(self, found: Found) -> None:
        """Delete visible ``found`` (a directory with everything below it) from the view."""
        top = self.top
        path = found.path
        if found.layer is top:  # (a directory copied up is found in the top layer first)
            if found.is_dir:
                rmtree(found.real)
            else:
                os.unlink(found.real)
            top.forget_sparse(path)
        if found.is_dir:
            top.drop_under(path)
            top.clear_opaque(path)
        top.dirty = True
        if self.lower_has(path):
            self.ensure_dir(parent_of(path))  # a whiteout lives in a directory of its layer
            top.add_whiteout(path)

    def prepare_new(self, path: str) -> str:
        """Get the top layer ready for a new entry at ``path`` (not visible now)."""
        self.ensure_dir(parent_of(path))
        self.top.remove_whiteout(path)
        self.top.dirty = True
        return self.top.real(path)

    def materialize(self, found: Found) -> str:
        """Make directory ``found`` and all below it live in the top layer, marked opaque."""
        top = self.top
        assert found.dirs is not None
        if not (len(found.dirs) == 1 and found.dirs[0][0] is top):
            real = self.ensure_dir(found.path)
            for child in self.listdir(found.path, found.dirs):
                if child.is_dir:
                    self.materialize(child)
                elif child.layer is not top:
                    self.copy_up(child)
            found.dirs = [(top, real)]
            found.layer, found.real = top, real
        top.drop_under(found.path)
        top.set_opaque(found.path)
        return found.real


# -- file helpers ------------------------------------------------------------------------------


def sparse_of(f: Found) -> Sparse | None:
    """``f``'s sparse record, if its real file does not hold all of its content."""
    sp = f.layer.sparse.get(f.path) if f.layer is not None else None
    return None if sp is None or sp.done else sp


def whole_file(f: Found) -> bool:
    """Make ``f``'s real file hold its whole content (fill a sparse copy); True if it did."""
    sp = f.layer.sparse.get(f.path) if f.layer is not None else None
    if sp is None or sp.done:
        return False
    sp.fill()
    return True


def rmtree(path: str) -> None:
    """Remove a tree (or a file), also below directories without write permission."""
    _journal.remove_tree(path)
