"""Benchmark of the portable copy backend, end to end through the public API.

    .venv/bin/python bench/bench_copy.py [--files 10000] [--repeat 10] [--json out.json]

What it measures, on a generated tree (see ``_util.make_tree``), with
``ba.open_workspace(tree, backend="copy")``:

- ``await ws.fork()``; ``await b.commit()`` with one small file changed, and
  with 100 small files changed; ``await b.abort()``; ``await b.changes()``
  (the first call on a fresh branch, and a repeated call on a branch older
  than the hash cache's 2 s racy margin);
- baselines on the same tree, in the same run: ``cp -a tree copy``
  (subprocess), ``shutil.copytree``, ``git worktree add --detach`` and
  ``git worktree remove --force`` (on a git repository of the same tree),
  ``rm -rf`` of a copy, and one ``os.mkdir`` as the native floor;
- ``ws.fork()`` and ``cp -a`` at smaller trees (``--scale``), to show how
  the copy backend's fork grows with the tree.

The operations are interleaved: each round runs every operation once, in
an order rotated by one per round, so background effects (page cache,
writeback, the filesystem's inode allocator) fall on all of them alike.
Each sample is timed with ``time.perf_counter_ns`` around the one call;
preparing (editing files) and cleaning up are outside the timings. The
output is a Markdown table (median and p95) plus the machine's facts;
``--json`` writes every sample too.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

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
    Tree,
    git,
    machine_facts,
    machine_line,
    make_tree,
    remove_tree,
    stats,
)

import branchagent as ba

#: The hash cache trusts a digest only when the file's ctime is this much older
#: than the previous scan (``branchagent._manifest.RACY_MARGIN_NS``), plus slack.
RACY_WAIT_S = 2.2

Op = Callable[[], Awaitable[None]]
Log = Callable[[str], None]


@attrs.define
class Samples:
    """Timing samples in nanoseconds, by operation key."""

    data: dict[str, list[int]] = attrs.Factory(dict)

    def add(self, key: str, ns: int) -> None:
        self.data.setdefault(key, []).append(ns)

    def stats(self, key: str) -> Stats | None:
        got = self.data.get(key)
        return stats(got) if got else None


# -- synchronous helpers (blocking work kept out of the async functions) --------


def _edit(root: Path, rels: Sequence[str], rnd: random.Random) -> bytes:
    """Overwrite each of ``rels`` under ``root`` with new small content; return the last."""
    data = b""
    for rel in rels:
        data = rnd.randbytes(rnd.randint(SMALL_MIN, SMALL_MAX))
        (root / rel).write_bytes(data)
    return data


def _check_committed(root: Path, rel: str, data: bytes) -> None:
    if (root / rel).read_bytes() != data:
        raise AssertionError(f"commit did not reach the base: {rel}")


def _timed_run(argv: Sequence[str], *, env: dict[str, str] | None = None) -> int:
    t0 = time.perf_counter_ns()
    subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter_ns() - t0


def _timed_copytree(src: Path, dst: Path) -> int:
    t0 = time.perf_counter_ns()
    shutil.copytree(src, dst, symlinks=True)
    return time.perf_counter_ns() - t0


def _timed_rmtree(path: Path) -> int:
    t0 = time.perf_counter_ns()
    shutil.rmtree(path)
    return time.perf_counter_ns() - t0


def _timed_mkdirs(base: Path, count: int) -> list[int]:
    out: list[int] = []
    for i in range(count):
        d = base / f"mkdir-{i}"
        t0 = time.perf_counter_ns()
        os.mkdir(d)
        out.append(time.perf_counter_ns() - t0)
        os.rmdir(d)
    return out


def _make_git_repo(tree: Path, repo: Path) -> None:
    """A git repository holding ``tree``'s content, committed (untimed setup)."""
    subprocess.run(["cp", "-a", os.fspath(tree), os.fspath(repo)], check=True)
    git("-c", "init.defaultBranch=main", "init", "-q", cwd=repo)
    git("add", "-A", cwd=repo)
    git("-c", "commit.gpgsign=false", "-c", "gc.auto=0", "commit", "-q", "-m", "tree", cwd=repo)


def _git_argv(repo: Path, *args: str) -> list[str]:
    return ["git", "-C", os.fspath(repo), "-c", "gc.auto=0", *args]


# -- the copy-backend run on one tree ------------------------------------------


@attrs.frozen
class ScalePoint:
    """Fork and ``cp -a`` timings on a tree of ``files`` files."""

    files: int
    fork: Stats
    cp_a: Stats
    samples: dict[str, list[int]]


