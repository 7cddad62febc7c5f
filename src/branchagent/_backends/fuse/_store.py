"""The FUSE server's branch store: branches as layer stacks, forks, commits, aborts.

Runs inside the filesystem process (see :mod:`._server`); everything here is
synchronous and runs on its one thread, so a request handler never sees a
half-made change.

Layout under ``<state>/fuse``::

    layers/<lid>/tree, meta.log     one copy-on-write layer (see ._layers)
    branches/<id>/meta.json         a branch: name, parent, layer stack, snapshot
    base/<gen>.json                 the base's manifest at open / after a commit
    mnt/                            the mount point: one ``@<id>`` directory per branch

Snapshots. A nested branch forked from P sees P's layers as they were at the
fork (frozen; P writes into a new top layer), so P at the fork is the view of
the branch's bottom ``nsnap`` layers. A top-level branch layers over the live
base (DESIGN.md allows it): its snapshot is the base manifest of the generation
current at the fork. Every open top-level branch was forked after the last
commit into the base (that commit invalidated the others), so that manifest is
the base at the fork, up to writes made into the base from outside, which are
then seen as parent changes, as DESIGN.md says.

Commits. Conflicts and the paths to write come from :mod:`.._manifest`
(:func:`.._merge.plan_merge`) over manifests of the views. A commit into
the base is a journaled apply (:func:`.._journal.apply`) whose sources are the
branch's layer files, so data moves by rename. A nested commit moves the
branch's files into the parent's top layer by rename, after writing its plan
(``merge.json`` in that layer: the child, the paths, the wanted entries and
their sources) durably; every step is one that can be done again, so when the
filesystem process dies in the middle, the next open finishes the merge (roll
forward) and the parent is exactly as after the commit.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import attrs

from ... import _journal
from ..._branch import Change, ChangeKind, EntryType
from ..._fileops import copy_data, copy_metadata
from ..._manifest import (
    Entry,
    HashCache,
    Manifest,
    changed_paths,
    hash_file,
    scan,
    to_changes,
)
from ..._merge import plan_merge
from ...exceptions import BranchExists, BranchNotFound
from ._layers import Found, Layer, Quota, View, parent_of, rmtree, tree_usage, whole_file
from ._scan import DigestCache, ViewScan, delta_paths, entry_of, scan_paths
from ._watch import BaseWatch

__all__ = ["BranchRec", "CommitJob", "Hooks", "Store"]

_AS_ROOT = os.geteuid() == 0
log = logging.getLogger("branchagent.fuse")
MERGE_PLAN = "merge.json"  # a nested commit's plan, in the parent's top layer
#: A top-level commit at most this big runs inline (a thread hop costs more than it).
SMALL_COMMIT_PATHS = 32
SMALL_COMMIT_BYTES = 1 << 20


@attrs.define(eq=False)
class BranchRec:
    """One branch: its layer stack (top first) and where its snapshot starts."""

    id: int
    name: str
    parent: int | None
    layers: list[Layer]
    nsnap: int  # the bottom nsnap layers (plus the base) are the parent at the fork
    gen: int | None  # top-level branches: the base generation at the fork
    epoch: int = 0  # bumped on every change of the namespace (the FS caches by it)
    created: float = attrs.Factory(time.time)
    quota: Quota = attrs.Factory(Quota)  # its disk limit (not persisted: the agent re-sends it)

    def own_layers(self) -> list[Layer]:
        return self.layers[: len(self.layers) - self.nsnap]

    def snapshot_layers(self) -> list[Layer]:
        return self.layers[len(self.layers) - self.nsnap:]

    def to_json(self) -> dict[str, object]:
        return {"id": self.id, "name": self.name, "parent": self.parent,
                "layers": [layer.id for layer in self.layers], "nsnap": self.nsnap,
                "gen": self.gen, "created": self.created}


@attrs.define(eq=False)
class CommitJob:
    """A commit between its steps (see :meth:`Store.commit_prepare`)."""

    b: BranchRec
    p: BranchRec | None
    paths: set[str]
    below: View
    rescan: bool
    busy: tuple[int, ...]
    heavy: bool = True  # run commit_work in a worker thread (else inline: a small commit)
    changes: list[Change] = attrs.Factory(list)
    new_base: Manifest | None = None
    base_patch: dict[str, Entry | None] = attrs.Factory(dict)
    merged: list[str] = attrs.Factory(list)


class Hooks(Protocol):
    """What the filesystem layer must hear about (caches, open files, inodes)."""

    def froze(self, b: BranchRec, old_top: Layer) -> None: ...

    def merged(self, b: BranchRec, paths: Iterable[str]) -> None: ...

    def gone(self, bid: int) -> None: ...

    def held_open(self, b: BranchRec) -> int:
        """Bytes of ``b``'s files removed while still open (held until their last close)."""
        ...


