"""``branchagent status``: the workspace's branches, those a crashed run left too.

An open workspace lists its own branches. One that another process holds is
read through the workspace's reader of its state directory
(:func:`branchagent._workspace.read_saved_state`), touching nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import branchagent as ba

from .. import _workspace
from ..exceptions import BranchAgentError

__all__ = ["recorded_backend", "status_doc", "status_empty", "status_unlocked"]


def recorded_backend(workspace: Path) -> str | None:
    """The backend recorded in ``workspace``'s state directory (None: no record)."""
    sdir = _workspace.default_state_dir(workspace)
    return _workspace.read_saved_state(sdir, branches=False).backend


def status_empty(workspace: Path) -> dict[str, Any]:
    """``status`` of a workspace with no state directory: no branches."""
    return {"workspace": str(workspace), "backend": None,
            "state_dir": str(_workspace.default_state_dir(workspace)),
            "in_use": False, "branches": []}


async def status_doc(ws: ba.Workspace) -> dict[str, Any]:
    """``status`` of a workspace this process opened."""
    rows = []
    for b in ws.branches():
        try:
            changes: int | None = len(await b.changes())
        except (BranchAgentError, OSError):
            changes = None
        rows.append({"name": b.name, "parent": b.parent.name if b.parent else None,
                     "depth": b.depth, "path": str(b.path), "created": b.created,
                     "changes": changes})
    return {"workspace": str(ws.path), "backend": ws.backend.name, "state_dir": str(ws.state_dir),
            "in_use": False, "branches": rows}


def status_unlocked(path: Path) -> dict[str, Any]:
    """``status`` of a workspace another process holds: read its records, touch nothing."""
    sdir = _workspace.default_state_dir(path)
    saved = _workspace.read_saved_state(sdir)
    entries = saved.branches

    def depth_of(name: str, seen: int = 0) -> int:
        parent = entries.get(name, {}).get("parent")
        if not isinstance(parent, str) or parent not in entries or seen > len(entries):
            return 0
        return depth_of(parent, seen + 1) + 1

    depth = {name: depth_of(name) for name in entries}
    rows = [{"name": n, "parent": m.get("parent"), "depth": depth[n], "path": None,
             "created": m.get("created"), "changes": None}
            for n, m in sorted(entries.items(), key=lambda kv: (depth[kv[0]], kv[0]))]
    return {"workspace": str(path), "backend": saved.backend, "state_dir": str(sdir),
            "in_use": True, "branches": rows}
