"""The pyfuse3 request handlers: every branch of a workspace under one mount.

The mount root lists one directory ``@<id>`` per open branch (an id, not the
branch name: a 255-byte name does not fit in ``@<name>``). Inodes are
per-branch paths, kept by the node table (``._nodes``).

Every handler is synchronous underneath (no await between reading and
changing state), so the single-threaded server applies each request whole.
Only ``FUSEError`` leaves a handler, with the errno of the OS call that
failed or the one POSIX prescribes; EIO only for a bug, and it is logged.

Kernel caching is on (entry and attribute timeouts of a minute; page cache
kept across opens for files below a branch's top layer, which never change
in place). What changes behind the kernel's back is invalidated explicitly:
the paths a nested commit writes into the parent, the ``@<id>`` entry of a
branch that is gone, and paths written into the base from outside (seen by
inotify, for the top-level branches that show the base). Invalidations run
in a worker thread (the kernel may wait for a request this thread has to
answer) and are complete before the control request that caused them is
answered.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import functools
import logging
import os
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from typing import Any

import pyfuse3
import trio

from ._layers import Found, Layer, Quota, Source, View, cost, join, parent_of, whole_file
from ._nodes import DirHandle, Handle, Node, NodeTable
from ._sparse import Sparse
from ._store import BranchRec, Store

__all__ = ["BranchFS"]

log = logging.getLogger("branchagent.fuse")

ENTRY_TIMEOUT = 60.0
ATTR_TIMEOUT = 60.0
ROOT = pyfuse3.ROOT_INODE
_AS_ROOT = os.geteuid() == 0
# A missing name inside a branch: the kernel caches the answer (inode 0) for as long as an
# entry. Names only appear behind its back by a nested commit or an outside write into the
# base, and both invalidate the name (``_known_or_forget``); at the mount root (``@<id>``,
# new with every fork) a missing name is a plain ENOENT, never cached.
_NEGATIVE = pyfuse3.EntryAttributes()
_NEGATIVE.st_ino = 0
_NEGATIVE.entry_timeout = ENTRY_TIMEOUT


def _attr_ino_offset() -> int | None:
    """Where, inside a ``pyfuse3.EntryAttributes``, the ``st_ino`` that stat() reports lives.

    pyfuse3 sets the FUSE node id and the reported inode number together, but the kernel
    keeps them apart: stat() shows ``attr.ino`` and requests name the node id. We report
    the real file's inode number where it is on the base's filesystem (see ``_ino_of``), so
    that tools which remember inode numbers (git's index above all) see the files they
    knew. The field is found by setting a marker through the property and looking for its
    second copy (the first is the node id, in ``fuse_entry_param.ino``; ``attr.st_ino``
    follows ``generation`` and ``st_dev``). When the layout is not the expected one, the
    answer is None and the node id is reported, as before.
    """
    a = pyfuse3.EntryAttributes()
    marker = 0x5EED_BA5E_0DD5_1DE5
    a.st_ino = marker
    words = (ctypes.c_uint64 * (type(a).__basicsize__ // 8)).from_address(id(a))
    hits = [i * 8 for i in range(len(words)) if words[i] == marker]
    if len(hits) != 2 or hits[1] - hits[0] != 24:
        return None
    a.st_mode = stat.S_IFREG | 0o640  # a field after st_ino moves; the two copies stay
    if [i * 8 for i in range(len(words)) if words[i] == marker] != hits:
        return None
    return hits[1]


_ATTR_INO = _attr_ino_offset()
# Reported inode numbers of files that are not on the base's filesystem (a state dir on
# another disk): the node id with this bit set, apart from any the base's filesystem uses.
_FOREIGN_INO = 1 << 62
_OPEN_DROP = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | getattr(os, "O_DIRECT", 0)
_RENAME_EXCHANGE = 2


def _err(code: int) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(code)


@contextlib.contextmanager
def _errors(op: str) -> Iterator[None]:
    """Let only FUSEError out of a handler, with the errno of the OS call that failed."""
    try:
        yield
    except pyfuse3.FUSEError:
        raise
    except OSError as exc:
        raise _err(exc.errno or errno.EIO) from None
    except Exception:
        log.exception("bug in FUSE handler %s", op)
        raise _err(errno.EIO) from None


def _invalidate(batch: list[tuple[int, bytes | None]]) -> None:
    for ino, name in batch:
        try:
            if name is None:
                pyfuse3.invalidate_inode(ino, attr_only=False)
            else:
                pyfuse3.invalidate_entry(ino, name)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.EBADF):
                log.warning("invalidation of %s %r failed: %s", ino, name, exc)


def _renameat2(src: str, dst: str, flags: int) -> None:
    libc = _libc()
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), src)


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


class BranchFS(NodeTable, pyfuse3.Operations):
    """pyfuse3 operations over a :class:`Store` (also its :class:`Hooks`)."""

    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self, store: Store) -> None:
        super().__init__()
        self.store = store
        self.base_dev = os.stat(store.root).st_dev
        self.nodes: dict[int, Node] = {}
        self.by_branch: dict[int, dict[int, Node]] = {}  # branch id -> its live nodes
        # Hard-linked files of a branch's top layer: (branch, layer, real inode) -> node,
        # so every name of one file is one inode to the kernel.
        self.links: dict[tuple[int, str, int], Node] = {}
        self.roots: dict[int, Node] = {}
        self.handles: dict[int, Handle] = {}
        self.dirs: dict[int, DirHandle] = {}
        self._next_ino = ROOT + 1
        self._next_fh = 1
        self._pending: list[tuple[int, bytes | None]] = []  # (inode, None) or (parent, name)
        self._busy: dict[int, trio.Event] = {}  # branch id -> set when its commit is over
        store.hooks = self
        store.watch.on_change = self.base_changed

    # -- branches busy in a commit ------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def busy(self, bids: Iterable[int]) -> AsyncIterator[None]:
        """Hold requests for branches ``bids`` (a commit of theirs runs in a worker thread)
        until the block ends; requests for every other branch go on being served."""
        events = {bid: trio.Event() for bid in bids if bid not in self._busy}
        self._busy.update(events)
        try:
            yield
        finally:
            for bid, ev in events.items():
                del self._busy[bid]
                ev.set()

    async def _gate(self, node: Node | None) -> None:
        while node is not None and (ev := self._busy.get(node.bid)) is not None:
            await ev.wait()

    async def _gate_ino(self, ino: int) -> None:
        if self._busy:
            await self._gate(self.nodes.get(ino))

    async def _gate_fh(self, fh: int) -> None:
        if self._busy:
            h = self.handles.get(fh)
            if h is not None:
                await self._gate(h.node)
            else:
                dh = self.dirs.get(fh)
                await self._gate(dh.node if dh is not None else None)

    # -- kernel cache invalidation ------------------------------------------------------------

    def _forget_entry(self, node: Node) -> None:
        """Have the kernel drop its entry for ``node`` and the attributes of its directory."""
        if node.parent is not None:
            self._pending.append((node.parent.ino, os.fsencode(node.name)))
            self._pending.append((node.parent.ino, None))

    async def flush_invalidations(self) -> None:
        """Apply the pending invalidations (in a worker thread: the kernel may wait on us)."""
        while self._pending:
            batch, self._pending = self._pending, []
            await trio.to_thread.run_sync(_invalidate, batch)

    def base_changed(self, paths: list[str]) -> None:
        """Paths written into the base from outside: top-level branches show them."""
        for b in self.store.branches.values():
            if b.parent is not None:
                continue
            for p in paths:
                node = self._known_or_forget(b.id, p)
                if node is None:
                    continue
                self._pending.append((node.ino, None))
                self._forget_entry(node)
            b.epoch += 1

    def _known_or_forget(self, bid: int, path: str) -> Node | None:
        """The node of ``path`` in branch ``bid`` when the kernel knows it. Otherwise the
        kernel may hold a negative entry for the first missing name on the way (lookups of
        missing names are cached): that entry, and its directory's attributes, are
        invalidated, and None is returned."""
        node = self.roots.get(bid)
        if node is None or not path:
            return node
        for part in path.split("/"):
            child = node.children.get(part)
            if child is None:
                self._pending.append((node.ino, os.fsencode(part)))
                self._pending.append((node.ino, None))
                return None
            node = child
        return node

    def _branch(self, node: Node) -> BranchRec:
        b = self.store.branches.get(node.bid)
        if b is None:
            raise _err(errno.ENOENT)
        return b

    def _view(self, b: BranchRec) -> View:
        """``b``'s view; its copy-ups are charged to (and refused by) ``b``'s disk limit."""
        return View(b.layers, self.store.root, b.quota)

    def _sources(self, node: Node, b: BranchRec) -> list[Source]:
        """Where directory ``node`` lives (cached until the branch's namespace changes)."""
        if node.src is not None and node.src_epoch == b.epoch:
            return node.src
        if node.parent is None:
            src = self._view(b).root_sources()
        else:
            f = self._found(node, b)
            if f.dirs is None:
                raise _err(errno.ENOTDIR)
            src = f.dirs
        node.src, node.src_epoch = src, b.epoch
        return src

    def _found(self, node: Node, b: BranchRec) -> Found:
        if node.detached:
            raise _err(errno.ENOENT)
        view = self._view(b)
        if node.parent is None:
            return view.root()
        psrc = self._sources(node.parent, b)
        f = view.lookup(node.parent.path(), psrc, node.name)
        if f is None or stat.S_IFMT(f.st.st_mode) != node.kind:
            raise _err(errno.ENOENT)
        return f

    def _dir(self, ino: int) -> tuple[Node, BranchRec, list[Source]]:
        """A directory of a branch (the mount root is refused with EPERM)."""
        if ino == ROOT:
            raise _err(errno.EPERM)
        node = self._node(ino)
        b = self._branch(node)
        if node.kind != stat.S_IFDIR:
            raise _err(errno.ENOTDIR)
        return node, b, self._sources(node, b)

    def _attr(self, ino: int, st: os.stat_result) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.generation = 0
        a.entry_timeout = ENTRY_TIMEOUT
        a.attr_timeout = ATTR_TIMEOUT
        a.st_mode = st.st_mode
        a.st_nlink = 1 if stat.S_ISDIR(st.st_mode) else st.st_nlink
        a.st_uid = st.st_uid
        a.st_gid = st.st_gid
        a.st_rdev = st.st_rdev
        a.st_size = st.st_size
        a.st_blksize = st.st_blksize
        a.st_blocks = st.st_blocks
        a.st_atime_ns = st.st_atime_ns
        a.st_mtime_ns = st.st_mtime_ns
        a.st_ctime_ns = st.st_ctime_ns
        if _ATTR_INO is not None and ino != ROOT:
            shown = st.st_ino if st.st_dev == self.base_dev else ino | _FOREIGN_INO
            ctypes.c_uint64.from_address(id(a) + _ATTR_INO).value = shown
        return a

    def _root_attr(self) -> pyfuse3.EntryAttributes:
        st = os.stat(self.store.dir)
        a = self._attr(ROOT, st)
        a.st_mode = stat.S_IFDIR | 0o755
        return a

    def _entry(self, node: Node, st: os.stat_result) -> pyfuse3.EntryAttributes:
        node.lookups += 1
        return self._attr(node.ino, st)

    def _owner(self, pf: Found, ctx: pyfuse3.RequestContext, real: str, *,
               is_dir: bool = False) -> None:
        """New entries belong to the caller (group from a setgid parent directory)."""
        gid = ctx.gid
        setgid = bool(pf.st.st_mode & stat.S_ISGID)
        if setgid:
            gid = pf.st.st_gid
        if _AS_ROOT and (ctx.uid, gid) != (os.geteuid(), os.getegid()):
            os.lchown(real, ctx.uid, gid)
        if is_dir and setgid:
            os.chmod(real, stat.S_IMODE(os.lstat(real).st_mode) | stat.S_ISGID)

    # -- hooks (from the store) ---------------------------------------------------------------

    def froze(self, b: BranchRec, old_top: Layer) -> None:
        """The branch's top layer is now shared: move its open writable files up, and give
        each name of its hard-linked files its own inode again (a write copies one name
        up, and the others must not follow it)."""
        for k in [k for k in self.links if k[0] == b.id and k[1] == old_top.id]:
            node = self.links.pop(k)
            for par, name in list(node.aliases or ()):
                if (par, name) != (node.parent, node.name):
                    if par.children.get(name) is node:
                        del par.children[name]
                    self._pending.append((par.ino, os.fsencode(name)))
            node.aliases = None
        view = self.store.view(b)  # a fork is never refused: these copies are charged after
        prefix = old_top.tree + "/"
        copied: dict[str, str] = {}
        for h in list(self.handles.values()):
            if h.node.bid != b.id or not h.writable or h.node.detached:
                continue
            path = h.node.path()
            old_real = old_top.real(path)
            if not old_real.startswith(prefix):
                continue
            try:
                if not os.path.samestat(os.fstat(h.fd), os.lstat(old_real)):
                    continue
            except FileNotFoundError:
                continue
            new_real = copied.get(old_real)
            if new_real is None:
                st = os.lstat(old_real)
                new_real = view.copy_up(Found(path, old_top, old_real, st, None))
                copied[old_real] = new_real
                if b.quota.limit is not None:
                    b.quota.charge(cost(os.lstat(new_real)))
            fd = os.open(new_real, (h.flags & ~(_OPEN_DROP | os.O_TRUNC)) | os.O_NOFOLLOW
                         | os.O_CLOEXEC)
            os.close(h.fd)
            h.sparse = view.top.sparse.get(path)
            h.fd, h.real = fd, new_real

    def merged(self, b: BranchRec, paths: Iterable[str]) -> None:
        for p in paths:
            node = self._find_node(b.id, p)
            par = self._find_node(b.id, parent_of(p)) if p else None
            if node is not None and node.parent is not None and par is not None:
                name = p.rpartition("/")[2]
                self._pending.append((par.ino, os.fsencode(name)))
                self._pending.append((par.ino, None))
                self._pending.append((node.ino, None))  # (a hard link's other names live on)
                self._unname(node, par, name)
            elif node is None:
                self._known_or_forget(b.id, p)

    def held_open(self, b: BranchRec) -> int:
        """Bytes of ``b``'s files removed from its top layer while open (see ``Node.owed``)."""
        total = 0
        seen: set[int] = set()
        for h in self.handles.values():
            if h.node.owed and h.node.bid == b.id:
                st = os.fstat(h.fd)
                if st.st_nlink == 0 and st.st_ino not in seen:
                    seen.add(st.st_ino)
                    total += cost(st)
        return total

    def gone(self, bid: int) -> None:
        for k in [k for k in self.links if k[0] == bid]:
            del self.links[k]
        self._pending.append((ROOT, os.fsencode(f"@{bid}")))
        self.roots.pop(bid, None)
        for node in list(self.by_branch.get(bid, {}).values()):
            node.detached = True
            node.children.clear()
            if node.lookups <= 0 and not node.handles:
                self._drop_node(node)

    # -- lookup and attributes ------------------------------------------------------------------

    def _lookup(self, parent_inode: int, name: bytes,
               ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        n = os.fsdecode(name)
        if parent_inode == ROOT:
            if not n.startswith("@") or not (n[1:].isascii() and n[1:].isdigit()):
                raise _err(errno.ENOENT)
            b = self.store.branches.get(int(n[1:]))
            if b is None:
                raise _err(errno.ENOENT)
            node = self._root_of(b)
            return self._entry(node, self._view(b).root().st)
        node = self._node(parent_inode)
        b = self._branch(node)
        if node.kind != stat.S_IFDIR:
            raise _err(errno.ENOTDIR)
        f = self._view(b).lookup(node.path(), self._sources(node, b), n)
        if f is None:
            return _NEGATIVE
        return self._entry(self._child(node, f), f.st)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, count in inode_list:
            node = self.nodes.get(ino)
            if node is None:
                continue
            node.lookups -= count
            self._maybe_free(node)

    def _stat_node(self, node: Node) -> os.stat_result:
        if node.detached or node.bid not in self.store.branches:
            for fh in node.handles:
                return os.fstat(self.handles[fh].fd)
            raise _err(errno.ENOENT)
        return self._found(node, self._branch(node)).st

    def _getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if inode == ROOT:
            return self._root_attr()
        node = self._node(inode)
        return self._attr(inode, self._stat_node(node))

    def _setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                fh: int | None, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if inode == ROOT:
            raise _err(errno.EPERM)
        node = self._node(inode)
        target: str | int
        sp: Sparse | None = None  # told of a new size after the cut (see Sparse.truncated)
        q: Quota | None
        if node.detached or node.bid not in self.store.branches:
            if not node.handles:
                raise _err(errno.ENOENT)
            h = self.handles[next(iter(node.handles))]
            target = h.fd
            q = h.quota
            if h.sparse is not None and not h.sparse.done:
                sp = h.sparse
        else:
            b = self._branch(node)
            q = b.quota
            view = self._view(b)
            f = self._found(node, b)
            if f.is_dir:
                target = view.ensure_dir(f.path)
            else:
                size = attr.st_size if fields.update_size else None
                if f.layer is not view.top:
                    keep = size if size is not None and size < f.st.st_size else None
                    view.copy_up(f, size=keep)
                target = f.real
                sp = view.top.sparse.get(f.path)
            view.top.dirty = True
            b.epoch += 1
        if fields.update_size:
            grow = 0
            if q is not None and q.limit is not None:
                cur = os.fstat(target) if isinstance(target, int) else os.lstat(target)
                grow = attr.st_size - cur.st_size if stat.S_ISREG(cur.st_mode) else 0
                q.check(grow)
            if isinstance(target, int):
                os.ftruncate(target, attr.st_size)
            else:
                os.truncate(target, attr.st_size)
            if q is not None:
                q.charge(grow)
            if sp is not None:
                sp.truncated(attr.st_size)
        if fields.update_uid or fields.update_gid:
            uid = attr.st_uid if fields.update_uid else -1
            gid = attr.st_gid if fields.update_gid else -1
            if isinstance(target, int):
                os.fchown(target, uid, gid)
            else:
                os.lchown(target, uid, gid)
        if fields.update_mode:
            os.chmod(target, stat.S_IMODE(attr.st_mode))
        if fields.update_atime or fields.update_mtime:
            cur = os.fstat(target) if isinstance(target, int) else os.lstat(target)
            times = (attr.st_atime_ns if fields.update_atime else cur.st_atime_ns,
                     attr.st_mtime_ns if fields.update_mtime else cur.st_mtime_ns)
            if isinstance(target, int):
                os.utime(target, ns=times)
            else:
                os.utime(target, ns=times, follow_symlinks=False)
        st = os.fstat(target) if isinstance(target, int) else os.lstat(target)
        return self._attr(inode, st)

    def _readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self._node(inode)
        f = self._found(node, self._branch(node))
        if not stat.S_ISLNK(f.st.st_mode):
            raise _err(errno.EINVAL)
        return os.readlink(os.fsencode(f.real))

    # -- making entries ------------------------------------------------------------------------

    def _prepare(self, parent_inode: int, name: bytes) -> tuple[Node, BranchRec, View, str, Found]:
        """Checks for a new entry ``name``: returns (parent, branch, view, path, parent entry)."""
        node, b, src = self._dir(parent_inode)
        n = os.fsdecode(name)
        view = self._view(b)
        ppath = node.path()
        if view.lookup(ppath, src, n) is not None:
            raise _err(errno.EEXIST)
        pf = view.root() if node.parent is None else self._found(node, b)
        return node, b, view, join(ppath, n), pf

    def _made(self, node: Node, b: BranchRec, view: View, path: str
              ) -> tuple[Node, os.stat_result]:
        b.epoch += 1
        f = view.resolve(path)
        if f is None:  # pragma: no cover - we just made it
            raise _err(errno.EIO)
        return self._child(node, f), f.st

    def _mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
              ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        kind = stat.S_IFMT(mode)
        if kind not in (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK):
            raise _err(errno.EPERM)  # device nodes are not tracked by branches
        node, b, view, path, pf = self._prepare(parent_inode, name)
        real = view.prepare_new(path)
        if kind == stat.S_IFIFO:
            os.mkfifo(real, stat.S_IMODE(mode))
        else:
            os.mknod(real, mode, 0)
        self._owner(pf, ctx, real)
        child, st = self._made(node, b, view, path)
        return self._entry(child, st)

    def _mkdir(self, parent_inode: int, name: bytes, mode: int,
              ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node, b, view, path, pf = self._prepare(parent_inode, name)
        real = view.prepare_new(path)
        os.mkdir(real, stat.S_IMODE(mode))
        view.top.set_opaque(path)
        self._owner(pf, ctx, real, is_dir=True)
        child, st = self._made(node, b, view, path)
        return self._entry(child, st)

    def _symlink(self, parent_inode: int, name: bytes, target: bytes,
                ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node, b, view, path, pf = self._prepare(parent_inode, name)
        b.quota.check(len(target))
        real = view.prepare_new(path)
        os.symlink(target, os.fsencode(real))
        b.quota.charge(len(target))
        self._owner(pf, ctx, real)
        child, st = self._made(node, b, view, path)
        return self._entry(child, st)

    def _create(self, parent_inode: int, name: bytes, mode: int, flags: int,
               ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        node, b, view, path, pf = self._prepare(parent_inode, name)
        real = view.prepare_new(path)
        fd = os.open(real, (flags & ~_OPEN_DROP) | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                     | os.O_CLOEXEC, stat.S_IMODE(mode))
        try:
            self._owner(pf, ctx, real)
            child, st = self._made(node, b, view, path)
        except BaseException:
            os.close(fd)
            raise
        fh = self._add_handle(fd, flags, child, real, None, b.quota)
        return pyfuse3.FileInfo(fh=fh, keep_cache=False), self._entry(child, st)

    def _link(self, inode: int, new_parent_inode: int, new_name: bytes,
             ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        src = self._node(inode)
        if src.kind == stat.S_IFDIR:
            raise _err(errno.EPERM)
        node, b, view, path, _pf = self._prepare(new_parent_inode, new_name)
        if src.bid != b.id:
            raise _err(errno.EXDEV)
        f = self._found(src, b)
        real_src = view.copy_up(f)
        whole_file(f)  # two names for one file: a sparse record follows one path only
        real = view.prepare_new(path)
        os.link(real_src, real)
        st_src = os.lstat(real_src)
        if src.parent is not None and not src.detached:  # the new name is this same inode
            self.links[(b.id, view.top.id, st_src.st_ino)] = src
            self._alias(src, src.parent, src.name)
        child, st = self._made(node, b, view, path)
        return self._entry(child, st)

    # -- removing and renaming ------------------------------------------------------------------

    def _existing(self, parent_inode: int, name: bytes) -> tuple[Node, BranchRec, View, Found]:
        node, b, src = self._dir(parent_inode)
        view = self._view(b)
        f = view.lookup(node.path(), src, os.fsdecode(name))
        if f is None:
            raise _err(errno.ENOENT)
        return node, b, view, f

    def _gone(self, node: Node, b: BranchRec, name: str) -> None:
        b.epoch += 1
        child = node.children.get(name)
        if child is not None:
            self._unname(child, node, name)

    def _freed(self, parent: Node, name: str, f: Found, view: View) -> int:
        """Bytes removing non-directory ``f`` (``name`` in ``parent``) gives back to the
        branch's disk limit: none below the top layer, none while another name or an open
        handle keeps the file (then it is owed: given back at the last close)."""
        if f.layer is not view.top or f.is_dir:
            return 0
        if stat.S_ISREG(f.st.st_mode):
            if f.st.st_nlink > 1:
                return 0
            child = parent.children.get(name)
            if child is not None and child.handles:
                child.owed = True
                return 0
        return cost(f.st)

    def _unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        node, b, view, f = self._existing(parent_inode, name)
        if f.is_dir:
            raise _err(errno.EISDIR)
        freed = self._freed(node, os.fsdecode(name), f, view)
        view.remove(f)
        b.quota.charge(-freed)
        self._gone(node, b, os.fsdecode(name))

    def _rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        node, b, view, f = self._existing(parent_inode, name)
        if f.dirs is None:
            raise _err(errno.ENOTDIR)
        if view.listdir(f.path, f.dirs):
            raise _err(errno.ENOTEMPTY)
        view.remove(f)
        self._gone(node, b, os.fsdecode(name))

    def _rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
               name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        if parent_inode_old == ROOT or parent_inode_new == ROOT:
            raise _err(errno.EPERM)
        pold, b, view, f = self._existing(parent_inode_old, name_old)
        pnew, b2, src_new = self._dir(parent_inode_new)
        if b2.id != b.id:
            raise _err(errno.EXDEV)
        n_old, n_new = os.fsdecode(name_old), os.fsdecode(name_new)
        dpath = join(pnew.path(), n_new)
        spath = f.path
        if dpath == spath:
            return
        if dpath.startswith(spath + "/"):
            raise _err(errno.EINVAL)
        d = view.lookup(pnew.path(), src_new, n_new)
        if flags & pyfuse3.RENAME_NOREPLACE and d is not None:
            raise _err(errno.EEXIST)
        top = view.top
        if flags & _RENAME_EXCHANGE:
            if d is None:
                raise _err(errno.ENOENT)
            if spath.startswith(dpath + "/"):
                raise _err(errno.EINVAL)
            rs = view.materialize(f) if f.is_dir else view.copy_up(f)
            rd = view.materialize(d) if d.is_dir else view.copy_up(d)
            top.fill_under(spath)  # sparse records follow paths: moved files are made whole
            top.fill_under(dpath)
            _renameat2(rs, rd, _RENAME_EXCHANGE)
            if f.is_dir != d.is_dir:
                if f.is_dir:
                    top.clear_opaque(spath)
                    top.set_opaque(dpath)
                else:
                    top.clear_opaque(dpath)
                    top.set_opaque(spath)
            b.epoch += 1
            a, c = pold.children.pop(n_old, None), pnew.children.pop(n_new, None)
            if a is not None:
                self._renamed(a, (pold, n_old), (pnew, n_new))
            if c is not None:
                self._renamed(c, (pnew, n_new), (pold, n_old))
            return
        if d is not None:
            if f.is_dir and not d.is_dir:
                raise _err(errno.ENOTDIR)
            if not f.is_dir and d.is_dir:
                raise _err(errno.EISDIR)
            if d.dirs is not None and view.listdir(d.path, d.dirs):
                raise _err(errno.ENOTEMPTY)
            if not f.is_dir and os.path.samestat(f.st, d.st):
                return  # two names of one file: POSIX says do nothing
        rs = view.materialize(f) if f.is_dir else view.copy_up(f)
        top.fill_under(spath)  # sparse records follow paths: moved files are made whole
        view.ensure_dir(parent_of(dpath))
        if d is not None and d.is_dir:
            top.drop_under(dpath)
        top.remove_whiteout(dpath)
        freed = 0 if d is None else self._freed(pnew, n_new, d, view)
        os.rename(rs, top.real(dpath))
        b.quota.charge(-freed)
        top.forget_sparse(dpath)  # whatever was replaced there
        if f.is_dir:
            top.clear_opaque(spath)
            top.set_opaque(dpath)
        if view.lower_has(spath):
            top.add_whiteout(spath)
        top.dirty = True
        b.epoch += 1
        victim = pnew.children.get(n_new)
        if victim is not None:
            self._unname(victim, pnew, n_new)
        moved = pold.children.pop(n_old, None)
        if moved is not None:
            self._renamed(moved, (pold, n_old), (pnew, n_new))

    # -- files ------------------------------------------------------------------------------------

    def _add_handle(self, fd: int, flags: int, node: Node, real: str,
                    sparse: Sparse | None, quota: Quota) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = Handle(fd, flags, node, real, sparse, quota)
        node.handles.add(fh)
        return fh

    def _open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._node(inode)
        b = self._branch(node)
        f = self._found(node, b)
        if f.is_dir:
            raise _err(errno.EISDIR)
        view = self._view(b)
        write = (flags & os.O_ACCMODE) != os.O_RDONLY or bool(flags & os.O_TRUNC)
        cut = f.st.st_size if flags & os.O_TRUNC and f.layer is view.top else 0
        if write and f.layer is not view.top:
            view.copy_up(f, size=0 if flags & os.O_TRUNC else None)  # (charged: see Quota)
            b.epoch += 1
        sp = f.layer.sparse.get(f.path) if f.layer is not None else None
        fd = os.open(f.real, (flags & ~_OPEN_DROP) | os.O_NOFOLLOW | os.O_CLOEXEC)
        b.quota.charge(-cut)
        if sp is not None and flags & os.O_TRUNC and f.layer is view.top:
            sp.truncated(0)  # (after the cut: see Sparse.truncated)
            sp = None
        fh = self._add_handle(fd, flags, node, f.real, sp, b.quota)
        # Below the top layer a file never changes in place (a write copies it up, a merge
        # gives the path a new inode, outside writes into the base are invalidated).
        return pyfuse3.FileInfo(fh=fh, keep_cache=f.layer is not view.top)

    def _handle(self, fh: int) -> Handle:
        h = self.handles.get(fh)
        if h is None:
            raise _err(errno.EBADF)
        return h

    def _read(self, fh: int, off: int, size: int) -> bytes:
        h = self._handle(fh)
        if h.sparse is not None and not h.sparse.done:
            return h.sparse.read(h.fd, off, size)
        return os.pread(h.fd, size, off)

    def _write(self, fh: int, off: int, buf: bytes) -> int:
        h = self._handle(fh)
        q = h.quota
        if q is not None and q.limit is not None:
            return self._write_capped(h, q, off, buf)
        if h.sparse is not None and not h.sparse.done:
            return h.sparse.write(h.fd, off, buf)
        return os.pwrite(h.fd, buf, off)

    def _write_capped(self, h: Handle, q: Quota, off: int, buf: bytes) -> int:
        """A write under a disk limit: charged by how far it moves the end of the file
        (one fstat, never a walk). What would pass the limit is cut short, and a write
        of which nothing fits fails with EDQUOT (so the writer sees it at once)."""
        size = os.fstat(h.fd).st_size
        start = size if h.flags & os.O_APPEND else off  # (pwrite appends under O_APPEND)
        grow = start + len(buf) - size
        if grow > 0 and grow > q.room():
            keep = size + q.room() - start
            if keep <= 0:
                raise _err(errno.EDQUOT)
            buf = buf[:keep]
        if h.sparse is not None and not h.sparse.done:
            n = h.sparse.write(h.fd, off, buf)
        else:
            n = os.pwrite(h.fd, buf, off)
        if start + n > size:
            q.used += start + n - size
        return n

    def _release(self, fh: int) -> None:
        h = self.handles.pop(fh, None)
        if h is None:
            return
        h.node.handles.discard(fh)
        if h.node.owed and not h.node.handles:  # removed while open: its bytes go now
            h.node.owed = False
            st = os.fstat(h.fd)
            if st.st_nlink == 0 and h.quota is not None:
                h.quota.charge(-cost(st))
        os.close(h.fd)
        self._maybe_free(h.node)

    def _fsync(self, fh: int, datasync: bool) -> None:
        fd = self._handle(fh).fd
        if datasync:
            os.fdatasync(fd)
        else:
            os.fsync(fd)

    # -- directories --------------------------------------------------------------------------

    def _opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if inode == ROOT:
            dh = DirHandle(None)
        else:
            node, _b, _src = self._dir(inode)
            dh = DirHandle(node)
        fh = self._next_fh
        self._next_fh += 1
        self.dirs[fh] = dh
        return fh

    def _listing(self, dh: DirHandle) -> list[tuple[str, Found | None, int]]:
        if dh.node is None:
            return [(f"@{bid}", None, 0) for bid in sorted(self.store.branches)]
        node = dh.node
        b = self._branch(node)
        src = self._sources(node, b)
        return [(f.path.rpartition("/")[2], f, 0)
                for f in self._view(b).listdir(node.path(), src)]

    def _readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        dh = self.dirs.get(fh)
        if dh is None:
            raise _err(errno.EBADF)
        if dh.entries is None or start_id == 0:
            dh.entries = self._listing(dh)
        for i in range(start_id, len(dh.entries)):
            name, f, _ = dh.entries[i]
            if f is None:  # a branch directory in the mount root
                b = self.store.branches.get(int(name[1:]))
                if b is None:
                    continue
                node = self._root_of(b)
                st = self._view(b).root().st
            else:
                assert dh.node is not None
                node = self._child(dh.node, f)
                st = f.st
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self._attr(node.ino, st),
                                         i + 1):
                break
            node.lookups += 1

    def _releasedir(self, fh: int) -> None:
        self.dirs.pop(fh, None)

    def _fsyncdir(self, fh: int, datasync: bool) -> None:
        return None

    def _statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        sv = os.statvfs(self.store.layers_dir)
        out = pyfuse3.StatvfsData()
        out.f_bsize = sv.f_bsize
        out.f_frsize = sv.f_frsize
        out.f_blocks = sv.f_blocks
        out.f_bfree = sv.f_bfree
        out.f_bavail = sv.f_bavail
        out.f_files = sv.f_files
        out.f_ffree = sv.f_ffree
        out.f_favail = sv.f_favail
        out.f_namemax = sv.f_namemax
        return out

    # -- extended attributes ---------------------------------------------------------------------

    def _xattr_target(self, inode: int, *, write: bool) -> str:
        if inode == ROOT:
            raise _err(errno.EPERM if write else pyfuse3.ENOATTR)
        node = self._node(inode)
        b = self._branch(node)
        f = self._found(node, b)
        if not write:
            return f.real
        view = self._view(b)
        b.epoch += 1
        view.top.dirty = True
        return view.ensure_dir(f.path) if f.is_dir else view.copy_up(f)

    def _getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if inode == ROOT:
            raise _err(pyfuse3.ENOATTR)
        return os.getxattr(self._xattr_target(inode, write=False), name, follow_symlinks=False)

    def _listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        if inode == ROOT:
            return []
        real = self._xattr_target(inode, write=False)
        return [os.fsencode(n) for n in os.listxattr(real, follow_symlinks=False)]

    def _setxattr(self, inode: int, name: bytes, value: bytes,
                 ctx: pyfuse3.RequestContext) -> None:
        os.setxattr(self._xattr_target(inode, write=True), name, value, follow_symlinks=False)

    def _removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        os.removexattr(self._xattr_target(inode, write=True), name, follow_symlinks=False)

    # -- shutdown -------------------------------------------------------------------------------

    def close(self) -> None:
        for h in self.handles.values():
            try:
                os.close(h.fd)
            except OSError:
                pass
        self.handles.clear()


# -- the pyfuse3 entry points ------------------------------------------------------------------
#
# Each one waits while a commit holds its branch (by the inode or handle it names first),
# then runs the synchronous handler ``_<op>``, letting only FUSEError out. pyfuse3 calls them
# positionally; their signatures are pyfuse3.Operations'.

_BY_INODE = ("lookup", "getattr", "setattr", "readlink", "mknod", "mkdir", "symlink", "create",
             "link", "unlink", "rmdir", "rename", "open", "opendir", "getxattr", "listxattr",
             "setxattr", "removexattr")
_BY_HANDLE = ("read", "write", "release", "fsync", "readdir", "releasedir", "fsyncdir")
# ``flush`` (sent on every close()) is left to pyfuse3, which answers ENOSYS: the kernel then
# stops sending it. Writes reach the layer file before they are answered, so a close has
# nothing to flush, and every create-write-close saves one round trip.
_UNGATED = ("statfs",)


def _entry_point(op: str, handler: Callable[..., Any],
                 gate: Callable[[BranchFS, int], Awaitable[None]] | None
                 ) -> Callable[..., Awaitable[Any]]:
    async def entry(self: BranchFS, *args: Any) -> Any:
        if gate is not None:
            await gate(self, args[0])
        with _errors(op):
            return handler(self, *args)

    entry.__name__ = entry.__qualname__ = op
    entry.__doc__ = f"pyfuse3's ``{op}``: see ``BranchFS._{op}``."
    return entry


def _install_entry_points() -> None:
    for ops, gate in ((_BY_INODE, BranchFS._gate_ino), (_BY_HANDLE, BranchFS._gate_fh),
                      (_UNGATED, None)):
        for op in ops:
            setattr(BranchFS, op, _entry_point(op, getattr(BranchFS, f"_{op}"), gate))


_install_entry_points()