@attrs.frozen
class Outcome:
    """Everything one run measured."""

    tree: Tree
    samples: Samples
    scale: list[ScalePoint]
    seconds: float


@attrs.define
class CopyRun:
    """Every operation of one round, on one tree, sharing one workspace."""

    ws: ba.Workspace
    tree: Tree
    scratch: Path
    git_repo: Path
    samples: Samples
    rnd: random.Random
    committed_since_fork: bool = False
    counter: int = 0

    def _dst(self, kind: str) -> Path:
        self.counter += 1
        return self.scratch / f"{kind}-{self.counter}"

    async def _fork(self) -> ba.WorkspaceBranch:
        t0 = time.perf_counter_ns()
        b = await self.ws.fork()
        dt = time.perf_counter_ns() - t0
        self.samples.add("fork", dt)
        self.samples.add("fork_after_commit" if self.committed_since_fork else "fork_other", dt)
        self.committed_since_fork = False
        return b

    async def fork_changes_abort(self) -> None:
        b = await self._fork()
        _edit(b.path, self.rnd.sample(self.tree.small_paths, 1), self.rnd)
        t0 = time.perf_counter_ns()
        changes = await b.changes()
        self.samples.add("changes_first", time.perf_counter_ns() - t0)
        if len(changes) != 1:
            raise AssertionError(f"expected one change, got {changes}")
        t0 = time.perf_counter_ns()
        await b.abort()
        self.samples.add("abort", time.perf_counter_ns() - t0)

    async def _fork_edit_commit(self, count: int, key: str) -> None:
        b = await self._fork()
        rels = self.rnd.sample(self.tree.small_paths, count)
        last = _edit(b.path, rels, self.rnd)
        t0 = time.perf_counter_ns()
        await b.commit()
        self.samples.add(key, time.perf_counter_ns() - t0)
        self.committed_since_fork = True
        _check_committed(self.tree.root, rels[-1], last)

    async def fork_commit_1(self) -> None:
        await self._fork_edit_commit(1, "commit_1")

    async def fork_commit_100(self) -> None:
        await self._fork_edit_commit(100, "commit_100")

    async def cp_a(self) -> None:
        dst = self._dst("cp")
        argv = ["cp", "-a", os.fspath(self.tree.root), os.fspath(dst)]
        self.samples.add("cp_a", _timed_run(argv))
        self.samples.add("rm_rf", _timed_rmtree(dst))

    async def copytree(self) -> None:
        dst = self._dst("copytree")
        self.samples.add("copytree", _timed_copytree(self.tree.root, dst))
        remove_tree(dst)

    async def git_worktree(self) -> None:
        dst = self._dst("worktree")
        add = _git_argv(self.git_repo, "worktree", "add", "--detach", "-q", os.fspath(dst), "HEAD")
        self.samples.add("git_worktree_add", _timed_run(add, env=GIT_ENV))
        rm = _git_argv(self.git_repo, "worktree", "remove", "--force", os.fspath(dst))
        self.samples.add("git_worktree_remove", _timed_run(rm, env=GIT_ENV))

    async def mkdir(self) -> None:
        for ns in _timed_mkdirs(self.scratch, 5):
            self.samples.add("mkdir", ns)

    def ops(self) -> list[Op]:
        return [self.fork_changes_abort, self.fork_commit_1, self.fork_commit_100,
                self.cp_a, self.copytree, self.git_worktree, self.mkdir]

    async def warm_changes(self, repeat: int) -> None:
        """``changes()`` repeated on a branch older than the racy margin (cache warm)."""
        b = await self.ws.fork()
        _edit(b.path, self.rnd.sample(self.tree.small_paths, 1), self.rnd)
        await anyio.sleep(RACY_WAIT_S)
        await b.changes()  # fills the branch's hash cache
        for _ in range(repeat):
            t0 = time.perf_counter_ns()
            await b.changes()
            self.samples.add("changes_warm", time.perf_counter_ns() - t0)
        await b.abort()


def _quiet_logs() -> None:
    """branchagent logs every fork/commit at INFO through structlog; keep them out of the output."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


async def _settle(since: float) -> None:
    """Wait until files written at ``since`` are older than the hash cache's racy margin."""
    left = RACY_WAIT_S - (time.monotonic() - since)
    if left > 0:
        await anyio.sleep(left)


