"""Benchmark of the FUSE backend (the default), end to end through the public API.

    .venv/bin/python bench/bench_fuse.py [--sizes 100,1000,10000,100000] [--json out.json]

Every FUSE number is taken with ``ba.open_workspace(tree, backend="fuse")``
and the public branch calls (``fork``, ``commit``, ``abort``) or plain file
I/O on ``branch.path``, beside baselines measured in the same run on the
same trees:

- native: the plain tree (the filesystem of ``--dir``);
- overlay: kernel overlayfs, the tree as ``lowerdir`` and a fresh
  ``upperdir`` (mounted and unmounted in-process with mount(2)/umount2(2),
  so no ``mount`` exec is counted; needs root);
- ``cp -a tree copy`` and ``git worktree add --detach`` (fork), ``rm -rf``
  and ``git worktree remove --force`` (discard).

Sections: fork (and abort) latency on trees of 100 ... 100k files; commit of
one file of 1/10/100/1000 KB and of 1/100/1000 changed small files; a 200 MB
sequential read (cold: first read after the fork or mount; cached: second
read) and write, 4 KiB and 1 MiB blocks; a walk + lstat of a 10k-file tree,
create and unlink of 10k files, ``git status`` on a 10k-file repository;
forks nested 1/4/16/32 deep and a read at the deepest level.

Each sample is timed with ``time.perf_counter_ns`` around the one operation;
setup (writing the files to commit, generating trees) is outside. The output
is Markdown tables (median and p95) plus the machine's facts and the load
average at start and end; ``--json`` writes every sample too.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import attrs
import structlog

if __package__ in (None, ""):  # run as a script: make ``bench._util`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._util import (
    GIT_ENV,
    SMALL_MAX,
    SMALL_MIN,
    Stats,
    git,
    machine_facts,
    machine_line,
    make_tree,
    remove_tree,
    stats,
)

import branchagent as ba

Log = Callable[[str], None]
MB = 1_000_000
BIG_BYTES = 200 * MB
KIB = 1024
MIB = 1024 * 1024


@attrs.define
class Samples:
    """Timing samples in nanoseconds, by key."""

    data: dict[str, list[int]] = attrs.Factory(dict)

    def add(self, key: str, ns: int) -> None:
        self.data.setdefault(key, []).append(ns)

    def stats(self, key: str) -> Stats | None:
        got = self.data.get(key)
        return stats(got) if got else None


# -- trees -----------------------------------------------------------------------------


def fast_tree(root: Path, n: int, *, seed: int = 0) -> list[str]:
    """``n`` small files (100 B-8 KiB) in ``pkgNN/modNN/subNN`` dirs, ~10 a dir, by os calls."""
    rnd = random.Random(seed)
    blob = rnd.randbytes(64 * KIB)
    fan = max(2, round((n / 10) ** (1 / 3)))
    leaves = [f"pkg{a:02d}/mod{b:02d}/sub{c:02d}"
              for a in range(fan) for b in range(fan) for c in range(fan)]
    root.mkdir(parents=True)
    made: set[str] = set()
    rels: list[str] = []
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    for i in range(n):
        d = leaves[i % len(leaves)]
        if d not in made:
            os.makedirs(root / d, exist_ok=True)
            made.add(d)
        rel = f"{d}/file{i:06d}.py"
        size = rnd.randint(SMALL_MIN, SMALL_MAX)
        off = rnd.randrange(0, len(blob) - size)
        fd = os.open(root / rel, flags, 0o644)
        os.write(fd, blob[off:off + size])
        os.close(fd)
        rels.append(rel)
    return rels


def _write_file(path: Path, size: int, block: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        left = size
        while left > 0:
            n = min(block, left)
            left -= os.write(fd, view[:n])
    finally:
        os.close(fd)


def _read_file(path: Path, block: int) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    total = 0
    try:
        buf = bytearray(block)
        while True:
            n = os.readv(fd, [buf])
            if n == 0:
                return total
            total += n
    finally:
        os.close(fd)


def _drop_native_cache(path: Path) -> None:
    """Evict ``path`` from the page cache where the filesystem allows (not tmpfs)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _walk_lstat(root: Path) -> int:
    count = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.lstat(os.path.join(dirpath, name))
            count += 1
    return count


def _list_entries(root: Path) -> list[str]:
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        out += [os.path.normpath(os.path.join(rel, n)) for n in dirnames + filenames]
    return out