class _NoHooks:
    def froze(self, b: BranchRec, old_top: Layer) -> None:
        pass

    def merged(self, b: BranchRec, paths: Iterable[str]) -> None:
        pass

    def gone(self, bid: int) -> None:
        pass

    def held_open(self, b: BranchRec) -> int:
        return 0


def _write_json(path: str, data: object) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def write_gen(path: str, manifest: Manifest) -> None:
    _write_json(path, {p: e.to_json() for p, e in manifest.items()})


#: Deltas in a row before a generation is written whole again (bounds reading at open).
MAX_GEN_CHAIN = 32


def _depth_key(path: str) -> tuple[str, ...]:
    return tuple(path.split("/"))


class Store:
    """Every branch of one workspace (see the module docstring)."""

    def __init__(self, root: str, state: str) -> None:
        self.root = root
        self.state = state
        self.dir = os.path.join(state, "fuse")
        self.layers_dir = os.path.join(self.dir, "layers")
        self.branches_dir = os.path.join(self.dir, "branches")
        self.base_dir = os.path.join(self.dir, "base")
        self.journal = os.path.join(state, "journal")
        self.branches: dict[int, BranchRec] = {}
        self.by_name: dict[str, int] = {}
        self.layers: dict[str, Layer] = {}
        self.gens: dict[int, Manifest] = {}
        # A generation made from another by a few changes is written as that delta:
        self.gen_parent: dict[int, int] = {}  # gen -> the gen it is a delta of
        self.gen_patch: dict[int, dict[str, Entry | None]] = {}  # unsaved deltas
        self.gen_depth: dict[int, int] = {}  # deltas down to a whole generation
        self.written: set[int] = set()  # generations whose file this process wrote
        self.gen = 0
        self.base_cache: HashCache | None = None
        self.digests = DigestCache()
        self.frozen_usage: dict[str, tuple[int, int]] = {}  # lid -> tree_usage, frozen layers
        self.next_id = 1
        self.unsaved: set[int] = set()
        self.hooks: Hooks = _NoHooks()
        self.watch = BaseWatch(root)

    # -- loading ----------------------------------------------------------------------------

    def load(self) -> list[str]:
        """Read surviving branches, scan the base, drop what nothing references.

        Returns the names of branches whose storage was found broken (dropped).
        """
        for d in (self.layers_dir, self.branches_dir, self.base_dir):
            os.makedirs(d, exist_ok=True)
        lost: list[str] = []
        unsnapped: list[BranchRec] = []
        metas = []
        for entry in sorted(os.listdir(self.branches_dir)):
            meta = os.path.join(self.branches_dir, entry, "meta.json")
            try:
                with open(meta) as f:
                    metas.append(json.load(f))
            except (OSError, ValueError):
                rmtree(os.path.join(self.branches_dir, entry))
        gens_on_disk = self._gens_on_disk()
        for m in metas:
            try:
                rec = self._load_branch(m)
            except (OSError, ValueError, KeyError, TypeError):
                lost.append(str(m.get("name", "?")))
                with contextlib.suppress(OSError):
                    rmtree(os.path.join(self.branches_dir, str(m.get("id"))))
                continue
            if rec.gen is not None and rec.gen not in self.gens:
                try:
                    self.gens[rec.gen] = self._read_gen(rec.gen)
                except FileNotFoundError:  # forked just before a crash: written after answering
                    unsnapped.append(rec)
                except (OSError, ValueError, KeyError, TypeError):
                    lost.append(rec.name)
                    rmtree(os.path.join(self.branches_dir, str(rec.id)))
                    continue
            self.branches[rec.id] = rec
            self.by_name[rec.name] = rec.id
            self.next_id = max(self.next_id, rec.id + 1)
        self.gen = max([0, *gens_on_disk,
                        *(b.gen for b in self.branches.values() if b.gen is not None)])
        self._link_sparse()
        self._finish_merges()
        self._new_gen(self._scan_base())
        self._save_gen(self.gen)  # whole, once, at open (the scan costs more anyway)
        for g in {b.gen for b in self.branches.values() if b.gen is not None}:
            if self.gen_depth.get(g, 0) > MAX_GEN_CHAIN:  # rewrite it whole
                write_gen(self._gen_path(g), self.gens[g])
                self.gen_parent.pop(g, None)
                self.gen_depth[g] = 0
        for rec in unsnapped:  # the base as it is now stands in for the base at its fork
            log.warning("branch %r: base manifest of its fork missing; using the base now",
                        rec.name)
            rec.gen = self.gen
            self._save(rec)
        self.gc(strays=True)
        return lost

    def _link_sparse(self) -> None:
        """Point each loaded sparse record at the record below it, if that one is sparse too."""
        for layer in self.layers.values():
            layer.drop_missing()
        for layer in self.layers.values():
            for sp in layer.sparse.values():
                below = self.layers.get(sp.lower_lid) if sp.lower_lid is not None else None
                sp.lower = below.sparse.get(sp.lower_path) if below is not None else None

    def _load_branch(self, m: dict[str, object]) -> BranchRec:
        layers = []
        for lid in m["layers"]:  # type: ignore[attr-defined]
            layer = self.layers.get(lid)
            if layer is None:
                layer = Layer.load(lid, os.path.join(self.layers_dir, lid))
                self.layers[lid] = layer
            layers.append(layer)
        if not layers:
            raise ValueError("a branch without layers")
        gen = m.get("gen")
        parent = m.get("parent")
        created = m.get("created")
        return BranchRec(id=int(m["id"]), name=str(m["name"]),  # type: ignore[call-overload]
                         parent=None if parent is None else int(parent),  # type: ignore[call-overload]
                         layers=layers, nsnap=int(m["nsnap"]),  # type: ignore[call-overload]
                         gen=None if gen is None else int(gen),  # type: ignore[call-overload]
                         created=float(created) if isinstance(created, int | float)
                         else time.time())

    def _gens_on_disk(self) -> list[int]:
        out = []
        for n in os.listdir(self.base_dir):
            stem, _, ext = n.partition(".")
            if ext == "json" and stem.isdigit():
                out.append(int(stem))
        return out

    def _read_gen(self, gen: int) -> Manifest:
        """A generation from disk: whole, or a delta of another (read first, kept)."""
        with open(os.path.join(self.base_dir, f"{gen}.json")) as f:
            raw = json.load(f)
        if "parent" in raw and "patch" in raw and len(raw) == 2:
            parent = int(raw["parent"])
            if parent not in self.gens:
                self.gens[parent] = self._read_gen(parent)
            out = dict(self.gens[parent])
            for p, e in raw["patch"].items():
                if e is None:
                    out.pop(p, None)
                else:
                    out[p] = Entry.from_json(e)
            self.gen_parent[gen] = parent
            self.gen_depth[gen] = self.gen_depth.get(parent, 0) + 1
            self.written.add(gen)
            return out
        self.gen_depth[gen] = 0
        self.written.add(gen)
        return {p: Entry.from_json(e) for p, e in raw.items()}

    def _new_gen(self, manifest: Manifest, *, parent: int | None = None,
                 patch: dict[str, Entry | None] | None = None) -> None:
        """Make ``manifest`` the current base generation (``parent`` + ``patch``: what it
        is made of, written as such). It is written when a branch first needs it
        (:meth:`_save_gen`): whole, or as its delta, which is small enough to write
        before a fork is answered."""
        self.gen += 1
        self.gens[self.gen] = manifest
        self.unsaved.add(self.gen)
        if parent is not None and patch is not None and parent in self.gens:
            self.gen_parent[self.gen] = parent
            self.gen_patch[self.gen] = patch
            self.gen_depth[self.gen] = self.gen_depth.get(parent, 0) + 1
        else:
            self.gen_depth[self.gen] = 0

    def _gen_path(self, gen: int) -> str:
        return os.path.join(self.base_dir, f"{gen}.json")

    def _save_gen(self, gen: int) -> None:
        if gen not in self.unsaved:
            return
        patch = self.gen_patch.pop(gen, None)
        parent = self.gen_parent.get(gen)
        if patch is not None and parent is not None and self.gen_depth[gen] <= MAX_GEN_CHAIN:
            self._save_gen(parent)
            _write_json(self._gen_path(gen), {
                "parent": parent,
                "patch": {p: None if e is None else e.to_json() for p, e in patch.items()}})
        else:
            write_gen(self._gen_path(gen), self.gens[gen])
            self.gen_parent.pop(gen, None)
            self.gen_depth[gen] = 0
        self.unsaved.discard(gen)
        self.written.add(gen)

    def _drop_gens(self, *, on_disk: bool) -> None:
        """Forget generations no longer needed in memory (all but the current one and the
        branches'), folding an unsaved delta into its unsaved child first; delete the
        files of those no kept generation is a delta of (``on_disk``: also files of
        generations this process never loaded)."""
        mem_keep = {self.gen, *(b.gen for b in self.branches.values() if b.gen is not None)}
        for g in sorted(g for g in self.gens if g not in mem_keep):
            if g in self.unsaved:  # not on disk: a child's delta cannot point at it
                for c in [c for c, par in self.gen_parent.items() if par == g]:
                    gp, gpar = self.gen_patch.get(g), self.gen_parent.get(g)
                    if c not in self.gen_patch:
                        continue  # (already written: then g was written before it)
                    if gp is None or gpar is None:  # g is whole: c will be written whole
                        del self.gen_patch[c], self.gen_parent[c]
                        self.gen_depth[c] = 0
                    else:
                        self.gen_patch[c] = {**gp, **self.gen_patch[c]}
                        self.gen_parent[c] = gpar
                        self.gen_depth[c] = self.gen_depth.get(g, 1)
                self.unsaved.discard(g)
                self.gen_patch.pop(g, None)
                self.gen_parent.pop(g, None)
            del self.gens[g]
        disk_keep: set[int] = set()
        todo = list(mem_keep)
        while todo:
            g = todo.pop()
            if g not in disk_keep:
                disk_keep.add(g)
                if g in self.gen_parent:
                    todo.append(self.gen_parent[g])
        for g in [g for g in self.gen_parent if g not in disk_keep]:
            del self.gen_parent[g]
        for g in [g for g in self.gen_depth if g not in disk_keep]:
            del self.gen_depth[g]
        on = self._gens_on_disk() if on_disk else []
        for g in set(on) | self.written:
            if g not in disk_keep:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._gen_path(g))
                self.written.discard(g)

    def _scan_base(self) -> Manifest:
        self.watch.take_dirty()  # what happens from now on is seen by the next check
        manifest, self.base_cache = scan(Path(self.root), self.base_cache)
        self.watch.watch(p for p, e in manifest.items() if e.type is EntryType.DIR)
        return manifest

    def _refresh_base(self) -> None:
        """Bring the base manifest up to date with outside writes since the last scan:
        rescan the paths the watch saw written (and below the directories among them),
        or the whole base when it cannot say which."""
        changed = self.watch.take_changes()
        if changed == set():
            return
        old = self.gen
        patched = None if changed is None else self._patch_base(self.gens[old], changed)
        if patched is None:
            self._new_gen(self._scan_base())
        else:
            self._new_gen(patched[0], parent=old, patch=patched[1])
        self._drop_gens(on_disk=False)

    @staticmethod
    def _discard(path: str) -> None:
        with contextlib.suppress(OSError):
            rmtree(path)

    def _patch_base(self, old: Manifest, changed: set[str]
                    ) -> tuple[Manifest, dict[str, Entry | None]] | None:
        """``old`` with ``changed`` paths rescanned, and the delta (None: too many
        changes; rescan everything)."""
        if len(changed) > max(64, len(old) // 8):
            return None
        new = dict(old)
        dirs = [p for p in changed if (e := old.get(p)) is not None and e.type is EntryType.DIR]
        for p in changed:
            new.pop(p, None)
        if dirs:  # a directory removed, replaced or made: what was below it goes too
            prefixes = tuple(p + "/" for p in dirs)
            for k in [k for k in new if k.startswith(prefixes)]:
                del new[k]
        watch: list[str] = []
        for p in sorted(changed, key=_depth_key):
            if p in new:
                continue  # found by the scan of a directory above it
            parent = parent_of(p)
            if parent and (pe := new.get(parent)) is not None and pe.type is not EntryType.DIR:
                continue
            real = os.path.join(self.root, p)
            try:
                st = os.lstat(real)
            except (FileNotFoundError, NotADirectoryError):
                continue
            if stat.S_ISDIR(st.st_mode):
                below, _ = scan(Path(real))
                new[p] = Entry(EntryType.DIR, stat.S_IMODE(st.st_mode), uid=st.st_uid,
                               gid=st.st_gid)
                for q, e in below.items():
                    new[f"{p}/{q}"] = e
                watch.append(p)
                watch.extend(f"{p}/{q}" for q, e in below.items() if e.type is EntryType.DIR)
            else:
                with contextlib.suppress(FileNotFoundError):
                    if (e := entry_of(Found(p, None, real, st, None), self.digests)) is not None:
                        new[p] = e
        self.watch.watch(watch)
        return new, _delta(old, new, changed, dirs)

    def gc(self, *, strays: bool = False) -> None:
        """Remove layers and base generations no branch references (``strays``: also
        layer directories the store does not know, as after a crash; at open only)."""
        used = {layer.id for b in self.branches.values() for layer in b.layers}
        for lid in [lid for lid in self.layers if lid not in used]:
            layer = self.layers.pop(lid)
            self.frozen_usage.pop(lid, None)
            layer.release()
            self.digests.forget_under(layer.dir)
            self._discard(layer.dir)
        if strays:
            for n in os.listdir(self.layers_dir):
                if n not in used and n not in self.layers:
                    self._discard(os.path.join(self.layers_dir, n))
        self._drop_gens(on_disk=strays)

    # -- helpers -------------------------------------------------------------------------------

    def get(self, name: str) -> BranchRec:
        bid = self.by_name.get(name)
        if bid is None:
            raise BranchNotFound(f"the FUSE server has no branch named {name!r}")
        return self.branches[bid]

    def _check_parent(self, b: BranchRec, parent: str | None) -> BranchRec | None:
        if parent is None:
            if b.parent is not None:
                raise BranchNotFound(f"branch {b.name!r} is not a top-level branch")
            return None
        p = self.get(parent)
        if b.parent != p.id:
            raise BranchNotFound(f"branch {b.name!r} is not a child of {parent!r}")
        return p

    def view(self, b: BranchRec) -> View:
        return View(b.layers, self.root)

    def _new_layer(self, root_like: os.stat_result | None) -> Layer:
        lid = uuid.uuid4().hex[:16]
        layer = Layer.create(lid, os.path.join(self.layers_dir, lid), root_like)
        self.layers[lid] = layer
        return layer

    def _save(self, b: BranchRec) -> None:
        d = os.path.join(self.branches_dir, str(b.id))
        os.makedirs(d, exist_ok=True)
        _write_json(os.path.join(d, "meta.json"), b.to_json())

    # -- operations ----------------------------------------------------------------------------

    def create(self, name: str, parent: str | None) -> int:
        """A new branch seeing ``parent`` (the base for None) as it is now. O(1)."""
        if name in self.by_name:
            raise BranchExists(f"a branch named {name!r} already exists")
        bid = self.next_id
        self.next_id += 1
        if parent is None:
            self._refresh_base()
            top = self._new_layer(os.stat(self.root))
            rec = BranchRec(bid, name, None, [top], nsnap=0, gen=self.gen)
            self._save_gen(self.gen)  # before the branch that needs it is on disk
        else:
            p = self.get(parent)
            old_top = p.layers[0]
            root_like = os.lstat(old_top.tree)
            if old_top.dirty:
                # Freeze the parent's top: from now on it is shared and never written.
                new_top = self._new_layer(root_like)
                old_top.close()
                old_top.compact()
                p.layers = [new_top, *p.layers]
                p.epoch += 1
                self._save(p)  # before the child exists: a crash leaves no half-shared top
                self.hooks.froze(p, old_top)
                below = p.layers[1:]
            else:
                below = p.layers[1:]  # the parent's top is empty: nothing to freeze
            top = self._new_layer(root_like)
            rec = BranchRec(bid, name, p.id, [top, *below], nsnap=len(below), gen=None)
        self._save(rec)
        self.branches[bid] = rec
        self.by_name[name] = bid
        return bid

    def _delta(self, b: BranchRec) -> tuple[set[str], View]:
        """The paths ``b`` may have changed since its fork, and the view it forked from."""
        below = View(b.snapshot_layers(), self.root)
        return delta_paths(b.own_layers(), below), below

    def _snapshot_at(self, b: BranchRec, below: View, paths: set[str]) -> Manifest:
        if b.parent is None:
            assert b.gen is not None
            gen = self.gens[b.gen]
            return {q: gen[q] for q in paths if q in gen}
        return scan_paths(below, paths, self.digests).manifest

    def changes(self, name: str, parent: str | None) -> list[Change]:
        b = self.get(name)
        self._check_parent(b, parent)
        paths, below = self._delta(b)
        ours = scan_paths(self.view(b), paths, self.digests)
        return self._own_changes(b, ours, self._snapshot_at(b, below, paths))

    def _own_changes(self, b: BranchRec, ours: ViewScan, snapshot: Manifest) -> list[Change]:
        """The branch's changes; for a top-level branch, without deletions that outside
        writes into the base made since the fork (DESIGN.md: those are parent changes)."""
        changes = to_changes(snapshot, ours.manifest)
        if b.parent is not None:
            return changes
        out = []
        for c in changes:
            if c.kind is ChangeKind.DELETED:
                if not os.path.lexists(os.path.join(self.root, c.path)):
                    continue  # gone from the base too: not this branch's doing
            elif c.path not in ours.owned:
                continue  # shows through from the base: written there from outside
            out.append(c)
        return out

    # -- disk usage and limits --------------------------------------------------------------------

    def held(self, b: BranchRec) -> tuple[int, int]:
        """(bytes, entries) ``b``'s own layers hold (see ._layers), walked now.

        Frozen layers never change size (a fill keeps it), so their walk is kept;
        the top layer is walked each time. Files removed while open count too.
        """
        total = files = 0
        for i, layer in enumerate(b.own_layers()):
            if i == 0:
                n, k = tree_usage(layer.tree)
            else:
                got = self.frozen_usage.get(layer.id)
                if got is None:
                    got = self.frozen_usage[layer.id] = tree_usage(layer.tree)
                n, k = got
            total += n
            files += k
        return total + self.hooks.held_open(b), files

    def usage(self, name: str) -> dict[str, object]:
        """What branch ``name`` holds (and the limit in force); resyncs its quota."""
        b = self.get(name)
        total, files = self.held(b)
        if b.quota.limit is not None:
            b.quota.used = total
        return {"bytes": total, "files": files, "disk_limit": b.quota.limit}

    def set_disk_limit(self, name: str, limit: int | None) -> None:
        """Cap what ``name``'s own layers may hold at ``limit`` bytes (None: no cap).

        Setting a limit where there was none walks the branch's layers once; from
        then on the filesystem keeps the figure by size deltas. A limit below what
        the branch holds already refuses every growth, and frees nothing.
        """
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                                  or limit <= 0):
            raise ValueError(f"a disk limit must be a positive number of bytes, not {limit!r}")
        b = self.get(name)
        if limit is not None and b.quota.limit is None:
            b.quota.used = self.held(b)[0]
        b.quota.limit = limit

    def old_content(self, name: str, parent: str | None, path: str) -> bytes | None:
        b = self.get(name)
        self._check_parent(b, parent)
        if b.parent is None:
            assert b.gen is not None
            entry = self.gens[b.gen].get(path)
            real = os.path.join(self.root, path)
        else:
            found = View(b.snapshot_layers(), self.root).resolve(path)
            if found is None:
                return None
            entry, real = None, found.real
            if stat.S_ISREG(found.st.st_mode):
                whole_file(found)
                return _read(real)
        if entry is None or entry.type is not EntryType.FILE:
            return None
        try:
            if not stat.S_ISREG(os.lstat(real).st_mode):
                return None
            data = _read(real)
            digest = hash_file(real)
        except OSError:
            return None
        return data if digest == entry.digest else None

    def commit(self, name: str) -> list[Change]:
        """Merge ``name`` into its parent in one go (see :meth:`commit_prepare`)."""
        job = self.commit_prepare(name)
        self.commit_work(job)
        return self.commit_finish(job)

    def commit_prepare(self, name: str) -> CommitJob:
        """First step of a commit (on the server's thread): what to look at.

        Only the paths either side may have changed since the fork are looked
        at (their layers' contents), so a small commit is cheap in a large
        workspace; a top-level commit rescans the base only when something
        wrote into it from outside since the fork. The server runs
        :meth:`commit_work` in a worker thread while requests for ``job.busy``
        (the branch and its parent) wait and every other branch is served,
        then :meth:`commit_finish` on its own thread again.
        """
        b = self.get(name)
        p = None if b.parent is None else self.branches[b.parent]
        paths, below = self._delta(b)
        rescan = False
        if p is None:
            assert b.gen is not None
            rescan = b.gen != self.gen or self.watch.take_dirty()
        busy = (b.id,) if p is None else (b.id, p.id)
        heavy = p is not None or rescan or self._heavy(b, paths)
        return CommitJob(b=b, p=p, paths=paths, below=below, rescan=rescan, busy=busy,
                         heavy=heavy)

    def _heavy(self, b: BranchRec, paths: set[str]) -> bool:
        """Whether a top-level commit of ``paths`` has enough to read or move that it should
        not run on the thread answering FUSE requests (many paths, much data)."""
        if len(paths) > SMALL_COMMIT_PATHS:
            return True
        total = 0
        for layer in b.own_layers():
            if layer.sparse:
                return True
            for q in paths:
                with contextlib.suppress(OSError):
                    st = os.lstat(layer.real(q))
                    if stat.S_ISREG(st.st_mode):
                        total += st.st_size
        return total > SMALL_COMMIT_BYTES

    def commit_work(self, job: CommitJob) -> None:
        """The commit's reading, checking and writing: thread-safe against requests for
        other branches (it touches only ``job.busy``'s layers, the base and its caches)."""
        b, p, paths, below = job.b, job.p, job.paths, job.below
        base_now: Manifest | None = None
        if p is None:
            assert b.gen is not None
            gen = self.gens[b.gen]
            if not job.rescan:
                base_now = gen  # nothing wrote into the base since the fork
            else:
                base_now, self.base_cache = scan(Path(self.root), self.base_cache)
                paths |= changed_paths(gen, base_now)
            snapshot = {q: gen[q] for q in paths if q in gen}
            theirs = {q: base_now[q] for q in paths if q in base_now}
        else:
            k = len(p.layers) - b.nsnap
            if [x.id for x in p.layers[k:]] == [x.id for x in b.snapshot_layers()]:
                paths |= delta_paths(p.layers[:k], below)
            else:  # pragma: no cover - a stack is only ever pushed onto
                paths |= {f.path for f in self.view(p).walk()} | {f.path for f in below.walk()}
            snapshot = scan_paths(below, paths, self.digests).manifest
            theirs = scan_paths(self.view(p), paths, self.digests).manifest
        scanned = scan_paths(self.view(b), paths, self.digests)
        ours, reals = scanned.manifest, scanned.reals
        merge = plan_merge(b.name, snapshot, ours, theirs)
        job.changes = self._own_changes(b, scanned, snapshot)
        for q in merge:  # files copied up sparse are made whole before they move
            sp = scanned.sparse.get(q)
            if sp is not None:
                sp.fill()
        if p is None:
            assert base_now is not None
            meta_dir = os.path.join(self.branches_dir, str(b.id))
            ops = _journal.build_plan(merge, theirs, ours, lambda q: Path(reals[q]))
            _journal.apply(Path(self.root), Path(self.journal), ops,
                           release=[Path(meta_dir), Path(b.layers[0].dir)])
            job.new_base, job.base_patch = _patched(base_now, merge, ours)
        else:
            job.merged = self._merge(p, b, merge, ours, reals)

    def commit_finish(self, job: CommitJob) -> list[Change]:
        """Last step (on the server's thread): forget the branch, tell the filesystem."""
        b, p = job.b, job.p
        if p is None:
            self._forget(b)  # first: the events of our own writes need not reach its nodes
            self.watch.take_dirty()  # our own writes into the base
            assert job.new_base is not None
            if job.rescan:
                self._new_gen(job.new_base)
            else:  # the generation it forked from, plus what it wrote
                assert job.b.gen is not None
                self._new_gen(job.new_base, parent=job.b.gen, patch=job.base_patch)
            if job.rescan:  # directories made outside since the last scan: watch them too
                self.watch.watch(q for q, e in job.new_base.items() if e.type is EntryType.DIR)
        else:
            p.epoch += 1
            self.hooks.merged(p, job.merged)
            if p.quota.limit is not None:  # the child's files are the parent's now
                p.quota.used = self.held(p)[0]
            self._forget(b)
            self._discard(os.path.join(self.branches_dir, str(b.id)))
            with contextlib.suppress(FileNotFoundError):  # after the child: see _finish_merges
                os.unlink(os.path.join(p.layers[0].dir, MERGE_PLAN))
        self.gc()
        return job.changes

    def abort(self, *names: str) -> None:
        """Release the branches ``names`` (unknown ones are skipped), then collect their
        layers once."""
        for name in names:
            bid = self.by_name.get(name)
            if bid is None:
                continue
            b = self.branches[bid]
            self._discard(os.path.join(self.branches_dir, str(bid)))  # first: never comes back
            self._forget(b)
        self.gc()

    def _forget(self, b: BranchRec) -> None:
        self.branches.pop(b.id, None)
        self.by_name.pop(b.name, None)
        self.hooks.gone(b.id)

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
        for i, q in enumerate(sorted(paths, key=_depth_key)):
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

    def resolve(self, b: BranchRec, path: str) -> Found | None:
        return self.view(b).resolve(path)

    def close(self) -> None:
        self.watch.close()
        for layer in self.layers.values():
            layer.release()