async def bench_main(args: argparse.Namespace, tmp: Path, log: Log) -> Outcome:
    samples = Samples()
    rnd = random.Random(args.seed)
    log(f"generating a tree of {args.files} files in {tmp} ...")
    tree = make_tree(tmp / "tree", args.files, seed=args.seed)
    repo = tmp / "git-repo"
    log("making its git repository (git init, add, commit) ...")
    _make_git_repo(tree.root, repo)
    made = time.monotonic()
    scratch = tmp / "scratch"
    scratch.mkdir()
    started = time.monotonic()
    async with ba.open_workspace(tree.root, backend="copy") as ws:
        run = CopyRun(ws, tree, scratch, repo, Samples(), rnd)
        await _settle(made)
        # Warm-up (untimed): page cache, the base's hash cache, first subprocesses.
        b = await ws.fork()
        await b.abort()
        await run.cp_a()
        await run.git_worktree()
        run.samples = samples
        ops = run.ops()
        for r in range(args.repeat):
            log(f"round {r + 1}/{args.repeat} ({time.monotonic() - started:.0f} s)")
            k = r % len(ops)
            for op in ops[k:] + ops[:k]:
                await op()
        log("changes() on a settled branch ...")
        await run.warm_changes(args.repeat)
    git("worktree", "prune", cwd=repo)

    scale = [ScalePoint(args.files, stats(samples.data["fork"]), stats(samples.data["cp_a"]), {})]
    for n in sorted(set(args.scale) - {args.files}):
        log(f"fork at {n} files ...")
        scale.append(await _scale_point(n, args, tmp))
    scale.sort(key=lambda p: p.files)
    return Outcome(tree, samples, scale, time.monotonic() - started)


async def _scale_point(n: int, args: argparse.Namespace, tmp: Path) -> ScalePoint:
    root = tmp / f"tree-{n}"
    make_tree(root, n, seed=args.seed + n)
    made = time.monotonic()
    s = Samples()
    async with ba.open_workspace(root, backend="copy") as ws:
        await _settle(made)
        b = await ws.fork()
        await b.abort()
        for i in range(args.scale_repeat):
            if i % 2:  # interleave with cp -a, alternating which goes first
                s.add("cp_a", _cp_and_remove(root, tmp / f"cp-{n}"))
            t0 = time.perf_counter_ns()
            b = await ws.fork()
            s.add("fork", time.perf_counter_ns() - t0)
            await b.abort()
            if not i % 2:
                s.add("cp_a", _cp_and_remove(root, tmp / f"cp-{n}"))
    return ScalePoint(n, stats(s.data["fork"]), stats(s.data["cp_a"]), s.data)


def _cp_and_remove(src: Path, dst: Path) -> int:
    ns = _timed_run(["cp", "-a", os.fspath(src), os.fspath(dst)])
    remove_tree(dst)
    return ns


# -- report --------------------------------------------------------------------


def _fmt(ms: float) -> str:
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


# (step, our operation, our key, baseline operation, baseline key)
_ROWS: list[tuple[str, str, str, str, str]] = [
    ("create a branch", "`await ws.fork()`", "fork", "`cp -a tree copy`", "cp_a"),
    ("", "", "", "`shutil.copytree(tree, copy, symlinks=True)`", "copytree"),
    ("", "", "", "`git worktree add --detach`", "git_worktree_add"),
    ("", "", "", "`os.mkdir` (native floor)", "mkdir"),
    ("commit", "`await b.commit()`, 1 small file changed", "commit_1", "", ""),
    ("", "`await b.commit()`, 100 small files changed", "commit_100", "", ""),
    ("discard", "`await b.abort()`", "abort", "`rm -rf` of a `cp -a` copy", "rm_rf"),
    ("", "", "", "`git worktree remove --force`", "git_worktree_remove"),
    ("inspect", "`await b.changes()`, first call on a fresh branch", "changes_first", "", ""),
    ("", "`await b.changes()`, repeated, branch older than 2 s", "changes_warm", "", ""),
]


def _cells(s: Stats | None) -> str:
    if s is None:
        return " | | "
    return f"{_fmt(s.median_ms)} | {_fmt(s.p95_ms)} | {s.n}"


NO_JOURNAL_NOTE = (
    "ext4 without a journal: to create an inode it skips every inode freed in the last "
    "60-360 s (fs/ext4/ialloc.c, recently_deleted()), so after trees were deleted every "
    "file create costs far more, whoever creates it; these timings measure mostly that. "
    "Use --dir on another filesystem (e.g. /dev/shm) to see the backends' own cost."
)


