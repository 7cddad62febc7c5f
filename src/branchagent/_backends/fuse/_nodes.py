"""The FUSE filesystem's inode table: nodes, open handles, and hard links.

A node is a path of one branch as the kernel knows it: (branch, parent node,
name), so a rename moves a node and keeps its inode number, and numbers stay
stable for the life of a branch; a path deleted and made again gets a new
inode. Hard-linked files of a branch's top layer are one node under several
names (``aliases``), so the kernel sees one inode with ``st_nlink`` names.

:class:`NodeTable` holds the table and its bookkeeping; :class:`BranchFS`
(``._fs``) is built on it and resolves paths (``_found``).
"""

from __future__ import annotations

import errno
import os
import stat

import pyfuse3

from ._layers import Found, Quota, Source
from ._sparse import Sparse
from ._store import BranchRec, Store

__all__ = ["DirHandle", "Handle", "Node", "NodeTable"]


class Node:
    """A path of one branch as the kernel knows it."""

    __slots__ = ("aliases", "bid", "children", "detached", "handles", "ino", "kind", "lookups",
                 "name", "owed", "parent", "src", "src_epoch")

    def __init__(self, ino: int, bid: int, parent: Node | None, name: str, kind: int) -> None:
        self.ino = ino
        self.bid = bid
        self.parent = parent
        self.name = name
        self.kind = kind  # S_IFMT bits when it was looked up
        self.children: dict[str, Node] = {}
        self.lookups = 0
        self.handles: set[int] = set()
        self.detached = False
        self.src: list[Source] | None = None
        self.src_epoch = -1
        # Hard links: every (directory node, name) this node is known under; None while
        # it has one name (parent, name). The primary name is the one path() follows.
        self.aliases: set[tuple[Node, str]] | None = None
        # Removed from the top layer while open: its bytes count until the last close.
        self.owed = False

    def path(self) -> str:
        parts = []
        n: Node | None = self
        while n is not None and n.parent is not None:
            parts.append(n.name)
            n = n.parent
        return "/".join(reversed(parts))


class Handle:
    __slots__ = ("fd", "flags", "node", "quota", "real", "sparse")

    def __init__(self, fd: int, flags: int, node: Node, real: str,
                 sparse: Sparse | None, quota: Quota | None) -> None:
        self.fd = fd
        self.flags = flags
        self.node = node
        self.real = real
        self.sparse = sparse  # the file's sparse record, if it was copied up sparse
        self.quota = quota  # the branch's disk limit (writes are charged to it)

    @property
    def writable(self) -> bool:
        return (self.flags & os.O_ACCMODE) != os.O_RDONLY


class DirHandle:
    __slots__ = ("entries", "node")

    def __init__(self, node: Node | None) -> None:
        self.node = node  # None: the mount root
        self.entries: list[tuple[str, Found | None, int]] | None = None


