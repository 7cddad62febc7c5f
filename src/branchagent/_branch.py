"""The branch lifecycle and its rules: names, paths inside a branch.

The protocols (:class:`Branch`, :class:`Backend`) live in :mod:`._protocols` and
the values (:class:`BranchState`, :class:`Change`, ...) in :mod:`._types`; both
are re-exported here, where older code imports them from.

Lifecycle::

    OPEN ──commit()──> COMMITTED
      │ ──abort()───> ABORTED
      └ (a sibling or ancestor commits first, or the parent is aborted)
                      ─> INVALIDATED / ABORTED

Rules (enforced by the workspace, so every backend gets them):

- First commit wins: when a branch commits into its parent, its open
  siblings (and all their descendants) become INVALIDATED.
- Committing a branch that still has open children invalidates those
  children: the state they forked from has been merged and is gone.
- Aborting a branch aborts all its open descendants.
- Forking a branch that has open children is allowed (siblings coexist).
- Any operation on a branch that is not OPEN raises ``BranchClosed``
  (``BranchInvalidated`` when it lost to a sibling) and changes nothing.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from ._protocols import Backend, Branch
from ._types import BranchState, Change, ChangeKind, EntryType, Usage
from .exceptions import InvalidBranchName, PathEscapeError

__all__ = [
    "Backend",
    "Branch",
    "BranchState",
    "Change",
    "ChangeKind",
    "EntryType",
    "Usage",
    "check_branch_name",
    "resolve_inside",
]

MAX_NAME_BYTES = 255


def check_branch_name(name: object) -> str:
    """Return ``name`` if it is a valid branch name, else raise ``InvalidBranchName``.

    A valid name is a non-empty ``str``, a single path component of at most
    255 bytes (UTF-8), without ``/``, NUL, or a leading ``.`` or ``@``.
    """
    if not isinstance(name, str):
        raise InvalidBranchName(f"branch name must be a str, not {type(name).__name__}")
    if not name:
        raise InvalidBranchName("branch name must not be empty")
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidBranchName(f"branch name {name!r} is not valid UTF-8") from exc
    if len(encoded) > MAX_NAME_BYTES:
        raise InvalidBranchName(
            f"branch name is {len(encoded)} bytes; the limit is {MAX_NAME_BYTES}"
        )
    if "\x00" in name:
        raise InvalidBranchName(f"branch name {name!r} contains NUL")
    if "/" in name or "\\" in name:
        raise InvalidBranchName(f"branch name {name!r} contains a path separator")
    if name[0] in ".@":
        raise InvalidBranchName(f"branch name {name!r} must not start with '.' or '@'")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise InvalidBranchName(f"branch name {name!r} contains a control character")
    return name


def resolve_inside(root: Path, path: str | os.PathLike[str]) -> Path:
    """Resolve ``path`` (relative to ``root``, or absolute under it) inside ``root``.

    Symlinks are followed as the OS would; if the result is not ``root`` or
    below it, ``PathEscapeError`` is raised. The path need not exist.
    """
    raw = os.fspath(path)
    if "\x00" in raw:
        raise PathEscapeError(f"path {raw!r} contains NUL")
    root_real = Path(os.path.realpath(root))
    candidate = Path(raw)
    if not candidate.is_absolute():
        candidate = root / candidate
    resolved = Path(os.path.realpath(candidate))
    if resolved != root_real and root_real not in resolved.parents:
        raise PathEscapeError(f"path {raw!r} resolves to {resolved}, outside {root}")
    return resolved


def relative_posix(root: Path, path: Path) -> str:
    """``path`` relative to ``root`` as a POSIX string."""
    return PurePosixPath(*path.relative_to(root).parts).as_posix()
