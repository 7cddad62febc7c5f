"""The Branch protocol, its states, and the rules every backend shares.

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

import enum
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import attrs

from .exceptions import InvalidBranchName, PathEscapeError

if TYPE_CHECKING:
    from contextlib import AbstractAsyncContextManager

    from ._limits import Limits
    from ._sandbox._run import RunResult

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


@runtime_checkable
class Branch(Protocol):
    """An isolated, copy-on-write view of a workspace (or of another branch).

    ``path`` is a real directory any process can use. Every method raises
    ``BranchClosed`` once the branch is no longer OPEN.
    """

    @property
    def name(self) -> str: ...

    @property
    def path(self) -> Path: ...

    @property
    def parent(self) -> Branch | None: ...

    @property
    def state(self) -> BranchState: ...

    @property
    def depth(self) -> int: ...

    async def fork(self, name: str | None = None, *,
                   disk_limit: int | str | None = None) -> Branch: ...

    def branch(self, name: str | None = None) -> AbstractAsyncContextManager[Branch]: ...

    async def commit(self) -> None: ...

    async def abort(self) -> None: ...

    async def changes(self) -> list[Change]: ...

    async def diff(self) -> str: ...

    async def usage(self) -> Usage: ...

    def resolve(self, path: str | os.PathLike[str]) -> Path: ...

    async def run(
        self,
        argv: Sequence[str],
        *,
        limits: Limits | None = None,
        isolate: bool = True,
        env: Mapping[str, str] | None = None,
        stdin: bytes | None = None,
        timeout: float | None = None,
    ) -> RunResult: ...

    async def call(
        self,
        fn: Callable[..., Any],
        *args: Any,
        limits: Limits | None = None,
        isolate: bool = True,
        env: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> Any: ...

    async def pause(self) -> None: ...

    async def resume(self) -> None: ...


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


@runtime_checkable
class Backend(Protocol):
    """What a storage backend implements. The workspace owns the lifecycle rules.

    Names given to a backend are already validated; ``parent`` is ``None``
    for the workspace's base directory. A backend is opened once, used by
    one workspace, and closed once (closing twice is harmless).

    A backend may say how it enforces disk limits before any branch exists with
    a ``disk_limits`` attribute (``"fuse"``, or ``None``: it cannot); one
    without it is taken as unable to.
    """

    name: str

    async def open(self, root: Path, state_dir: Path) -> None:
        """Take over ``root``; recover unfinished commits; keep data of surviving branches."""

    async def create(self, name: str, parent: str | None) -> Path:
        """Make branch ``name`` as a snapshot of ``parent`` and return its directory."""

    async def commit(self, name: str, parent: str | None) -> list[Change]:
        """Merge ``name`` into ``parent`` atomically, then release ``name``'s storage.

        Raises ``ConflictError`` or ``CommitFailed`` and changes nothing on failure.
        """

    async def abort(self, name: str) -> None:
        """Release ``name``'s storage. Idempotent."""

    async def changes(self, name: str, parent: str | None) -> list[Change]:
        """What ``name`` changed since it was forked from ``parent``."""

    async def old_content(self, name: str, parent: str | None, path: str) -> bytes | None:
        """Content of file ``path`` as ``name`` saw it at the fork; None when not available."""

    async def usage(self, name: str) -> Usage:
        """What ``name``'s own copy-on-write storage holds (see :class:`Usage`)."""

    async def set_disk_limit(self, name: str, limit: int | None) -> str | None:
        """Cap the bytes ``name``'s own storage may hold (``None``: no cap).

        Returns how the cap is enforced (``"fuse"``: writes past it fail with
        ``EDQUOT``), or ``None`` when this backend cannot enforce one.
        """

    def path(self, name: str | None) -> Path:
        """The directory of branch ``name`` (the base for ``None``)."""

    def exists(self, name: str) -> bool:
        """Whether ``name``'s storage survives (used when reopening after a crash)."""

    async def aclose(self) -> None:
        """Release every resource. Idempotent."""
