"""``branchagent status``: the workspace's branches, those a crashed run left too.

An open workspace lists its own branches. One that another process holds is
read through the workspace's reader of its state directory
(:func:`branchagent._workspace.read_saved_state`), touching nothing.

Rows come in tree order (each branch right after its parent, siblings oldest first),
with ``depth`` counted from the parents they name, so an indented listing shows every
child under its real parent. ``path`` is shown only where it exists now: a FUSE
branch's mount goes when the last process holding the workspace closes it (``mounted``
false, on the document and each row; ``None`` where another process holds the workspace
and the paths are not known here).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import branchagent as ba

from .. import _workspace
from ..exceptions import BranchAgentError

__all__ = ["recorded_backend", "status_closed", "status_doc", "status_empty", "status_unlocked"]


def tree_order(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` (oldest first) depth-first: each right after its parent, ``depth`` set from
    the parents named. A row whose parent is not listed (or a cycle) starts at the top."""
    names = {row["name"] for row in rows}
    kids: dict[str | None, list[dict[str, Any]]] = {}
    for row in rows:
        parent = row["parent"] if row["parent"] in names else None
        kids.setdefault(parent, []).append(row)
    out: list[dict[str, Any]] = []
    seen: set[str] = set()

    def visit(parent: str | None, depth: int) -> None:
        for row in kids.get(parent, []):
            if row["name"] in seen:
                continue
            seen.add(row["name"])
            out.append({**row, "depth": depth})
            visit(row["name"], depth + 1)

    visit(None, 0)
    for row in rows:  # parents that form a cycle: listed at the top, not lost
        if row["name"] not in seen:
            seen.add(row["name"])
            out.append({**row, "depth": 0})
            visit(row["name"], 1)
    return out


def recorded_backend(workspace: Path) -> str | None:
    """The backend recorded in ``workspace``'s state directory (None: no record)."""
    sdir = _workspace.default_state_dir(workspace)
    return _workspace.read_saved_state(sdir, branches=False).backend


def status_empty(workspace: Path) -> dict[str, Any]:
    """``status`` of a workspace with no state directory: no branches."""
    return {"workspace": str(workspace), "backend": None,
            "state_dir": str(_workspace.default_state_dir(workspace)),
            "in_use": False, "mounted": False, "branches": []}


async def status_doc(ws: ba.Workspace) -> dict[str, Any]:
    """``status`` of a workspace this process opened."""
    rows = []
    for b in ws.branches():
        try:
            changes: int | None = len(await b.changes())
        except (BranchAgentError, OSError):
            changes = None
        rows.append({"name": b.name, "parent": b.parent.name if b.parent else None,
                     "depth": b.depth, "path": str(b.path), "mounted": True,
                     "created": b.created, "changes": changes})
    return {"workspace": str(ws.path), "backend": ws.backend.name, "state_dir": str(ws.state_dir),
            "in_use": False, "mounted": True, "branches": tree_order(rows)}


def status_closed(doc: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`status_doc`'s document once the workspace is closed again: a path that
    went with it (a FUSE mount: no process has the workspace open now) is not shown, and
    ``mounted`` says so."""
    rows = []
    for row in doc["branches"]:
        there = bool(row["path"]) and os.path.isdir(row["path"])
        rows.append({**row, "path": row["path"] if there else None, "mounted": there})
    mounted = any(row["mounted"] for row in rows)
    return {**doc, "mounted": mounted, "branches": rows}


def status_unlocked(path: Path) -> dict[str, Any]:
    """``status`` of a workspace another process holds: read its records, touch nothing."""
    sdir = _workspace.default_state_dir(path)
    saved = _workspace.read_saved_state(sdir)
    entries = saved.branches

    def created(item: tuple[str, Mapping[str, object]]) -> tuple[float, str]:
        when = item[1].get("created")
        return (float(when) if isinstance(when, int | float) else 0.0, item[0])

    rows = [{"name": n, "parent": m.get("parent"), "depth": 0, "path": None, "mounted": None,
             "created": m.get("created"), "changes": None}
            for n, m in sorted(entries.items(), key=created)]
    return {"workspace": str(path), "backend": saved.backend, "state_dir": str(sdir),
            "in_use": True, "mounted": None, "branches": tree_order(rows)}