class NodeTable:
    """The nodes of every branch, by inode, by branch and by hard-linked file."""

    store: Store
    nodes: dict[int, Node]
    by_branch: dict[int, dict[int, Node]]  # branch id -> its live nodes
    # Hard-linked files of a branch's top layer: (branch, layer, real inode) -> node,
    # so every name of one file is one inode to the kernel.
    links: dict[tuple[int, str, int], Node]
    roots: dict[int, Node]
    _next_ino: int

    def _found(self, node: Node, b: BranchRec) -> Found:
        """Where ``node`` lives now in ``b`` (ENOENT when it is gone): see ``BranchFS``."""
        raise NotImplementedError

    def _new_node(self, bid: int, parent: Node | None, name: str, kind: int) -> Node:
        node = Node(self._next_ino, bid, parent, name, kind)
        self._next_ino += 1
        self.nodes[node.ino] = node
        self.by_branch.setdefault(bid, {})[node.ino] = node
        if parent is not None:
            parent.children[name] = node
        return node

    def _drop_node(self, node: Node) -> None:
        if node.aliases is not None:
            for k in [k for k, v in self.links.items() if v is node]:
                del self.links[k]
        self.nodes.pop(node.ino, None)
        mine = self.by_branch.get(node.bid)
        if mine is not None:
            mine.pop(node.ino, None)
            if not mine:
                del self.by_branch[node.bid]

    def _root_of(self, b: BranchRec) -> Node:
        node = self.roots.get(b.id)
        if node is None:
            node = self._new_node(b.id, None, "", stat.S_IFDIR)
            self.roots[b.id] = node
        return node

    def _node(self, ino: int) -> Node:
        node = self.nodes.get(ino)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    def _child(self, parent: Node, f: Found) -> Node:
        name = f.path.rpartition("/")[2]
        kind = stat.S_IFMT(f.st.st_mode)
        node = parent.children.get(name)
        key = self._link_key(parent.bid, f)
        if key is not None:
            shared = self.links.get(key)
            if shared is not None and self._still_names(shared, f):
                if node is not None and node is not shared:
                    self._unname(node, parent, name)
                self._alias(shared, parent, name)
                return shared
            self.links.pop(key, None)
        if node is None or node.kind != kind:
            if node is not None:
                self._unname(node, parent, name)
            node = self._new_node(parent.bid, parent, name, kind)
        if key is not None:
            self.links[key] = node
            self._alias(node, parent, name)
        return node

    def _link_key(self, bid: int, f: Found) -> tuple[int, str, int] | None:
        """The key of a hard-linked regular file of branch ``bid``'s top layer, else None."""
        if f.layer is None or f.st.st_nlink < 2 or not stat.S_ISREG(f.st.st_mode):
            return None
        b = self.store.branches.get(bid)
        if b is None or f.layer is not b.layers[0]:
            return None
        return (bid, f.layer.id, f.st.st_ino)

    def _still_names(self, node: Node, f: Found) -> bool:
        """Whether ``node``'s primary name still is the file ``f`` is a name of."""
        if node.detached or node.ino not in self.nodes:
            return False
        b = self.store.branches.get(node.bid)
        try:
            cur = self._found(node, b) if b is not None else None
        except pyfuse3.FUSEError:
            return False
        return cur is not None and cur.layer is f.layer and cur.st.st_ino == f.st.st_ino

    def _alias(self, node: Node, parent: Node, name: str) -> None:
        if node.aliases is None:
            node.aliases = {(node.parent, node.name)} if node.parent is not None else set()
        node.aliases.add((parent, name))
        parent.children[name] = node

    def _unname(self, node: Node, parent: Node, name: str) -> None:
        """``name`` in ``parent`` no longer names ``node`` (unlinked, replaced, renamed over):
        a hard-linked node lives on under its other names, any other node is detached."""
        if node.aliases:
            node.aliases.discard((parent, name))
            if node.aliases:
                if parent.children.get(name) is node:
                    del parent.children[name]
                if node.parent is parent and node.name == name:
                    node.parent, node.name = next(iter(node.aliases))
                return
        if parent.children.get(name) is node and (node.parent is not parent
                                                  or node.name != name):
            del parent.children[name]
        self._detach(node)

    def _renamed(self, node: Node, old: tuple[Node, str], new: tuple[Node, str]) -> None:
        """``node``'s name ``old`` is now ``new`` (the name moved is its primary name now)."""
        if node.aliases is not None:
            node.aliases.discard(old)
            node.aliases.add(new)
        node.parent, node.name = new
        new[0].children[new[1]] = node

    def _detach(self, node: Node) -> None:
        if node.parent is not None and node.parent.children.get(node.name) is node:
            del node.parent.children[node.name]
        node.detached = True
        self._maybe_free(node)

    def _maybe_free(self, node: Node) -> None:
        if node.lookups <= 0 and not node.handles and not node.children and (
            node.detached or node.bid not in self.store.branches
        ):
            self._drop_node(node)
            if node.parent is not None and node.parent.children.get(node.name) is node:
                del node.parent.children[node.name]
                self._maybe_free(node.parent)

    def _find_node(self, bid: int, path: str) -> Node | None:
        node = self.roots.get(bid)
        if node is None or not path:
            return node
        for part in path.split("/"):
            node = node.children.get(part)
            if node is None:
                return None
        return node