def _patched(base: Manifest, paths: set[str], ours: Manifest
             ) -> tuple[Manifest, dict[str, Entry | None]]:
    """``base`` after a commit wrote ``ours`` on ``paths`` (a removed directory goes
    whole), and the delta between them."""
    new = dict(base)
    patch: dict[str, Entry | None] = {}
    gone: list[str] = []
    for q in sorted(paths, key=_depth_key):
        old, want = new.get(q), ours.get(q)
        if old is not None and old.type is EntryType.DIR and (
                want is None or want.type is not EntryType.DIR):
            gone.append(q + "/")
        if want is None:
            new.pop(q, None)
        else:
            new[q] = want
        patch[q] = want
    if gone:
        prefixes = tuple(gone)
        for k in [k for k in new if k.startswith(prefixes)]:
            del new[k]
            patch[k] = None
    return new, patch


def _delta(old: Manifest, new: Manifest, changed: set[str], dirs: list[str]
           ) -> dict[str, Entry | None]:
    """What differs between ``old`` and ``new`` at ``changed`` and below ``dirs``."""
    keys = set(changed)
    if dirs:
        prefixes = tuple(d + "/" for d in dirs)
        keys.update(k for k in old if k.startswith(prefixes))
        keys.update(k for k in new if k.startswith(prefixes))
    for p in changed:  # directories made: everything found below them
        if (e := new.get(p)) is not None and e.type is EntryType.DIR and p not in dirs:
            prefix = p + "/"
            keys.update(k for k in new if k.startswith(prefix))
    return {k: new.get(k) for k in keys if new.get(k) != old.get(k)}


def _chown(real: str, e: Entry) -> None:
    if _AS_ROOT and e.uid >= 0:
        with contextlib.suppress(OSError):
            os.lchown(real, e.uid, e.gid)


def _read(real: str) -> bytes:
    fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)
