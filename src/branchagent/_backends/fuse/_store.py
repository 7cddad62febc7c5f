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
base (docs/design.md, "Outside writes"): its snapshot is the base manifest of the generation
current at the fork. Every open top-level branch was forked after the last
commit into the base (that commit invalidated the others), so that manifest is
the base at the fork, up to writes made into the base from outside, which are
then seen as parent changes (docs/design.md, "Outside writes").

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
from pathlib import Path

from ... import _journal
from ..._branch import Change, ChangeKind, EntryType
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
from ._gens import MAX_GEN_CHAIN, BaseGenerations, patched, write_gen, write_json
from ._layers import Found, Layer, View, rmtree, tree_usage, whole_file
from ._nested import MERGE_PLAN, NestedMerge
from ._records import BranchRec, CommitJob, Hooks, NoHooks
from ._scan import DigestCache, ViewScan, delta_paths, scan_paths
from ._watch import BaseWatch

__all__ = ["BranchRec", "CommitJob", "Hooks", "Store"]  # (records re-exported)

_AS_ROOT = os.geteuid() == 0
log = logging.getLogger("branchagent.fuse")
#: A top-level commit at most this big runs inline (a thread hop costs more than it).
SMALL_COMMIT_PATHS = 32
SMALL_COMMIT_BYTES = 1 << 20


class Store(BaseGenerations, NestedMerge):
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
        self.hooks: Hooks = NoHooks()
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

    @staticmethod
    def _discard(path: str) -> None:
        with contextlib.suppress(OSError):
            rmtree(path)

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
        write_json(os.path.join(d, "meta.json"), b.to_json())

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
        writes into the base made since the fork (those are parent changes: docs/design.md,
        "Outside writes")."""
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
            job.new_base, job.base_patch = patched(base_now, merge, ours)
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

    def resolve(self, b: BranchRec, path: str) -> Found | None:
        return self.view(b).resolve(path)

    def close(self) -> None:
        self.watch.close()
        for layer in self.layers.values():
            layer.release()


def _read(real: str) -> bytes:
    fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)
