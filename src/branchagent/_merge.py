"""The three-way merge of a commit: which paths conflict, which paths to write.

Both backends commit through :func:`plan_merge`: given the parent as the branch
saw it at the fork (*snapshot*), the branch now (*ours*) and the parent now
(*theirs*), it raises :class:`ConflictError` (naming every conflicting path) or
returns the paths the commit must write into the parent. The rules are in
``docs/design.md`` (Conflicts). Internal: strategies that merge candidates
(``Merge``) do it through the public Branch API.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from ._manifest import Entry, changed_paths, parent_of
from ._types import EntryType
from .exceptions import ConflictError

__all__ = ["conflict_error", "find_conflicts", "merge_paths", "plan_merge"]


def plan_merge(name: str, snapshot: Mapping[str, Entry], ours: Mapping[str, Entry],
               theirs: Mapping[str, Entry]) -> set[str]:
    """The paths committing branch ``name`` writes into its parent.

    Raises :class:`ConflictError` when both sides changed a path since the fork
    in ways that do not agree (see :func:`find_conflicts`).
    """
    ours_changed = changed_paths(snapshot, ours, strict=False)
    theirs_changed = changed_paths(snapshot, theirs, strict=False)
    conflicts = find_conflicts(ours_changed, ours, theirs_changed, theirs)
    if conflicts:
        raise conflict_error(name, conflicts)
    return merge_paths(snapshot, ours, theirs, theirs_changed)


def conflict_error(name: str, conflicts: list[str]) -> ConflictError:
    """The error of a commit of ``name`` refused for ``conflicts`` (sorted paths)."""
    shown = ", ".join(conflicts[:5]) + (" ..." if len(conflicts) > 5 else "")
    return ConflictError(
        f"branch {name!r} and its parent both changed {len(conflicts)} path(s) "
        f"since the fork: {shown}",
        tuple(conflicts),
    )


def _ancestors(path: str) -> Iterable[str]:
    while "/" in path:
        path = parent_of(path)
        yield path


def find_conflicts(
    ours_changed: set[str],
    ours_now: Mapping[str, Entry],
    theirs_changed: set[str],
    theirs_now: Mapping[str, Entry],
) -> list[str]:
    """Paths changed on both sides in incompatible ways.

    The sets are *loose* changes (``changed_paths(strict=False)``): a touch
    never conflicts. A path changed on both sides conflicts unless both made
    the same change (same type, mode and content).
    A path changed on one side also conflicts when the other side deleted or
    replaced (with a non-directory) one of its ancestors, unless both sides
    deleted it (both ran ``rm -rf d``: they agree).
    """
    conflicts: set[str] = set()
    for p in ours_changed:
        if p in theirs_changed:
            o, t = ours_now.get(p), theirs_now.get(p)
            if not (o is None and t is None) and not (o is not None and o.equivalent(t)):
                conflicts.add(p)
    for changed, other_changed, other_now in (
        (ours_changed, theirs_changed, theirs_now),
        (theirs_changed, ours_changed, ours_now),
    ):
        for p in changed:
            if p not in ours_now and p not in theirs_now:
                continue  # deleted on both sides (e.g. both removed its directory): agreed
            for a in _ancestors(p):
                if a in other_changed:
                    e = other_now.get(a)
                    if e is None or e.type is not EntryType.DIR:
                        conflicts.add(p)
                        break
    return sorted(conflicts)


def merge_paths(
    ours_before: Mapping[str, Entry],
    ours_now: Mapping[str, Entry],
    theirs_now: Mapping[str, Entry],
    theirs_changed: set[str],
) -> set[str]:
    """Paths a commit must write into the parent (after conflicts were ruled out).

    Every real change of ours, plus our touches (mtime-only changes) where the
    parent still holds the same content: a touch never overrides a real edit.
    """
    strict = changed_paths(ours_before, ours_now)
    loose = changed_paths(ours_before, ours_now, strict=False)
    touched = {
        p for p in strict - loose
        if p not in theirs_changed and ours_now[p].equivalent(theirs_now.get(p))
    }
    return loose | touched
