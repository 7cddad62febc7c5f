"""Know what writes into the base from outside: inotify on every directory.

Two uses. A top-level fork's snapshot is the base manifest, and rescanning
the base at every fork would make a fork cost grow with the workspace: the
store rescans only when this watch saw a change since the last scan. And
top-level branches show the live base, so the filesystem invalidates the
kernel's cache for the paths that changed there.

Where inotify is not available (or out of watches), :meth:`BaseWatch.take_dirty`
always says True (correct, only slower) and the kernel cache of top-level
branches may show outside writes late (up to the cache timeout).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import struct
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["BaseWatch"]

log = logging.getLogger("branchagent.fuse")

_IN_ISDIR = 0x40000000
_IN_IGNORED = 0x00008000
_IN_Q_OVERFLOW = 0x00004000
_IN_CREATE = 0x00000100
_IN_MOVED_TO = 0x00000080
_MASK = (
    0x00000002  # IN_MODIFY
    | 0x00000004  # IN_ATTRIB
    # not IN_CLOSE_WRITE: the release of a FUSE handle on a file a commit has just moved
    # into the base comes late, and IN_MODIFY already says the content changed
    | 0x00000040  # IN_MOVED_FROM
    | _IN_MOVED_TO
    | _IN_CREATE
    | 0x00000200  # IN_DELETE
    | 0x00000400  # IN_DELETE_SELF
    | 0x00000800  # IN_MOVE_SELF
    | 0x01000000  # IN_ONLYDIR
    | 0x02000000  # IN_DONT_FOLLOW
)
_EVENT = struct.Struct("iIII")


class BaseWatch:
    """Watches every directory of a tree; reports changed paths (relative, POSIX)."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.fd = -1
        self.broken = False
        self.on_change: Callable[[list[str]], None] = lambda paths: None
        self._dirty = False
        self._changed: set[str] = set()  # paths named since the last take_*
        self._lost = False  # events were lost (queue overflow): anything may have changed
        self._wds: dict[int, str] = {}
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self._add: Any = getattr(libc, "inotify_add_watch", None)
        init = getattr(libc, "inotify_init1", None)
        if init is None or self._add is None:
            self.broken = True
            return
        fd = init(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            self._give_up(ctypes.get_errno())
            return
        self.fd = fd

    def _give_up(self, code: int) -> None:
        log.warning("inotify unavailable (%s): every top-level fork rescans the base, and "
                    "outside writes show in top-level branches after the cache timeout",
                    os.strerror(code))
        self.broken = True  # the descriptor stays open until close(): a task may wait on it

    def watch(self, dirs: Iterable[str]) -> None:
        """Watch the root and ``dirs`` (relative paths); call after a scan."""
        for rel in ("", *dirs):
            self._watch_one(rel)

    def _watch_one(self, rel: str) -> None:
        if self.broken:
            return
        path = os.path.join(self.root, rel) if rel else self.root
        wd = self._add(self.fd, os.fsencode(path), _MASK)
        if wd < 0:
            code = ctypes.get_errno()
            if code not in (errno.ENOENT, errno.ENOTDIR, errno.EACCES):
                self._give_up(code)
            return
        self._wds[wd] = rel

    def read(self) -> list[str]:
        """Consume the pending events; return the paths they name (also to ``on_change``)."""
        if self.broken:
            return []
        paths: list[str] = []
        while True:
            try:
                data = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                break
            if not data:
                break
            pos = 0
            while pos + _EVENT.size <= len(data):
                wd, mask, _cookie, length = _EVENT.unpack_from(data, pos)
                raw = data[pos + _EVENT.size: pos + _EVENT.size + length].rstrip(b"\0")
                pos += _EVENT.size + length
                if mask & _IN_Q_OVERFLOW:
                    paths.append("")  # lost events: everything may have changed
                    self._lost = True
                    continue
                base = self._wds.get(wd)
                if mask & _IN_IGNORED:
                    self._wds.pop(wd, None)
                    continue
                if base is None:
                    continue
                name = os.fsdecode(raw)
                rel = f"{base}/{name}" if base and name else (name or base)
                paths.append(rel)
                if mask & _IN_ISDIR and mask & (_IN_CREATE | _IN_MOVED_TO) and name:
                    self._watch_one(rel)  # a new directory: watch it too
        if paths:
            self._dirty = True
            self._changed.update(paths)
            self.on_change(paths)
        return paths

    def take_dirty(self) -> bool:
        """Whether the base changed since the last call (reads pending events first)."""
        return self.take_changes() != set()

    def take_changes(self) -> set[str] | None:
        """The paths written since the last call (reads pending events first); None when
        that is not known (events lost, or no inotify): then anything may have changed."""
        self.read()
        changed = None if self.broken or self._lost or "" in self._changed else self._changed
        self._dirty = self._lost = False
        self._changed = set()
        return changed

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1
