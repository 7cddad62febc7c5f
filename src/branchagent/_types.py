"""The values the branch protocols speak: states, changes, usage."""

from __future__ import annotations

import enum

import attrs

__all__ = ["BranchState", "Change", "ChangeKind", "EntryType", "Usage"]


class BranchState(enum.Enum):
    """Where a branch is in its lifecycle."""

    OPEN = "open"
    COMMITTED = "committed"
    ABORTED = "aborted"
    INVALIDATED = "invalidated"


class ChangeKind(enum.Enum):
    """What happened to a path since the fork."""

    ADDED = "added"
    MODIFIED = "modified"
    DELETED = "deleted"


class EntryType(enum.Enum):
    """The type of a filesystem entry."""

    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"
    FIFO = "fifo"


@attrs.frozen(order=True)
class Change:
    """One changed path, relative to the branch root (POSIX separators).

    ``entry_type`` is the type after the change (before it, for a deletion);
    ``old_type`` the type before it (``None`` for an addition). ``metadata_only``
    is true when only mode or mtime changed, not content or type.
    """

    path: str
    kind: ChangeKind = attrs.field(order=lambda k: k.value)
    entry_type: EntryType = attrs.field(order=lambda k: k.value)
    old_type: EntryType | None = attrs.field(
        default=None, order=lambda k: "" if k is None else k.value
    )
    metadata_only: bool = False


@attrs.frozen(kw_only=True)
class Usage:
    """What a branch holds privately: its copy-on-write cost (see :meth:`Branch.usage`).

    ``bytes`` is the apparent size of the regular files (plus the target
    length of the symlinks) the branch's own copy-on-write storage holds: files
    it made, and files it changed in any way, at their whole size. ``files``
    counts those entries (files, symlinks, FIFOs; directories and deletions are
    not counted). ``disk_limit`` is the cap on ``bytes`` in force now (``None``:
    none), set by ``fork(disk_limit=...)``, the workspace's ``disk_limit``, or a
    running ``run(limits=Limits(disk=...))``. A fresh branch holds 0 bytes in 0 files.
    """

    bytes: int
    files: int
    disk_limit: int | None = None