def _lstat_all(root: Path, rels: Sequence[str]) -> None:
    for rel in rels:
        os.lstat(os.path.join(root, rel))


def _create_files(d: Path, n: int) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    for i in range(n):
        os.close(os.open(d / f"c{i:05d}", flags, 0o644))


def _unlink_files(d: Path, n: int) -> None:
    for i in range(n):
        os.unlink(d / f"c{i:05d}")


def _timed(fn: Callable[..., object], *args: Any) -> int:
    t0 = time.perf_counter_ns()
    fn(*args)
    return time.perf_counter_ns() - t0


def _run_quiet(argv: Sequence[str], cwd: Path | None = None) -> None:
    subprocess.run(argv, check=True, cwd=cwd, env=GIT_ENV, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


def _make_git_repo(tree: Path, repo: Path) -> None:
    subprocess.run(["cp", "-a", os.fspath(tree), os.fspath(repo)], check=True)
    git("-c", "init.defaultBranch=main", "init", "-q", cwd=repo)
    git("add", "-A", cwd=repo)
    git("-c", "commit.gpgsign=false", "-c", "gc.auto=0", "commit", "-q", "-m", "tree", cwd=repo)


# -- kernel overlayfs, in-process ------------------------------------------------------


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
MNT_DETACH = 2


@attrs.define
class Overlay:
    """One overlay mount: ``lowers`` (top first) under a fresh upper, at ``merged``."""

    base: Path
    lowers: list[Path]
    upper: Path = attrs.field(init=False)
    work: Path = attrs.field(init=False)
    merged: Path = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.upper, self.work, self.merged = (self.base / "u", self.base / "w", self.base / "m")

    def mount(self) -> None:
        """mkdir upper/work/merged + mount(2): what "forking" costs with overlayfs."""
        os.mkdir(self.base)
        for d in (self.upper, self.work, self.merged):
            os.mkdir(d)
        lower = ":".join(os.fspath(p) for p in self.lowers)
        opts = f"lowerdir={lower},upperdir={self.upper},workdir={self.work}".encode()
        if _libc.mount(b"overlay", os.fsencode(self.merged), b"overlay", 0, opts) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"mount overlay: {os.strerror(err)}")

    def umount(self) -> None:
        if _libc.umount2(os.fsencode(self.merged), 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"umount overlay: {os.strerror(err)}")

    def discard(self) -> None:
        """umount2(2) + rm -rf of the upper: what "aborting" costs with overlayfs."""
        self.umount()
        shutil.rmtree(self.base)

    def merge_by_rename(self, lower: Path) -> None:
        """umount, then move every upper file into ``lower`` (the cheapest possible commit)."""
        self.umount()
        for dirpath, _dirs, files in os.walk(self.upper):
            rel = os.path.relpath(dirpath, self.upper)
            dst_dir = lower / rel
            os.makedirs(dst_dir, exist_ok=True)
            for f in files:
                os.rename(os.path.join(dirpath, f), dst_dir / f)
        shutil.rmtree(self.base)


def overlay_ok(tmp: Path) -> bool:
    try:
        (tmp / "ovl-probe-lower").mkdir()
        o = Overlay(tmp / "ovl-probe", [tmp / "ovl-probe-lower"])
        o.mount()
        o.discard()
    except OSError:
        return False
    else:
        return True
    finally:
        remove_tree(tmp / "ovl-probe-lower")
        remove_tree(tmp / "ovl-probe")


# -- the sections ----------------------------------------------------------------------


