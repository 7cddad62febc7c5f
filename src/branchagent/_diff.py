"""Unified diffs of a branch's changes (git-style headers, binary files noted)."""

from __future__ import annotations

import difflib
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio.to_thread

from ._branch import Change, ChangeKind, EntryType

__all__ = ["render_diff"]

_BINARY_PROBE = 8000


def _is_binary(data: bytes) -> bool:
    if b"\x00" in data[:_BINARY_PROBE]:
        return True
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def _mode(path: Path) -> str:
    return f"{os.lstat(path).st_mode:o}"


def _read_new(root: Path, change: Change) -> bytes | None:
    p = root / change.path
    if change.entry_type is EntryType.SYMLINK:
        return os.readlink(p).encode()
    if change.entry_type is EntryType.FILE:
        return p.read_bytes()
    return None


async def render_diff(
    changes: list[Change],
    root: Path,
    old_content: Callable[[str], Awaitable[bytes | None]],
) -> str:
    """Render ``changes`` (new side under ``root``) as one unified diff text."""
    parts: list[str] = []
    for ch in changes:
        a, b = f"a/{ch.path}", f"b/{ch.path}"
        head = [f"diff --git {a} {b}"]
        if ch.entry_type is EntryType.DIR or ch.old_type is EntryType.DIR:
            if ch.kind is ChangeKind.ADDED:
                head.append("new directory")
            elif ch.kind is ChangeKind.DELETED:
                head.append("deleted directory")
            elif ch.old_type is ch.entry_type:
                head.append(f"mode changed to {_mode(root / ch.path)}")
            else:
                head.append(f"type changed from {ch.old_type.value if ch.old_type else '?'} "
                            f"to {ch.entry_type.value}")
            parts.append("\n".join(head) + "\n")
            continue
        new: bytes | None = None
        if ch.kind is not ChangeKind.DELETED:
            new = await anyio.to_thread.run_sync(_read_new, root, ch)
            if ch.kind is ChangeKind.ADDED:
                head.append(f"new file mode {_mode(root / ch.path)}")
            elif ch.metadata_only:
                head.append(f"metadata changed (mode now {_mode(root / ch.path)})")
                parts.append("\n".join(head) + "\n")
                continue
        else:
            head.append("deleted file")
        old: bytes | None = b""
        if ch.kind is not ChangeKind.ADDED:
            if ch.old_type is EntryType.SYMLINK or ch.old_type is EntryType.FILE:
                old = await old_content(ch.path)
            if old is None:
                head.append("(the content at the fork is no longer available: "
                            "the parent changed it since)")
        if new is None and ch.kind is not ChangeKind.DELETED:
            parts.append("\n".join(head) + "\n")
            continue
        old_b, new_b = old or b"", new or b""
        if _is_binary(old_b) or _is_binary(new_b):
            head.append(f"Binary files {a if ch.kind is not ChangeKind.ADDED else '/dev/null'} "
                        f"and {b if ch.kind is not ChangeKind.DELETED else '/dev/null'} differ")
            parts.append("\n".join(head) + "\n")
            continue
        body = difflib.unified_diff(
            old_b.decode().splitlines(keepends=True),
            new_b.decode().splitlines(keepends=True),
            fromfile="/dev/null" if ch.kind is ChangeKind.ADDED else a,
            tofile="/dev/null" if ch.kind is ChangeKind.DELETED else b,
        )
        text = "".join(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n"
                       for line in body)
        parts.append("\n".join(head) + "\n" + text)
    return "".join(parts)
