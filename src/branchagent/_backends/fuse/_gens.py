"""The base's manifest generations: the base as top-level branches forked from it.

A top-level branch's snapshot is the base manifest current at its fork (a
*generation*). A generation made from another by a few changes (a commit, outside
writes seen by the watch) is kept and written as that delta; after
``MAX_GEN_CHAIN`` deltas in a row one is written whole again. A generation is on
disk (``fuse/base/<gen>.json``) before a fork that needs it is answered.
:class:`BaseGenerations` is a part of ``._store.Store``.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from pathlib import Path

from ..._branch import EntryType
from ..._manifest import Entry, HashCache, Manifest, scan
from ._layers import Found, parent_of
from ._records import BranchRec, depth_key
from ._scan import DigestCache, entry_of
from ._watch import BaseWatch

__all__ = ["MAX_GEN_CHAIN", "BaseGenerations", "patched", "write_gen", "write_json"]

#: Deltas in a row before a generation is written whole again (bounds reading at open).
MAX_GEN_CHAIN = 32


def write_json(path: str, data: object) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def write_gen(path: str, manifest: Manifest) -> None:
    write_json(path, {p: e.to_json() for p, e in manifest.items()})


class BaseGenerations:
    """The generations of the base manifest, in memory and on disk (see the module)."""

    root: str
    base_dir: str
    branches: dict[int, BranchRec]
    gens: dict[int, Manifest]
    gen_parent: dict[int, int]  # gen -> the gen it is a delta of
    gen_patch: dict[int, dict[str, Entry | None]]  # unsaved deltas
    gen_depth: dict[int, int]  # deltas down to a whole generation
    written: set[int]  # generations whose file this process wrote
    gen: int
    unsaved: set[int]
    base_cache: HashCache | None
    digests: DigestCache
    watch: BaseWatch

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
            write_json(self._gen_path(gen), {
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
        for p in sorted(changed, key=depth_key):
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


def patched(base: Manifest, paths: set[str], ours: Manifest
             ) -> tuple[Manifest, dict[str, Entry | None]]:
    """``base`` after a commit wrote ``ours`` on ``paths`` (a removed directory goes
    whole), and the delta between them."""
    new = dict(base)
    patch: dict[str, Entry | None] = {}
    gone: list[str] = []
    for q in sorted(paths, key=depth_key):
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
