"""Tree manifests: what a directory tree holds, compared by observable content.

A manifest maps a POSIX relative path to an :class:`Entry`. Two entries are
the *same* when a user could not tell them apart: same type, same mode
bits, and for files the same content and mtime, for symlinks the same
target. Directory mtimes are not compared: they change whenever an entry
inside changes, and comparing them would make every sibling edit a conflict.

Hashing every file on every scan would be slow, so :func:`scan` takes the
previous scan's :class:`HashCache`. A cached digest is reused only when the
file's (inode, size, mtime, ctime) are unchanged *and* its ctime is older
than the previous scan's start minus a safety margin: a later write must
then move ctime forward, whatever the timestamp granularity (the "racy
git" rule).
"""

from __future__ import annotations

import hashlib
import os
import stat
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import attrs

from ._branch import Change, ChangeKind, EntryType

__all__ = [
    "Entry",
    "HashCache",
    "Manifest",
    "changed_paths",
    "parent_of",
    "scan",
    "to_changes",
]

#: ctime must be this much older than a scan's start for the scan's digest to be trusted.
RACY_MARGIN_NS = 2_000_000_000
_CHUNK = 1 << 20


@attrs.frozen
class Entry:
    type: EntryType
    mode: int  # permission bits (st_mode & 0o7777)
    mtime_ns: int = 0  # files only; 0 otherwise
    size: int = 0
    digest: str = ""  # files: blake2b-128 of content
    target: str = ""  # symlinks: link target
    uid: int = -1
    gid: int = -1

    def same(self, other: Entry | None) -> bool:
        if other is None or other.type is not self.type:
            return False
        if self.type is EntryType.SYMLINK:
            return self.target == other.target
        if self.mode != other.mode:
            return False
        if self.type is EntryType.FILE:
            return self.digest == other.digest and self.mtime_ns == other.mtime_ns
        return True

    def equivalent(self, other: Entry | None) -> bool:
        """Same type, mode and content (or target); mtime ignored."""
        if other is None or other.type is not self.type:
            return False
        if self.type is EntryType.SYMLINK:
            return self.target == other.target
        return self.mode == other.mode and self.digest == other.digest

    def same_content(self, other: Entry | None) -> bool:
        if other is None or other.type is not self.type:
            return False
        return self.digest == other.digest and self.target == other.target

    def to_json(self) -> list[object]:
        return [self.type.value, self.mode, self.mtime_ns, self.size, self.digest, self.target,
                self.uid, self.gid]

    @classmethod
    def from_json(cls, raw: list[object]) -> Entry:
        t, mode, mtime_ns, size, digest, target, uid, gid = raw
        return cls(type=EntryType(t), mode=int(mode), mtime_ns=int(mtime_ns),  # type: ignore[call-overload]
                   size=int(size), digest=str(digest), target=str(target),  # type: ignore[call-overload]
                   uid=int(uid), gid=int(gid))  # type: ignore[call-overload]


Manifest = dict[str, Entry]
_StatKey = tuple[int, int, int, int]


@attrs.define
class HashCache:
    """Digests from one scan, keyed by path, valid while the stat key holds."""

    digests: dict[str, tuple[_StatKey, str]] = attrs.Factory(dict)
    trusted_before_ns: int = 0


def hash_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.blake2b(digest_size=16)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        while chunk := os.read(fd, _CHUNK):
            h.update(chunk)
    finally:
        os.close(fd)
    return h.hexdigest()


def _entry_type(mode: int) -> EntryType | None:
    if stat.S_ISREG(mode):
        return EntryType.FILE
    if stat.S_ISDIR(mode):
        return EntryType.DIR
    if stat.S_ISLNK(mode):
        return EntryType.SYMLINK
    if stat.S_ISFIFO(mode):
        return EntryType.FIFO
    return None


def scan(
    root: Path,
    cache: HashCache | None = None,
    *,
    skip: Iterable[str] = (),
) -> tuple[Manifest, HashCache]:
    """Walk ``root`` (not following symlinks) and return its manifest and a new cache.

    Sockets and device nodes are not tracked. ``skip`` names top-level
    entries to leave out.
    """
    started = time.time_ns()
    skipped = set(skip)
    old = cache.digests if cache is not None else {}
    trusted_before = cache.trusted_before_ns if cache is not None else 0
    out: Manifest = {}
    new_digests: dict[str, tuple[_StatKey, str]] = {}
    stack: list[tuple[str, str]] = [(os.fspath(root), "")]
    while stack:
        abs_dir, rel_dir = stack.pop()
        try:
            it = os.scandir(abs_dir)
        except FileNotFoundError:
            continue
        with it:
            for de in it:
                if not rel_dir and de.name in skipped:
                    continue
                rel = f"{rel_dir}/{de.name}" if rel_dir else de.name
                try:
                    st = de.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                et = _entry_type(st.st_mode)
                if et is None:
                    continue
                perm = stat.S_IMODE(st.st_mode)
                if et is EntryType.FILE:
                    key: _StatKey = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
                    hit = old.get(rel)
                    if hit is not None and hit[0] == key and key[3] < trusted_before:
                        digest = hit[1]
                    else:
                        try:
                            digest = hash_file(de.path)
                        except FileNotFoundError:
                            continue
                    new_digests[rel] = (key, digest)
                    out[rel] = Entry(EntryType.FILE, perm, st.st_mtime_ns, st.st_size, digest,
                                     uid=st.st_uid, gid=st.st_gid)
                elif et is EntryType.DIR:
                    out[rel] = Entry(EntryType.DIR, perm, uid=st.st_uid, gid=st.st_gid)
                    stack.append((de.path, rel))
                elif et is EntryType.SYMLINK:
                    try:
                        target = os.readlink(de.path)
                    except FileNotFoundError:
                        continue
                    out[rel] = Entry(EntryType.SYMLINK, 0o777, target=target,
                                     uid=st.st_uid, gid=st.st_gid)
                else:
                    out[rel] = Entry(et, perm, uid=st.st_uid, gid=st.st_gid)
    return out, HashCache(new_digests, started - RACY_MARGIN_NS)


def changed_paths(
    before: Mapping[str, Entry], after: Mapping[str, Entry], *, strict: bool = True
) -> set[str]:
    """Paths whose entry differs: added, deleted, or changed.

    ``strict`` counts a file whose only change is its mtime (a touch, or a
    rewrite with identical bytes); otherwise only type, mode and content count.
    """
    if strict:
        out = {p for p, e in after.items() if not e.same(before.get(p))}
    else:
        out = {p for p, e in after.items() if not e.equivalent(before.get(p))}
    out.update(p for p in before if p not in after)
    return out


def parent_of(path: str) -> str:
    return path.rpartition("/")[0]


def to_changes(before: Mapping[str, Entry], after: Mapping[str, Entry]) -> list[Change]:
    """The changes that turn ``before`` into ``after``, sorted by path."""
    out: list[Change] = []
    for p in sorted(changed_paths(before, after)):
        old, new = before.get(p), after.get(p)
        if old is None:
            assert new is not None
            out.append(Change(p, ChangeKind.ADDED, new.type))
        elif new is None:
            out.append(Change(p, ChangeKind.DELETED, old.type, old.type))
        else:
            out.append(Change(p, ChangeKind.MODIFIED, new.type, old.type,
                              metadata_only=new.same_content(old)))
    return out
