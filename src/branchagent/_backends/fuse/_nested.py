"""A nested commit: the child's files move into the parent's top layer, roll-forward safe.

The plan (``merge.json`` in the parent's top layer: the child, the paths, the
wanted entries and their sources) is written durably first; every step can be
done again, so when the filesystem process dies in the middle, the next open
finishes the merge (:meth:`NestedMerge._finish_merges`). A part of ``._store.Store``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

from ... import _journal
from ..._branch import EntryType
from ..._fileops import copy_data, copy_metadata
from ..._manifest import Entry, Manifest
from ._layers import View, parent_of
from ._records import BranchRec, depth_key

__all__ = ["MERGE_PLAN", "NestedMerge"]

log = logging.getLogger("branchagent.fuse")
_AS_ROOT = os.geteuid() == 0
MERGE_PLAN = "merge.json"  # a nested commit's plan, in the parent's top layer


class NestedMerge:
    """Merging a child branch into its parent (see the module docstring)."""

    branches: dict[int, BranchRec]
    by_name: dict[str, int]
    branches_dir: str

    def view(self, b: BranchRec) -> View:
        raise NotImplementedError

    @staticmethod
    def _discard(path: str) -> None:
        raise NotImplementedError

    def _merge(self, p: BranchRec, b: BranchRec, paths: set[str], ours: Manifest,
               reals: dict[str, str], *, redo: bool = False) -> list[str]:
        """Make ``p``'s view hold ``ours`` on ``paths``, in ``p``'s top layer; return the
        paths it wrote (for the filesystem to invalidate). The plan is written first;
        ``redo``: finish one a crash interrupted (see the module docstring)."""
        view = self.view(p)
        top = view.top
        if not redo:
            plan = {"child": b.id, "paths": sorted(paths),
                    "ours": {q: e.to_json() for q, e in ours.items() if q in paths},
                    "reals": {q: r for q, r in reals.items() if q in paths}}
            _journal.write_durable(Path(top.dir) / MERGE_PLAN, json.dumps(plan).encode())
        _journal.fault("merge-intent")
        movable = tuple(layer.tree + "/" for layer in b.own_layers())
        dirs: list[tuple[str, Entry]] = []
        done: list[str] = []
        for i, q in enumerate(sorted(paths, key=depth_key)):
            if i:
                _journal.fault(f"merge:{i - 1}")
            want = ours.get(q)
            parent_path = parent_of(q)
            if parent_path:
                pf = view.resolve(parent_path)
                if pf is None or not pf.is_dir:
                    continue  # below a directory this merge removed or replaced
            if (want is not None and want.type is EntryType.FILE
                    and reals[q].startswith(movable) and not os.path.lexists(reals[q])):
                done.append(q)
                continue  # moved before a crash: this step is done
            have = view.resolve(q)
            done.append(q)
            if want is None:
                if have is not None:
                    view.remove(have)
                continue
            if want.type is EntryType.DIR:
                if have is not None and have.is_dir:
                    view.ensure_dir(q)
                else:
                    if have is not None:
                        view.remove(have)
                    real = view.prepare_new(q)
                    os.mkdir(real, 0o700)
                    top.set_opaque(q)
                    _chown(real, want)
                dirs.append((q, want))
                continue
            if have is not None:
                view.remove(have)
            real = view.prepare_new(q)
            if want.type is EntryType.SYMLINK:
                os.symlink(want.target, real)
                _chown(real, want)
                continue
            src = reals[q]
            if want.type is EntryType.FILE and src.startswith(movable):
                os.rename(src, real)
            elif want.type is EntryType.FILE:
                copy_data(src, real, None)
                copy_metadata(src, real, os.lstat(src))
            else:
                os.mkfifo(real, 0o600)
                copy_metadata(src, real, os.lstat(src))
        for q, want in reversed(dirs):
            real = top.real(q)
            os.chmod(real, want.mode)
        top.dirty = True
        _journal.fault("merge-done")
        return done

    def _finish_merges(self) -> None:
        """At open: finish nested commits a crash interrupted (their plans are in the
        parents' top layers), then forget the children they committed."""
        for p in list(self.branches.values()):
            plan_path = os.path.join(p.layers[0].dir, MERGE_PLAN)
            try:
                with open(plan_path) as f:
                    plan = json.load(f)
            except FileNotFoundError:
                continue
            except ValueError:  # torn while it was written: no step had been taken yet
                plan = {"child": -1}
            child = self.branches.get(int(plan["child"]))
            if child is not None:
                log.warning("finishing the commit of %r into %r interrupted by a crash",
                            child.name, p.name)
                ours = {q: Entry.from_json(e) for q, e in plan["ours"].items()}
                self._merge(p, child, set(plan["paths"]), ours, dict(plan["reals"]),
                            redo=True)
                self.branches.pop(child.id)
                self.by_name.pop(child.name, None)
                self._discard(os.path.join(self.branches_dir, str(child.id)))
            with contextlib.suppress(FileNotFoundError):
                os.unlink(plan_path)


def _chown(real: str, e: Entry) -> None:
    if _AS_ROOT and e.uid >= 0:
        with contextlib.suppress(OSError):
            os.lchown(real, e.uid, e.gid)
