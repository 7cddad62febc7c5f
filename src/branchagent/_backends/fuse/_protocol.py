"""The control protocol between :class:`FuseBackend` and its filesystem process.

One JSON object per line over a Unix socket pair. The server speaks first
(``{"ready": true, "branches": {name: id}, ...}``); then each request
``{"id": n, "op": ..., ...}`` gets exactly one answer, ``{"id": n, "ok": value}``
or ``{"id": n, "err": {"type": ..., "message": ..., ...}}``. Error types are
names from :mod:`branchagent.exceptions` (a fixed list); anything else comes
back as :class:`BackendError` naming the original type.
"""

from __future__ import annotations

import errno
import json
from typing import Any

from ..._branch import Change, ChangeKind, EntryType
from ...exceptions import (
    BackendError,
    BranchAgentError,
    BranchExists,
    BranchNotFound,
    CommitFailed,
    ConflictError,
    PathEscapeError,
    WorkspaceCorrupt,
)

__all__ = ["change_from_json", "change_to_json", "encode", "error_from_json", "error_to_json"]

_SIMPLE: dict[str, type[BranchAgentError]] = {
    "BranchExists": BranchExists,
    "BranchNotFound": BranchNotFound,
    "WorkspaceCorrupt": WorkspaceCorrupt,
    "PathEscapeError": PathEscapeError,
    "BackendError": BackendError,
}


def encode(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def error_to_json(exc: BaseException) -> dict[str, Any]:
    out: dict[str, Any] = {"type": type(exc).__name__, "message": str(exc)}
    if isinstance(exc, ConflictError):
        out["paths"] = list(exc.paths)
    elif isinstance(exc, OSError):
        out["errno"] = exc.errno
        out["strerror"] = exc.strerror
        out["filename"] = None if exc.filename is None else str(exc.filename)
    return out


def error_from_json(raw: dict[str, Any]) -> BranchAgentError:
    kind = str(raw.get("type", "BackendError"))
    message = str(raw.get("message", ""))
    if kind == "ConflictError":
        return ConflictError(message, tuple(str(p) for p in raw.get("paths", ())))
    if kind == "CommitFailed":
        return CommitFailed(int(raw.get("errno") or errno.EIO), str(raw.get("strerror") or message),
                            raw.get("filename"))
    cls = _SIMPLE.get(kind)
    if cls is not None:
        return cls(message)
    return BackendError(f"FUSE server: {kind}: {message}")


def change_to_json(c: Change) -> dict[str, Any]:
    return {"path": c.path, "kind": c.kind.value, "entry_type": c.entry_type.value,
            "old_type": None if c.old_type is None else c.old_type.value,
            "metadata_only": c.metadata_only}


def change_from_json(raw: dict[str, Any]) -> Change:
    old = raw.get("old_type")
    return Change(str(raw["path"]), ChangeKind(raw["kind"]), EntryType(raw["entry_type"]),
                  None if old is None else EntryType(old), bool(raw.get("metadata_only")))
