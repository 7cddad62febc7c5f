"""The FUSE backend's branch store without a mount: base manifests on disk.

A top-level branch's snapshot is the base manifest of the generation it
forked from. A generation made from another by a commit or by outside writes
is written as a delta of it (small enough to write before a fork is
answered). These tests check that what a reopened store reads back is
exactly what the live store had, and that old generations do not pile up.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from branchagent._backends.fuse._gens import MAX_GEN_CHAIN
from branchagent._backends.fuse._store import Store


def _store(tmp_path: Path) -> Store:
    s = Store(os.fspath(tmp_path / "repo"), os.fspath(tmp_path / "state"))
    s.load()
    return s


def _write_in(s: Store, name: str, rel: str, text: str) -> None:
    """Write ``rel`` into branch ``name``'s top layer (what a write through FUSE does)."""
    real = os.path.join(s.get(name).layers[0].tree, rel)
    os.makedirs(os.path.dirname(real), exist_ok=True)
    with open(real, "w") as f:
        f.write(text)


def test_generations_read_back_exactly_and_do_not_pile_up(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "d").mkdir(parents=True)
    for i in range(20):
        (repo / "d" / f"f{i}.txt").write_text(f"{i}\n")
    (tmp_path / "state").mkdir()
    rnd = random.Random(3)
    s = _store(tmp_path)
    kept: list[str] = []
    for i in range(3 * MAX_GEN_CHAIN):
        s.create(f"w{i}", None)
        _write_in(s, f"w{i}", f"d/n{i}/x.txt", f"{i}\n")
        if i % 3 == 1:  # the branch removes a whole directory made outside before
            view = s.view(s.get(f"w{i}"))
            found = view.resolve(f"o{i - 1}")
            assert found is not None
            view.remove(found)
        if i % 3 == 0:  # outside writes: the next fork patches the manifest
            (repo / "d" / f"f{rnd.randrange(20)}.txt").write_text(f"outside {i}\n")
            (repo / f"o{i}").mkdir()
            (repo / f"o{i}" / "deep.txt").write_text("deep\n")
        if i % 5 == 0:
            s.create(f"k{i}", None)  # a branch kept open on this generation
            kept.append(f"k{i}")
            s.watch.read()
        s.commit(f"w{i}")
        for name in kept[:-2]:  # (a commit into the base invalidates siblings)
            s.abort(name)
        kept = kept[-2:]
    live = {name: dict(s.gens[s.get(name).gen or 0]) for name in kept}
    s.create("last", None)
    live["last"] = dict(s.gens[s.get("last").gen or 0])
    base_dir = tmp_path / "state" / "fuse" / "base"
    files = os.listdir(base_dir)
    assert len(files) <= MAX_GEN_CHAIN + 2, sorted(files)
    deltas = [f for f in files if (base_dir / f).read_text().startswith('{"parent"')]
    assert deltas, "no generation was written as a delta"
    s.close()
    s2 = _store(tmp_path)
    for name, manifest in live.items():
        assert s2.gens[s2.get(name).gen or 0] == manifest, name
    # the last snapshot is the base as it is on disk
    assert set(live["last"]) == {
        os.path.relpath(os.path.join(d, n), repo)
        for d, dirs, fs in os.walk(repo) for n in [*dirs, *fs]}
    s2.close()
