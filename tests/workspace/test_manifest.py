"""Manifests: change detection, conflicts, merge sets, and the racy-cache rule of scan()."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from branchagent import ChangeKind, EntryType
from branchagent import _manifest as mf
from branchagent._manifest import (
    Entry,
    HashCache,
    Manifest,
    changed_paths,
    scan,
    to_changes,
)
from branchagent._merge import find_conflicts, merge_paths


def f(digest: str, mtime: int = 1, mode: int = 0o644) -> Entry:
    return Entry(EntryType.FILE, mode, mtime_ns=mtime, size=len(digest), digest=digest)


def d(mode: int = 0o755) -> Entry:
    return Entry(EntryType.DIR, mode)


def ln(target: str) -> Entry:
    return Entry(EntryType.SYMLINK, 0o777, target=target)


def conflicts(snapshot: Manifest, ours: Manifest, theirs: Manifest) -> list[str]:
    """Conflicts the way a commit computes them: from loose change sets."""
    return find_conflicts(
        changed_paths(snapshot, ours, strict=False), ours,
        changed_paths(snapshot, theirs, strict=False), theirs,
    )


# -- Entry comparisons ----------------------------------------------------------------


def test_entry_same_equivalent_same_content() -> None:
    assert f("a", 1).same(f("a", 1))
    assert not f("a", 1).same(f("a", 2))  # a touch is a strict change
    assert f("a", 1).equivalent(f("a", 2))  # ... but not a loose one
    assert not f("a", mode=0o644).equivalent(f("a", mode=0o755))
    assert f("a", mode=0o644).same_content(f("a", mode=0o755))
    assert not f("a").same(None)
    assert not f("a").same(d())
    assert d(0o755).same(d(0o755))
    assert not d(0o755).same(d(0o700))
    assert ln("x").same(ln("x"))
    assert not ln("x").same(ln("y"))
    assert not ln("x").equivalent(f("x"))


def test_entry_json_round_trip() -> None:
    for e in (f("abc", 123, 0o600), d(0o700), ln("../t"),
              Entry(EntryType.FIFO, 0o600, uid=5, gid=6)):
        assert Entry.from_json(e.to_json()) == e


# -- changed_paths / to_changes -------------------------------------------------------


def test_changed_paths_strict_and_loose() -> None:
    before = {"same": f("s"), "touched": f("t", 1), "edited": f("e1"), "gone": f("g"),
              "chmod": f("c", mode=0o644), "dir": d(0o755)}
    after = {"same": f("s"), "touched": f("t", 2), "edited": f("e2"), "new": f("n"),
             "chmod": f("c", mode=0o755), "dir": d(0o700)}
    assert changed_paths(before, after) == {"touched", "edited", "gone", "new", "chmod", "dir"}
    assert changed_paths(before, after, strict=False) == {"edited", "gone", "new", "chmod", "dir"}


def test_to_changes_kinds() -> None:
    before = {"a": f("1"), "b": f("2"), "c": f("3", mode=0o644), "d": d(), "d/x": f("x"),
              "l": ln("a")}
    after = {"a": f("1"), "b": f("2b"), "c": f("3", mode=0o755), "d": f("now a file"),
             "e": d(), "l": ln("b")}
    got = {(c.path, c.kind, c.entry_type, c.old_type, c.metadata_only) for c in
           to_changes(before, after)}
    assert got == {
        ("b", ChangeKind.MODIFIED, EntryType.FILE, EntryType.FILE, False),
        ("c", ChangeKind.MODIFIED, EntryType.FILE, EntryType.FILE, True),
        ("d", ChangeKind.MODIFIED, EntryType.FILE, EntryType.DIR, False),
        ("d/x", ChangeKind.DELETED, EntryType.FILE, EntryType.FILE, False),
        ("e", ChangeKind.ADDED, EntryType.DIR, None, False),
        ("l", ChangeKind.MODIFIED, EntryType.SYMLINK, EntryType.SYMLINK, False),
    }
    assert [c.path for c in to_changes(before, after)] == ["b", "c", "d", "d/x", "e", "l"]


# -- find_conflicts ---------------------------------------------------------------------


def test_no_changes_no_conflicts() -> None:
    snap = {"a": f("1"), "d": d(), "d/x": f("x")}
    assert conflicts(snap, dict(snap), dict(snap)) == []


def test_disjoint_changes_do_not_conflict() -> None:
    snap = {"a": f("1"), "b": f("2")}
    assert conflicts(snap, {"a": f("1x"), "b": f("2")}, {"a": f("1"), "b": f("2y")}) == []


def test_different_edits_of_one_file_conflict() -> None:
    snap = {"a": f("1")}
    assert conflicts(snap, {"a": f("ours")}, {"a": f("theirs")}) == ["a"]


def test_same_change_on_both_sides_is_not_a_conflict() -> None:
    snap = {"a": f("1"), "gone": f("g"), "d": d()}
    ours = {"a": f("new", mtime=5), "d": d(0o700), "added": f("same"), "l": ln("t")}
    theirs = {"a": f("new", mtime=9), "d": d(0o700), "added": f("same", mtime=3), "l": ln("t")}
    assert conflicts(snap, ours, theirs) == []


def test_same_content_different_mode_conflicts() -> None:
    snap: Manifest = {}
    assert conflicts(snap, {"a": f("x", mode=0o644)}, {"a": f("x", mode=0o755)}) == ["a"]


def test_delete_against_edit_conflicts() -> None:
    snap = {"a": f("1")}
    assert conflicts(snap, {}, {"a": f("2")}) == ["a"]
    assert conflicts(snap, {"a": f("2")}, {}) == ["a"]


def test_symlink_retargeted_differently_conflicts() -> None:
    snap = {"l": ln("a")}
    assert conflicts(snap, {"l": ln("b")}, {"l": ln("c")}) == ["l"]
    assert conflicts(snap, {"l": ln("b")}, {"l": ln("b")}) == []


def test_parent_deletes_dir_while_child_adds_inside() -> None:
    snap = {"d": d(), "d/x": f("x")}
    ours = {"d": d(), "d/x": f("x"), "d/new": f("n"), "d/sub": d(), "d/sub/deep": f("deep")}
    theirs: Manifest = {}
    got = conflicts(snap, ours, theirs)
    assert {"d/new", "d/sub", "d/sub/deep"} <= set(got)
    # ... and the other way round: the child deletes, the parent adds inside.
    assert {"d/new"} <= set(conflicts(snap, theirs, ours))


def test_parent_replaces_dir_with_file_while_child_edits_inside() -> None:
    snap = {"d": d(), "d/x": f("x")}
    ours = {"d": d(), "d/x": f("x2")}
    theirs = {"d": f("now a file")}
    assert "d/x" in conflicts(snap, ours, theirs)


def test_parent_chmods_dir_while_child_adds_inside() -> None:
    snap = {"d": d(0o755), "d/x": f("x")}
    ours = {"d": d(0o755), "d/x": f("x"), "d/new": f("n")}
    theirs = {"d": d(0o700), "d/x": f("x")}
    assert conflicts(snap, ours, theirs) == []
    assert merge_paths(snap, ours, theirs, changed_paths(snap, theirs, strict=False)) == {"d/new"}


def test_a_touch_never_conflicts_and_loses_to_a_real_edit() -> None:
    snap = {"a": f("1", mtime=1)}
    ours = {"a": f("1", mtime=2)}  # touched
    theirs = {"a": f("edited", mtime=3)}  # really edited
    theirs_changed = changed_paths(snap, theirs, strict=False)
    assert conflicts(snap, ours, theirs) == []
    assert merge_paths(snap, ours, theirs, theirs_changed) == set()


def test_a_touch_survives_when_the_parent_left_the_file_alone() -> None:
    snap = {"a": f("1", mtime=1)}
    ours = {"a": f("1", mtime=2)}
    theirs = {"a": f("1", mtime=1)}
    assert merge_paths(snap, ours, theirs, changed_paths(snap, theirs, strict=False)) == {"a"}


def test_a_touch_does_not_override_a_parent_touch_with_other_content() -> None:
    snap = {"a": f("1", mtime=1)}
    ours = {"a": f("1", mtime=2)}
    theirs = {"a": f("1", mtime=5)}  # parent touched too: strict change, loose no-change
    theirs_changed = changed_paths(snap, theirs, strict=False)
    assert theirs_changed == set()
    assert merge_paths(snap, ours, theirs, theirs_changed) == {"a"}


def test_a_real_edit_beats_a_parent_touch() -> None:
    snap = {"a": f("1", mtime=1)}
    ours = {"a": f("edited", mtime=2)}
    theirs = {"a": f("1", mtime=9)}
    theirs_changed = changed_paths(snap, theirs, strict=False)
    assert conflicts(snap, ours, theirs) == []
    assert merge_paths(snap, ours, theirs, theirs_changed) == {"a"}


def test_merge_paths_includes_deletions_and_additions() -> None:
    snap = {"gone": f("g"), "d": d(), "d/x": f("x"), "keep": f("k")}
    ours = {"keep": f("k"), "new": f("n"), "nd": d(), "nd/y": f("y")}
    theirs = dict(snap)
    assert merge_paths(snap, ours, theirs, set()) == {"gone", "d", "d/x", "new", "nd", "nd/y"}


# -- scan and the racy-cache rule -------------------------------------------------------


def _tree(root: Path) -> None:
    (root / "d" / "e").mkdir(parents=True)
    (root / "d" / "e" / "deep.txt").write_text("deep")
    (root / "a.txt").write_text("hello")
    (root / "a.txt").chmod(0o600)
    (root / "link").symlink_to("d/e")
    (root / "dangling").symlink_to("nowhere")
    os.mkfifo(root / "fifo", 0o640)
    (root / "skipme").mkdir()
    (root / "skipme" / "x").write_text("x")


def test_scan_records_every_entry_type(tmp_path: Path) -> None:
    root = tmp_path / "t"
    root.mkdir()
    _tree(root)
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(os.fspath(root / "sock"))
        manifest, _ = scan(root, skip=["skipme"])
    finally:
        sock.close()
    assert set(manifest) == {"d", "d/e", "d/e/deep.txt", "a.txt", "link", "dangling", "fifo"}
    assert manifest["a.txt"].type is EntryType.FILE
    assert manifest["a.txt"].mode == 0o600
    assert manifest["a.txt"].size == 5
    assert manifest["a.txt"].digest == mf.hash_file(root / "a.txt")
    assert manifest["a.txt"].mtime_ns == os.stat(root / "a.txt").st_mtime_ns
    assert manifest["link"] == Entry(EntryType.SYMLINK, 0o777, target="d/e",
                                     uid=manifest["link"].uid, gid=manifest["link"].gid)
    assert manifest["dangling"].target == "nowhere"
    assert manifest["fifo"].type is EntryType.FIFO
    assert manifest["fifo"].mode == 0o640
    assert manifest["d"].type is EntryType.DIR


def test_scan_of_a_missing_root_is_empty(tmp_path: Path) -> None:
    manifest, cache = scan(tmp_path / "missing")
    assert manifest == {}
    assert cache.digests == {}


def test_racy_cache_sees_same_size_edit_with_restored_mtime(tmp_path: Path) -> None:
    root = tmp_path / "t"
    root.mkdir()
    target = root / "f.txt"
    target.write_bytes(b"AAAA")
    first, cache = scan(root)
    st = os.stat(target)
    target.write_bytes(b"BBBB")  # same size ...
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # ... same mtime
    assert os.stat(target).st_mtime_ns == st.st_mtime_ns
    second, _ = scan(root, cache)
    assert second["f.txt"].digest != first["f.txt"].digest
    assert second["f.txt"].digest == mf.hash_file(target)


def _key(path: Path) -> tuple[int, int, int, int]:
    st = os.stat(path)
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def test_racy_cache_distrusts_recent_ctime_even_with_the_same_stat_key(tmp_path: Path) -> None:
    """Coarse timestamps can leave the whole stat key unchanged after a write.

    The rule: a digest is reused only when ctime is older than the previous
    scan's start minus a margin. Fake the worst case: a cache entry whose stat
    key matches exactly but whose digest is stale.
    """
    root = tmp_path / "t"
    root.mkdir()
    target = root / "f.txt"
    target.write_bytes(b"new!")
    key = _key(target)
    real = mf.hash_file(target)
    started = time.time_ns()
    racy = HashCache({"f.txt": (key, "stale")}, trusted_before_ns=started - mf.RACY_MARGIN_NS)
    manifest, _ = scan(root, racy)
    assert manifest["f.txt"].digest == real
    # The same entry with a ctime older than the trusted instant is reused (the cache works).
    trusted = HashCache({"f.txt": (key, "cached")}, trusted_before_ns=key[3] + 1)
    manifest, _ = scan(root, trusted)
    assert manifest["f.txt"].digest == "cached"
    # ... unless any part of the stat key moved.
    moved = HashCache({"f.txt": ((key[0], key[1], key[2] + 1, key[3]), "cached")},
                      trusted_before_ns=key[3] + 1)
    manifest, _ = scan(root, moved)
    assert manifest["f.txt"].digest == real


def test_scan_cache_margin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "t"
    root.mkdir()
    (root / "f").write_text("x")
    before = time.time_ns()
    _, cache = scan(root)
    after = time.time_ns()
    assert before - mf.RACY_MARGIN_NS <= cache.trusted_before_ns <= after - mf.RACY_MARGIN_NS
    calls: list[str] = []
    real_hash = mf.hash_file

    def counting(path: str | os.PathLike[str]) -> str:
        calls.append(os.fspath(path))
        return real_hash(path)

    monkeypatch.setattr(mf, "hash_file", counting)
    scan(root, cache)
    assert len(calls) == 1, "a file written just now must be hashed again"