@attrs.define
class Bench:
    args: argparse.Namespace
    tmp: Path
    log: Log
    samples: Samples = attrs.Factory(Samples)
    counter: int = 0
    overlay: bool = True

    def fresh(self, kind: str) -> Path:
        self.counter += 1
        return self.tmp / "scratch" / f"{kind}-{self.counter}"

    def ovl(self, lowers: list[Path]) -> Overlay:
        return Overlay(self.fresh("ovl"), lowers)

    # fork scaling ------------------------------------------------------------------------

    async def fork_scale(self, n: int) -> None:
        s, k = self.samples, f"scale/{n}"
        root = self.tmp / f"tree-{n}"
        t0 = time.monotonic()
        fast_tree(root, n, seed=self.args.seed + n)
        self.log(f"{n} files: tree in {time.monotonic() - t0:.1f} s; git repository ...")
        repo = self.tmp / f"repo-{n}"
        git_ok = n <= self.args.git_max
        if git_ok:
            _make_git_repo(root, repo)
        reps = self.args.fork_repeat
        copy_reps = max(2, min(reps, 50_000 // n))
        async with ba.open_workspace(root, backend="fuse") as ws:
            b = await ws.fork()  # warm-up
            await b.abort()
            for i in range(reps):
                t0 = time.perf_counter_ns()
                b = await ws.fork()
                s.add(f"{k}/fuse_fork", time.perf_counter_ns() - t0)
                server_ns(s, f"{k}/fuse_fork_server", ws)
                os.stat(b.path / "pkg00")  # the branch is usable
                t0 = time.perf_counter_ns()
                await b.abort()
                s.add(f"{k}/fuse_abort", time.perf_counter_ns() - t0)
                if self.overlay:
                    o = self.ovl([root])
                    s.add(f"{k}/ovl_mount", _timed(o.mount))
                    os.stat(o.merged / "pkg00")
                    s.add(f"{k}/ovl_discard", _timed(o.discard))
                d = self.fresh("mkdir")
                s.add(f"{k}/mkdir", _timed(os.mkdir, d))
                os.rmdir(d)
                if i < copy_reps:
                    dst = self.fresh("cp")
                    s.add(f"{k}/cp_a", _timed(
                        _run_quiet, ["cp", "-a", os.fspath(root), os.fspath(dst)]))
                    s.add(f"{k}/rm_rf", _timed(shutil.rmtree, dst))
                    if git_ok:
                        wt = self.fresh("wt")
                        s.add(f"{k}/wt_add", _timed(
                            _run_quiet, ["git", "-C", os.fspath(repo), "-c", "gc.auto=0",
                                         "worktree", "add", "--detach", "-q", os.fspath(wt),
                                         "HEAD"]))
                        s.add(f"{k}/wt_remove", _timed(
                            _run_quiet, ["git", "-C", os.fspath(repo), "worktree", "remove",
                                         "--force", os.fspath(wt)]))
            # A write into the base from outside makes the next top-level fork rescan it.
            for i in range(self.args.dirty_repeat):
                (root / f"outside-{i}.txt").write_bytes(b"written beside the workspace\n")
                t0 = time.perf_counter_ns()
                b = await ws.fork()
                s.add(f"{k}/fuse_fork_dirty", time.perf_counter_ns() - t0)
                await b.abort()
        remove_tree(repo)
        if n != self.args.files:
            remove_tree(root)

    # commit ------------------------------------------------------------------------------

    async def commits(self, ws: ba.Workspace, root: Path, small: Sequence[str]) -> None:
        s, rnd = self.samples, random.Random(self.args.seed)
        reps = self.args.repeat
        blob = rnd.randbytes(1000 * KIB + 1)
        cases: list[tuple[str, int, int]] = [  # key, files, bytes per file (0: small edit)
            ("1KB", 1, 1 * KIB), ("10KB", 1, 10 * KIB), ("100KB", 1, 100 * KIB),
            ("1000KB", 1, 1000 * KIB), ("small1", 1, 0), ("small100", 100, 0),
            ("small1000", 1000, 0)]

        def write_set(base: Path, tag: str, files: int, size: int) -> list[tuple[str, bytes]]:
            out: list[tuple[str, bytes]] = []
            rels = ([f"bench-commit-{tag}.bin"] if size else rnd.sample(list(small), files))
            for rel in rels:
                n = size or rnd.randint(SMALL_MIN, SMALL_MAX)
                off = rnd.randrange(0, len(blob) - n)
                data = blob[off:off + n]
                _write_file(base / rel, n, MIB, data)
                out.append((rel, data))
            return out

        for r in range(reps):
            for key, files, size in cases:
                b = await ws.fork()
                written = write_set(b.path, f"{key}-{r}", files, size)
                t0 = time.perf_counter_ns()
                await b.commit()
                s.add(f"commit/{key}/fuse", time.perf_counter_ns() - t0)
                server_ns(s, f"commit/{key}/fuse_server", ws)
                rel, data = written[-1]
                if (root / rel).read_bytes() != data:
                    raise AssertionError(f"commit did not reach the base: {rel}")
                # native floor: the same writes straight into the tree
                native = [(rel, data) for rel, data in written]
                t0 = time.perf_counter_ns()
                for rel, data in native:
                    _write_file(root / rel, len(data), MIB, data)
                s.add(f"commit/{key}/native", time.perf_counter_ns() - t0)
                if self.overlay:
                    o = self.ovl([root])
                    o.mount()
                    write_set(o.merged, f"{key}-{r}-o", files, size)
                    s.add(f"commit/{key}/ovl", _timed(o.merge_by_rename, root))
            b = await ws.fork()
            write_set(b.path, f"abort-{r}", 1, 0)
            t0 = time.perf_counter_ns()
            await b.abort()
            s.add("abort/fuse", time.perf_counter_ns() - t0)

    # sequential I/O ----------------------------------------------------------------------

    async def seq_io(self) -> None:
        s = self.samples
        root = self.tmp / "bigtree"
        root.mkdir()
        data = random.Random(self.args.seed).randbytes(BIG_BYTES)
        _write_file(root / "big.bin", BIG_BYTES, MIB, data)
        out_dir = self.tmp / "scratch" / "native-writes"
        out_dir.mkdir()
        async with ba.open_workspace(root, backend="fuse") as ws:
            for r in range(self.args.io_repeat):
                self.log(f"sequential I/O round {r + 1}/{self.args.io_repeat}")
                for bs, bname in ((4 * KIB, "4KiB"), (MIB, "1MiB")):
                    k = f"io/{bname}"
                    # native
                    _drop_native_cache(root / "big.bin")
                    s.add(f"{k}/read_cold/native", _timed(_read_file, root / "big.bin", bs))
                    s.add(f"{k}/read_cached/native",
                          _timed(_read_file, root / "big.bin", bs))
                    s.add(f"{k}/write/native",
                          _timed(_write_file, out_dir / "w.bin", BIG_BYTES, bs, data))
                    os.unlink(out_dir / "w.bin")
                    # overlay
                    if self.overlay:
                        o = self.ovl([root])
                        o.mount()
                        p = o.merged / "big.bin"
                        s.add(f"{k}/read_cold/ovl", _timed(_read_file, p, bs))
                        s.add(f"{k}/read_cached/ovl", _timed(_read_file, p, bs))
                        w = o.merged / "w.bin"
                        s.add(f"{k}/write/ovl",
                              _timed(_write_file, w, BIG_BYTES, bs, data))
                        o.discard()
                    # FUSE
                    b = await ws.fork()
                    p = b.path / "big.bin"
                    s.add(f"{k}/read_cold/fuse", _timed(_read_file, p, bs))
                    s.add(f"{k}/read_cached/fuse", _timed(_read_file, p, bs))
                    w = b.path / "w.bin"
                    s.add(f"{k}/write/fuse", _timed(_write_file, w, BIG_BYTES, bs, data))
                    await b.abort()
        del data
        remove_tree(root)

    # metadata: stat, create/unlink ---------------------------------------------------------

    async def metadata(self, ws: ba.Workspace, root: Path) -> None:
        s, n = self.samples, self.args.create
        rels = _list_entries(root)
        for r in range(self.args.meta_repeat):
            # native
            s.add("stat_cold/native", _timed(_walk_lstat, root))
            s.add("stat_cached/native", _timed(_walk_lstat, root))
            s.add("lstat_only/native", _timed(_lstat_all, root, rels))
            d = self.fresh("create")
            d.mkdir()
            s.add("create/native", _timed(_create_files, d, n))
            s.add("unlink/native", _timed(_unlink_files, d, n))
            d.rmdir()
            if self.overlay:
                o = self.ovl([root])
                o.mount()
                m = o.merged
                s.add("stat_cold/ovl", _timed(_walk_lstat, m))
                s.add("stat_cached/ovl", _timed(_walk_lstat, m))
                s.add("lstat_only/ovl", _timed(_lstat_all, m, rels))
                (m / "created").mkdir()
                s.add("create/ovl", _timed(_create_files, m / "created", n))
                s.add("unlink/ovl", _timed(_unlink_files, m / "created", n))
                o.discard()
            b = await ws.fork()
            p = b.path
            s.add("stat_cold/fuse", _timed(_walk_lstat, p))
            s.add("stat_cached/fuse", _timed(_walk_lstat, p))
            s.add("lstat_only/fuse", _timed(_lstat_all, p, rels))
            (p / f"created-{r}").mkdir()
            s.add("create/fuse", _timed(_create_files, p / f"created-{r}", n))
            s.add("unlink/fuse", _timed(_unlink_files, p / f"created-{r}", n))
            await b.abort()

    async def git_status(self, root: Path) -> None:
        s = self.samples
        repo = self.tmp / "status-repo"
        _make_git_repo(root, repo)
        argv = ["git", "-c", "gc.auto=0", "status", "--porcelain"]

        def status(where: Path, key: str) -> None:
            s.add(f"git_status_first/{key}", _timed(_run_quiet, argv, where))
            s.add(f"git_status/{key}", _timed(_run_quiet, argv, where))

        async with ba.open_workspace(repo, backend="fuse") as ws:
            for _ in range(self.args.meta_repeat):
                status(repo, "native")
                if self.overlay:
                    o = self.ovl([repo])
                    o.mount()
                    status(o.merged, "ovl")
                    o.discard()
                b = await ws.fork()
                status(b.path, "fuse")
                await b.abort()
        remove_tree(repo)

    # nesting -----------------------------------------------------------------------------

    async def nested(self, ws: ba.Workspace, root: Path) -> None:
        s = self.samples
        probe = root / "depth-probe.bin"
        _write_file(probe, MIB, MIB, random.Random(1).randbytes(MIB))
        b = await ws.fork()  # untimed: this first fork rescans the base (outside write)
        await b.abort()
        for depth in self.args.depths:
            for _ in range(self.args.nest_repeat):
                t0 = time.perf_counter_ns()
                top = b = await ws.fork()
                dt = time.perf_counter_ns() - t0
                for level in range(2, depth + 1):
                    (b.path / f"level-{level}").write_bytes(b"x")
                    t0 = time.perf_counter_ns()
                    b = await b.fork()
                    dt = time.perf_counter_ns() - t0
                s.add(f"nest/{depth}/fuse_fork", dt)
                p = b.path / "depth-probe.bin"
                s.add(f"nest/{depth}/fuse_read", _timed(_read_file, p, MIB))
                s.add(f"nest/{depth}/fuse_stat", _timed(os.stat, b.path / "top0.md"))
                await top.abort()
                if self.overlay:
                    layers = []
                    for level in range(2, depth + 1):
                        ld = self.fresh("layer")
                        ld.mkdir()
                        (ld / f"level-{level}").write_bytes(b"x")
                        layers.append(ld)
                    o = self.ovl([*reversed(layers), root])
                    s.add(f"nest/{depth}/ovl_mount", _timed(o.mount))
                    q = o.merged / "depth-probe.bin"
                    s.add(f"nest/{depth}/ovl_read", _timed(_read_file, q, MIB))
                    s.add(f"nest/{depth}/ovl_stat",
                          _timed(os.stat, o.merged / "top0.md"))
                    o.discard()
                    for ld in layers:
                        shutil.rmtree(ld)
        probe.unlink()


    # sparse copy-up ----------------------------------------------------------------------

    async def copy_up(self) -> None:
        """A 4 KiB write into the middle of a 200 MB file: what the first write costs,
        how much the branch stores, and what commit and abort cost afterwards."""
        s = self.samples
        root = self.tmp / "cowtree"
        root.mkdir()
        data = random.Random(self.args.seed + 1).randbytes(BIG_BYTES)
        _write_file(root / "big.bin", BIG_BYTES, MIB, data)
        del data
        patch = b"P" * (4 * KIB)
        off = BIG_BYTES // 2 + 1000

        def first_write(path: Path) -> None:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.pwrite(fd, patch, off)
            finally:
                os.close(fd)

        async with ba.open_workspace(root, backend="fuse") as ws:
            layers = ws.state_dir / "fuse" / "layers"
            for r in range(self.args.io_repeat + 2):
                for end in ("abort", "commit"):
                    b = await ws.fork()
                    s.add("cow/fuse_write", _timed(first_write, b.path / "big.bin"))
                    s.add("cow/fuse_stored", _stored(layers) * 1_000_000)  # bytes, as "ns"
                    t0 = time.perf_counter_ns()
                    if end == "commit":
                        await b.commit()
                    else:
                        await b.abort()
                    s.add(f"cow/fuse_{end}", time.perf_counter_ns() - t0)
                s.add("cow/native_write", _timed(first_write, root / "big.bin"))
                if self.overlay:
                    o = self.ovl([root])
                    o.mount()
                    s.add("cow/ovl_write", _timed(first_write, o.merged / "big.bin"))
                    s.add("cow/ovl_stored", _stored(o.upper) * 1_000_000)
                    s.add("cow/ovl_commit", _timed(o.merge_by_rename, root))
                if r == 0:
                    self.log(f"copy-up round done ({2 + self.args.io_repeat} rounds)")
        remove_tree(root)


def server_ns(s: Samples, key: str, ws: ba.Workspace) -> None:
    """Record the FUSE server's own time for the last request (its critical section)."""
    ns = getattr(ws.backend, "last_server_ns", None)
    if isinstance(ns, int):
        s.add(key, ns)


def _stored(tree: Path) -> int:
    """Bytes allocated under ``tree`` (st_blocks: holes do not count)."""
    total = 0
    for d, _dirs, files in os.walk(tree):
        for n in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(d, n)).st_blocks * 512
    return total


def _quiet_logs() -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


async def bench_main(args: argparse.Namespace, tmp: Path, log: Log) -> Samples:
    (tmp / "scratch").mkdir()
    bench = Bench(args, tmp, log)
    bench.overlay = overlay_ok(tmp)
    if not bench.overlay:
        log("warning: kernel overlayfs cannot be mounted here (not root?); no overlay baseline")
    for n in sorted(set(args.sizes)):
        log(f"fork at {n} files ...")
        await bench.fork_scale(n)
    log(f"main tree: {args.files} files (bench._util.make_tree) ...")
    tree = make_tree(tmp / "tree", args.files, seed=args.seed)
    async with ba.open_workspace(tree.root, backend="fuse") as ws:
        log("commits ...")
        await bench.commits(ws, tree.root, tree.small_paths)
        log("stat / create / unlink ...")
        await bench.metadata(ws, tree.root)
        log("nested forks ...")
        await bench.nested(ws, tree.root)
    log("git status ...")
    await bench.git_status(tree.root)
    log("sequential I/O ...")
    await bench.seq_io()
    log("copy-up of a 4 KiB write into a 200 MB file ...")
    await bench.copy_up()
    return bench.samples


# -- report ----------------------------------------------------------------------------


def _fmt(ms: float) -> str:
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def _mp(s: Stats | None) -> str:
    return "- | -" if s is None else f"{_fmt(s.median_ms)} | {_fmt(s.p95_ms)}"


def _ratio(a: Stats | None, b: Stats | None) -> str:
    if a is None or b is None or b.median_ms <= 0:
        return "-"
    return f"{a.median_ms / b.median_ms:.1f}x"


def _mbs(s: Stats | None) -> str:
    return "-" if s is None else f"{BIG_BYTES / 1e6 / (s.median_ms / 1e3):,.0f}"


def render(facts: dict[str, str], s: Samples, args: argparse.Namespace, seconds: float,
           load: tuple[tuple[float, ...], tuple[float, ...]]) -> str:
    la = "/".join(f"{x:.2f}" for x in load[0])
    lb = "/".join(f"{x:.2f}" for x in load[1])
    g = s.stats
    out = [
        f"Machine: {machine_line(facts)}. Load average (1/5/15 min) {la} at start, "
        f"{lb} at end; run took {seconds:.0f} s. Times in ms.",
        "",
        "Fork (and discard) against tree size; FUSE = `await ws.fork()` / `await b.abort()`, "
        "overlay = mkdir upper/work/merged + mount(2) / umount2(2) + rm -rf:",
        "",
        "| files | FUSE fork median | p95 | in-server median | p95 "
        "| overlay mount median | p95 | `cp -a` median | p95 "
        "| `git worktree add` median | p95 | `os.mkdir` median | FUSE abort median | p95 "
        "| overlay discard median | `rm -rf` median | `git worktree remove` median "
        "| FUSE fork after an outside write into the base, median |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in sorted(set(args.sizes)):
        k = f"scale/{n}"
        mk, ovd, rm, wtr, dirty = (g(f"{k}/{x}") for x in ("mkdir", "ovl_discard", "rm_rf",
                                                            "wt_remove", "fuse_fork_dirty"))
        out.append(
            f"| {n:,} | {_mp(g(f'{k}/fuse_fork'))} | {_mp(g(f'{k}/fuse_fork_server'))} "
            f"| {_mp(g(f'{k}/ovl_mount'))} "
            f"| {_mp(g(f'{k}/cp_a'))} | {_mp(g(f'{k}/wt_add'))} "
            f"| {_fmt(mk.median_ms) if mk else '-'} | {_mp(g(f'{k}/fuse_abort'))} "
            f"| {_fmt(ovd.median_ms) if ovd else '-'} | {_fmt(rm.median_ms) if rm else '-'} "
            f"| {_fmt(wtr.median_ms) if wtr else '-'} "
            f"| {_fmt(dirty.median_ms) if dirty else '-'} |")
    out += [
        "",
        f"Commit into the base ({args.files:,}-file tree): FUSE = `await b.commit()`; native = "
        "the same writes straight into the tree; overlay = umount2(2), then rename every upper "
        "file into the tree (the cheapest overlay commit):",
        "",
        "| change | FUSE commit median | p95 | in-server median | p95 | native write median "
        "| p95 | overlay merge median | p95 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    labels = [("1KB", "one new 1 KB file"), ("10KB", "one new 10 KB file"),
              ("100KB", "one new 100 KB file"), ("1000KB", "one new 1000 KB file"),
              ("small1", "1 small file edited"), ("small100", "100 small files edited"),
              ("small1000", "1,000 small files edited")]
    for key, label in labels:
        out.append(f"| {label} | {_mp(g(f'commit/{key}/fuse'))} "
                   f"| {_mp(g(f'commit/{key}/fuse_server'))} | {_mp(g(f'commit/{key}/native'))} "
                   f"| {_mp(g(f'commit/{key}/ovl'))} |")
    out.append(f"| abort (1 small file edited) | {_mp(g('abort/fuse'))} | | | | | | |")
    out += [
        "",
        "Sequential 200 MB file (MB/s from the median; cold = first read after the fork or "
        "mount, cached = second read; native cold is after fadvise(DONTNEED), a no-op on "
        "tmpfs):",
        "",
        "| op | block | native MB/s | overlay MB/s | FUSE MB/s | FUSE / native "
        "| FUSE median ms | p95 |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for op in ("read_cold", "read_cached", "write"):
        for bname in ("4KiB", "1MiB"):
            k = f"io/{bname}/{op}"
            nat, ovl, fu = g(f"{k}/native"), g(f"{k}/ovl"), g(f"{k}/fuse")
            pct = "-" if nat is None or fu is None else f"{100 * nat.median_ms / fu.median_ms:.0f}%"
            out.append(f"| {op.replace('_', ' ')} | {bname} | {_mbs(nat)} | {_mbs(ovl)} "
                       f"| {_mbs(fu)} | {pct} | {_mp(fu)} |")
    out += [
        "",
        f"Metadata on the {args.files:,}-file tree (walk + lstat of every entry; create and "
        f"unlink of {args.create:,} empty files; `git status --porcelain` in a fresh branch or "
        "mount, second run):",
        "",
        "| op | native median | p95 | overlay median | p95 | FUSE median | p95 | FUSE / native |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, label in (("stat_cold", "walk + lstat, first"),
                       ("stat_cached", "walk + lstat, second"),
                       ("lstat_only", "lstat of the known paths, after the walks (no readdir)"),
                       ("create", "create"),
                       ("unlink", "unlink"),
                       ("git_status_first", "`git status`, first run"),
                       ("git_status", "`git status`, second run")):
        nat, fu = g(f"{key}/native"), g(f"{key}/fuse")
        out.append(f"| {label} | {_mp(nat)} | {_mp(g(f'{key}/ovl'))} | {_mp(fu)} "
                   f"| {_ratio(fu, nat)} |")
    out += [
        "",
        "Nested forks (fork = creating the deepest level; read = 1 MiB base file, first read at "
        "the deepest level; overlay = one lowerdir per level):",
        "",
        "| depth | FUSE fork median | p95 | FUSE read median | p95 | FUSE stat median "
        "| overlay mount median | overlay read median | overlay stat median |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for d in args.depths:
        k = f"nest/{d}"
        fs_, om, orr, os_ = (g(f"{k}/{x}") for x in ("fuse_stat", "ovl_mount", "ovl_read",
                                                     "ovl_stat"))
        out.append(f"| {d} | {_mp(g(f'{k}/fuse_fork'))} | {_mp(g(f'{k}/fuse_read'))} "
                   f"| {_fmt(fs_.median_ms) if fs_ else '-'} "
                   f"| {_fmt(om.median_ms) if om else '-'} | {_fmt(orr.median_ms) if orr else '-'} "
                   f"| {_fmt(os_.median_ms) if os_ else '-'} |")
    fw, ow, nw = g("cow/fuse_write"), g("cow/ovl_write"), g("cow/native_write")
    fs_, os2 = g("cow/fuse_stored"), g("cow/ovl_stored")
    out += [
        "",
        "Copy-up: open + one 4 KiB pwrite into the middle of a 200 MB base file, in a fresh "
        "FUSE branch (sparse copy-up), in a fresh overlay mount (whole-file copy-up) and "
        "natively; stored = bytes allocated in the branch's layers / the overlay's upperdir "
        "afterwards; then FUSE commit (which fills the rest of the file) or abort:",
        "",
        "| | FUSE median | p95 | overlay median | p95 | native median | p95 |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| first 4 KiB write, ms | {_mp(fw)} | {_mp(ow)} | {_mp(nw)} |",
        f"| stored, KiB | {_kib(fs_)} | | {_kib(os2)} | | | |",
        f"| then commit, ms | {_mp(g('cow/fuse_commit'))} | {_mp(g('cow/ovl_commit'))} | | |",
        f"| then abort, ms | {_mp(g('cow/fuse_abort'))} | | | | | |",
    ]
    return "\n".join(out)


def _kib(st: Stats | None) -> str:
    return "-" if st is None else f"{st.median_ms / 1024:,.0f}"  # stored as bytes * 1e6 "ns"


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--sizes", type=_ints, default=[100, 1000, 10_000, 100_000],
                   help="tree sizes for the fork scaling (100,1000,10000,100000)")
    p.add_argument("--files", type=int, default=10_000,
                   help="files in the tree for commit/metadata/nesting/git status (10000)")
    p.add_argument("--fork-repeat", type=int, default=30, help="forks per tree size (30)")
    p.add_argument("--dirty-repeat", type=int, default=3,
                   help="forks after an outside write into the base, per tree size (3)")
    p.add_argument("--git-max", type=int, default=100_000,
                   help="largest tree to get a git worktree baseline (100000)")
    p.add_argument("--repeat", type=int, default=10, help="commits per case (10)")
    p.add_argument("--io-repeat", type=int, default=3, help="sequential I/O rounds (3)")
    p.add_argument("--meta-repeat", type=int, default=3,
                   help="stat/create/unlink/git status rounds (3)")
    p.add_argument("--create", type=int, default=10_000, help="files to create and unlink (10000)")
    p.add_argument("--depths", type=_ints, default=[1, 4, 16, 32], help="nesting depths")
    p.add_argument("--nest-repeat", type=int, default=5, help="chains per depth (5)")
    p.add_argument("--json", type=Path, default=None, help="also write every sample here")
    p.add_argument("--dir", type=Path, default=None,
                   help="where the trees go (default: the temp dir, or /dev/shm when the temp "
                        "dir is ext4 without a journal)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = p.parse_args(argv)
    if args.files < 2000:
        p.error("--files must be at least 2000 (a commit edits 1,000 small files)")
    return args


def default_dir() -> Path:
    tmp = Path(tempfile.gettempdir())
    if machine_facts(tmp)["ext4_journal"] == "none" and os.path.isdir("/dev/shm"):
        return Path("/dev/shm")
    return tmp


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    _quiet_logs()
    base = args.dir if args.dir is not None else default_dir()
    tmp = Path(tempfile.mkdtemp(prefix="branchagent-bench-fuse-", dir=base))

    def log(msg: str) -> None:
        print(f"# {msg}", file=sys.stderr, flush=True)

    load0 = os.getloadavg()
    started = time.monotonic()
    try:
        facts = machine_facts(tmp)
        samples = anyio.run(bench_main, args, tmp, log)
    finally:
        if args.keep:
            log(f"kept {tmp}")
        else:
            remove_tree(tmp)
    seconds = time.monotonic() - started
    load1 = os.getloadavg()
    print(render(facts, samples, args, seconds, (load0, load1)))
    if args.json is not None:
        data = {
            "config": {k: (os.fspath(v) if isinstance(v, Path) else v)
                       for k, v in vars(args).items()},
            "machine": facts,
            "loadavg": {"start": load0, "end": load1},
            "seconds": seconds,
            "results": {k: {"stats": stats(v).to_json(), "samples_ms": [x / 1e6 for x in v]}
                        for k, v in samples.data.items()},
        }
        args.json.write_text(json.dumps(data, indent=1) + "\n")
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