def render(facts: dict[str, str], tree: Tree, samples: Samples,
           scale: list[ScalePoint], args: argparse.Namespace, seconds: float) -> str:
    lines = [
        f"Machine: {machine_line(facts)}.",
        "",
        *([f"Note: {NO_JOURNAL_NOTE}", ""] if facts["ext4_journal"] == "none" else []),
        f"Tree: {tree.files:,} files ({tree.large} large, 256 KiB-2 MiB; the rest 100 B-8 KiB), "
        f"{tree.symlinks} symlinks, {tree.dirs} directories, {tree.total_bytes / 2**20:.1f} MiB. "
        f"{args.repeat} rounds; every operation interleaved with the others; "
        f"times in ms; run took {seconds:.0f} s.",
        "",
        "| step | copy backend | median | p95 | n | baseline | median | p95 | n |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for step, ours, okey, base, bkey in _ROWS:
        o = _cells(samples.stats(okey)) if okey else " | | "
        b = _cells(samples.stats(bkey)) if bkey else " | | "
        lines.append(f"| {step} | {ours} | {o} | {base} | {b} |")
    lines += [
        "",
        "Fork cost against tree size (`ws.fork()` then `abort()`, and `cp -a`, interleaved):",
        "",
        "| files | `ws.fork()` median | p95 | per file (us) "
        "| `cp -a` median | p95 | fork / `cp -a` |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for point in scale:
        n, fork, cp = point.files, point.fork, point.cp_a
        lines.append(
            f"| {n:,} | {_fmt(fork.median_ms)} | {_fmt(fork.p95_ms)} | "
            f"{fork.median_ms * 1e3 / n:.0f} | {_fmt(cp.median_ms)} | {_fmt(cp.p95_ms)} | "
            f"{fork.median_ms / cp.median_ms:.1f}x |"
        )
    return "\n".join(lines)


def to_json(facts: dict[str, str], tree: Tree, samples: Samples,
            scale: list[ScalePoint], args: argparse.Namespace,
            seconds: float) -> dict[str, object]:
    return {
        "config": {"files": args.files, "repeat": args.repeat, "scale": args.scale,
                   "scale_repeat": args.scale_repeat, "seed": args.seed},
        "machine": facts,
        "tree": {"files": tree.files, "large": tree.large, "symlinks": tree.symlinks,
                 "dirs": tree.dirs, "bytes": tree.total_bytes},
        "seconds": seconds,
        "results": {k: {"stats": stats(v).to_json(), "samples_ms": [x / 1e6 for x in v]}
                    for k, v in samples.data.items()},
        "scale": [{"files": p.files, "fork": p.fork.to_json(), "cp_a": p.cp_a.to_json(),
                   "samples_ms": {k: [x / 1e6 for x in v] for k, v in p.samples.items()}}
                  for p in scale],
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--files", type=int, default=10_000, help="files in the main tree (10000)")
    p.add_argument("--repeat", type=int, default=10,
                   help="rounds at --files; each round forks 3 times (10)")
    p.add_argument("--scale", type=lambda s: [int(x) for x in s.split(",") if x],
                   default=[100, 1000], help="smaller trees to fork, comma-separated (100,1000)")
    p.add_argument("--scale-repeat", type=int, default=20, help="forks per smaller tree (20)")
    p.add_argument("--json", type=Path, default=None, help="also write every sample here")
    p.add_argument("--dir", type=Path, default=None,
                   help="where the temporary trees go (default: the system temp dir)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = p.parse_args(argv)
    if args.files < 200:
        p.error("--files must be at least 200 (a commit changes 100 small files)")
    if args.repeat < 1 or args.scale_repeat < 1 or any(n < 1 for n in args.scale):
        p.error("--repeat, --scale-repeat and the --scale sizes must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    _quiet_logs()
    base = args.dir if args.dir is not None else Path(tempfile.gettempdir())
    tmp = Path(tempfile.mkdtemp(prefix="branchagent-bench-", dir=base))

    def log(msg: str) -> None:
        print(f"# {msg}", file=sys.stderr, flush=True)

    try:
        facts = machine_facts(tmp)
        if facts["ext4_journal"] == "none":
            log(f"warning: {NO_JOURNAL_NOTE}")
        out = anyio.run(bench_main, args, tmp, log)
    finally:
        if args.keep:
            log(f"kept {tmp}")
        else:
            remove_tree(tmp)
    print(render(facts, out.tree, out.samples, out.scale, args, out.seconds))
    if args.json is not None:
        data = to_json(facts, out.tree, out.samples, out.scale, args, out.seconds)
        args.json.write_text(json.dumps(data, indent=1) + "\n")
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
