"""The tree model: what a directory holds, as a dict, and the snapshot-isolation rules on it."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path

import attrs

FILE_MODES = (0o644, 0o600, 0o755)
DIR_MODES = (0o755, 0o700)




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
