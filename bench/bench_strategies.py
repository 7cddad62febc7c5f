"""Benchmark of the strategies, end to end through the public API.

    .venv/bin/python bench/bench_strategies.py [--backend copy] [--repeat 10]
        [--files 10000] [--candidates 16] [--rounds 3] [--json out.json]

Part 1, first-wins latency: ``ba.Speculate`` over 8 ``ba.Command``
candidates, one ``sleep 0.2`` that succeeds and seven ``sleep 30`` that must
be killed, on a small tree (100 files). The outcome must arrive about 0.2 s
after the start, plus overhead (forks, sandboxed spawns, killing seven
process trees, aborting seven branches, one commit); the floor beside it is
one ``sleep 0.2`` Command run in one branch and committed. Run isolated
(namespaces, the default) and with ``isolate=False``. After every run the
seven losers' processes must be gone (checked in /proc).

Part 2, best-of-N on a real-sized tree: ``ba.BestOfN`` over 16 candidates
on a 10k-file tree (``_util.make_tree``); every candidate writes a small file
and runs a trivial check (``grep``), reporting its attempt number as its
score; the best is committed and the other 15 discarded. The same work is
then done by hand, in the same run, on the same tree:

- ``git worktree add --detach`` per candidate (on a git repository of the
  same tree), the command run in the worktree, the winner's file copied into
  the base, ``git worktree remove --force`` for all. The adds (and removes)
  run one at a time: run concurrently on one repository they race inside
  git ("fatal: failed to read .git/worktrees/X/commondir"); the commands
  in the worktrees run concurrently;
- ``cp -a`` of the tree per candidate, the command run in the copy, the
  winner's file copied into the base, ``rm -rf`` for all.

Every approach runs its 16 candidates concurrently (all at once, like
BestOfN's default). The rounds are interleaved (each round runs every
approach once, the order rotated by one per round). Times are wall-clock,
``time.perf_counter``, from the first fork/copy to the last cleanup. The
by-hand baselines know which file the winner changed; ``BestOfN`` finds the
changes itself (it scans the branch) and commits through its journal.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
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

from bench._util import GIT_ENV, Stats, git, machine_facts, machine_line, make_tree, stats

import branchagent as ba

#: What every candidate of part 2 does, in its branch / worktree / copy.
CANDIDATE_SCRIPT = (
    'printf "candidate %s\\n" "$BRANCHAGENT_ATTEMPT" > bench-patch.txt && '
    'grep -q candidate bench-patch.txt && echo "$BRANCHAGENT_ATTEMPT" > "$BRANCHAGENT_SCORE_FILE"'
)
PATCH = "bench-patch.txt"

Log = Callable[[str], None]


@attrs.define
class Samples:
    """Timing samples in nanoseconds, by key."""

    data: dict[str, list[int]] = attrs.Factory(dict)

    def add(self, key: str, ns: int) -> None:
        self.data.setdefault(key, []).append(ns)

    def get(self, key: str) -> Stats | None:
        got = self.data.get(key)
        return stats(got) if got else None


def _quiet_logs() -> None:
    """The library logs every fork and commit at INFO; keep them out of the output."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


def _processes_with(token: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if token.encode() in cmdline and state != "Z":
            pids.append(int(entry.name))
    return pids


# -- part 1: Speculate latency ------------------------------------------------------------------


async def _speculate_once(ws: ba.Workspace, isolate: bool, token: str) -> int:
    cands: list[ba.Candidate] = [ba.Command(["sleep", token], isolate=isolate) for _ in range(7)]
    cands.insert(3, ba.Command(["sh", "-c", "sleep 0.2 && echo won > speculate-won.txt"],
                               isolate=isolate))
    t0 = time.perf_counter_ns()
    outcome = await ba.Speculate(cands).run(ws)
    dt = time.perf_counter_ns() - t0
    if not outcome.committed or outcome.winner is None or outcome.winner.index != 3:
        raise AssertionError(f"Speculate did not commit the 0.2 s candidate: {outcome}")
    left = await anyio.to_thread.run_sync(_processes_with, f"sleep {token}")
    if left:
        raise AssertionError(f"losers survived Speculate: pids {left}")
    return dt


async def _single_once(ws: ba.Workspace, isolate: bool) -> int:
    t0 = time.perf_counter_ns()
    b = await ws.fork()
    verdict = await ba.run_candidate(
        ba.Command(["sh", "-c", "sleep 0.2 && echo won > speculate-won.txt"], isolate=isolate), b)
    await b.commit()
    dt = time.perf_counter_ns() - t0
    if not verdict.success:
        raise AssertionError(f"the single command failed: {verdict}")
    return dt


async def part1(args: argparse.Namespace, tmp: Path, log: Log) -> Samples:
    samples = Samples()
    tree = make_tree(tmp / "small", 100, seed=args.seed)
    async with ba.open_workspace(tree.root, backend=args.backend) as ws:
        token = f"30.{secrets.randbelow(10**6):06d}"
        await _speculate_once(ws, True, token)  # warm-up, untimed
        await _single_once(ws, True)
        ops: list[tuple[str, Callable[[], Awaitable[int]]]] = [
            ("speculate_isolated", lambda: _speculate_once(ws, True, token)),
            ("speculate_unisolated", lambda: _speculate_once(ws, False, token)),
            ("single_isolated", lambda: _single_once(ws, True)),
            ("single_unisolated", lambda: _single_once(ws, False)),
        ]
        for r in range(args.repeat):
            log(f"part 1: round {r + 1}/{args.repeat}")
            k = r % len(ops)
            for key, op in ops[k:] + ops[:k]:
                samples.add(key, await op())
    return samples


# -- part 2: BestOfN on a 10k-file tree vs git worktree and cp -a -------------------------------


@attrs.frozen
class Trees:
    plain: Path  # the branchagent workspace and the cp -a source
    git_repo: Path  # a git repository of the same content
    scratch: Path


def _make_trees(tmp: Path, files: int, seed: int) -> tuple[Trees, int]:
    tree = make_tree(tmp / "tree", files, seed=seed)
    repo = tmp / "git-repo"
    subprocess.run(["cp", "-a", os.fspath(tree.root), os.fspath(repo)], check=True)
    git("-c", "init.defaultBranch=main", "init", "-q", cwd=repo)
    git("add", "-A", cwd=repo)
    git("-c", "commit.gpgsign=false", "-c", "gc.auto=0", "commit", "-q", "-m", "tree", cwd=repo)
    scratch = tmp / "scratch"
    scratch.mkdir()
    return Trees(tree.root, repo, scratch), tree.files


def _candidate_env(i: int, score_file: Path) -> dict[str, str]:
    return {**os.environ, "BRANCHAGENT_ATTEMPT": str(i), "BRANCHAGENT_SCORE_FILE":
            os.fspath(score_file)}


async def _by_hand(n: int, trees: Trees, tag: str, make: Callable[[Path], list[str]],
                   remove: Callable[[Path], list[str]], *, serial: bool) -> None:
    """Make a copy per candidate, run it there, copy the winner's file into the base, clean up.

    ``serial``: one ``make`` and one ``remove`` at a time (git's worktree commands race
    with each other on one repository: "failed to read .git/worktrees/X/commondir").
    """
    dirs = [trees.scratch / f"{tag}-{i}" for i in range(n)]
    scores: dict[int, float] = {}
    lock = anyio.Semaphore(1 if serial else n)

    async def run_checked(argv: list[str]) -> None:
        async with lock:
            done = await anyio.run_process(argv, env=GIT_ENV, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{argv}: {done.stderr.decode(errors='replace')}")

    async def candidate(i: int) -> None:
        await run_checked(make(dirs[i]))
        score_file = trees.scratch / f"{tag}-{i}.score"
        r = await anyio.run_process(["sh", "-c", CANDIDATE_SCRIPT], cwd=dirs[i],
                                    env=_candidate_env(i, score_file), check=False)
        if r.returncode == 0:
            scores[i] = float(score_file.read_text())
        score_file.unlink(missing_ok=True)

    async with anyio.create_task_group() as tg:
        for i in range(n):
            tg.start_soon(candidate, i)
    best = max(scores, key=lambda i: (scores[i], -i))
    shutil.copy2(dirs[best] / PATCH, trees.plain / PATCH)  # "commit" the winner
    async with anyio.create_task_group() as tg:
        for d in dirs:
            tg.start_soon(run_checked, remove(d))


async def _git_worktrees(n: int, trees: Trees) -> int:
    repo = os.fspath(trees.git_repo)
    t0 = time.perf_counter_ns()
    await _by_hand(
        n, trees, "wt",
        lambda d: ["git", "-C", repo, "-c", "gc.auto=0", "worktree", "add", "--detach", "-q",
                   os.fspath(d), "HEAD"],
        lambda d: ["git", "-C", repo, "worktree", "remove", "--force", os.fspath(d)],
        serial=True,
    )
    return time.perf_counter_ns() - t0


async def _cp_copies(n: int, trees: Trees) -> int:
    t0 = time.perf_counter_ns()
    await _by_hand(
        n, trees, "cp",
        lambda d: ["cp", "-a", os.fspath(trees.plain), os.fspath(d)],
        lambda d: ["rm", "-rf", os.fspath(d)],
        serial=False,
    )
    return time.perf_counter_ns() - t0


async def _best_of_n(n: int, ws: ba.Workspace, isolate: bool) -> int:
    cands: list[ba.Candidate] = [
        ba.Command(["sh", "-c", CANDIDATE_SCRIPT], env={"BRANCHAGENT_ATTEMPT": str(i)},
                   isolate=isolate)
        for i in range(n)
    ]
    t0 = time.perf_counter_ns()
    outcome = await ba.BestOfN(cands).run(ws)
    dt = time.perf_counter_ns() - t0
    w = outcome.winner
    if w is None or w.index != n - 1 or w.changes != (PATCH,):
        raise AssertionError(f"BestOfN did not commit candidate {n - 1}: {outcome}")
    if ws.branches():
        raise AssertionError(f"BestOfN left branches open: {ws.branches()}")
    return dt


async def part2(args: argparse.Namespace, tmp: Path, log: Log) -> tuple[Samples, int]:
    samples = Samples()
    log(f"part 2: generating a tree of {args.files} files and its git repository ...")
    trees, files = await anyio.to_thread.run_sync(_make_trees, tmp, args.files, args.seed)
    n = args.candidates
    async with ba.open_workspace(trees.plain, backend=args.backend) as ws:
        ops: list[tuple[str, Callable[[], Awaitable[int]]]] = [
            ("best_of_n", lambda: _best_of_n(n, ws, True)),
            ("git_worktree", lambda: _git_worktrees(n, trees)),
            ("cp_a", lambda: _cp_copies(n, trees)),
        ]
        if args.unisolated:
            ops.insert(1, ("best_of_n_unisolated", lambda: _best_of_n(n, ws, False)))
        started = time.monotonic()
        for r in range(args.rounds):
            spent = time.monotonic() - started
            if r and spent / r * (r + 1) > args.budget:
                log(f"part 2: stopping after {r} rounds: another would pass --budget "
                    f"{args.budget:.0f} s")
                break
            k = r % len(ops)
            for key, op in ops[k:] + ops[:k]:
                log(f"part 2: round {r + 1}/{args.rounds}: {key} "
                    f"({time.monotonic() - started:.0f} s)")
                samples.add(key, await op())
    await anyio.to_thread.run_sync(lambda: git("worktree", "prune", cwd=trees.git_repo))
    return samples, files


# -- report ----------------------------------------------------------------------------------


def _ms(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}"


def _row(label: str, s: Stats | None, extra: str = "") -> str:
    if s is None:
        return f"| {label} | | | | | |{extra}"
    return (f"| {label} | {_ms(s.median_ms)} | {_ms(s.p95_ms)} | {_ms(s.min_ms)} | "
            f"{_ms(s.max_ms)} | {s.n} |{extra}")


def render(facts: dict[str, str], args: argparse.Namespace, p1: Samples, p2: Samples,
           files: int, seconds: float) -> str:
    b = args.backend
    lines = [
        f"Machine: {machine_line(facts)}. Backend: `{b}`. Run took {seconds:.0f} s.",
        "",
        *([f"Note: {args.dir_note}.", ""] if args.dir_note else []),
        f"Part 1: `ba.Speculate` over 8 `ba.Command` candidates on a 100-file tree: one "
        f"`sleep 0.2` succeeds, seven `sleep 30` are killed. Wall time of `await "
        f"Speculate(...).run(ws)`, ms, {args.repeat} runs each, interleaved.",
        "",
        "| what | median | p95 | min | max | n | over 200 ms (median) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for key, label in (
        ("speculate_isolated", "Speculate, 8 candidates, isolated (default)"),
        ("speculate_unisolated", "Speculate, 8 candidates, `isolate=False`"),
        ("single_isolated", "floor: 1 Command in 1 branch, fork + run + commit, isolated"),
        ("single_unisolated", "floor: same, `isolate=False`"),
    ):
        s = p1.get(key)
        over = f" {_ms(s.median_ms - 200)} |" if s is not None else " |"
        lines.append(_row(label, s, over))
    n = args.candidates
    lines += [
        "",
        f"Part 2: best of {n} on a {files:,}-file tree: each candidate writes a small file and "
        f"runs `grep` on it, its score is its number; the best is committed to the base, the "
        f"other {n - 1} discarded. All {n} run concurrently. Wall time of the whole job, ms, "
        f"{args.rounds} rounds, interleaved.",
        "",
        "| approach | median | p95 | min | max | n | per candidate (median) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for key, label in (
        ("best_of_n", f"`ba.BestOfN`, {b} backend, isolated (default)"),
        ("best_of_n_unisolated", f"`ba.BestOfN`, {b} backend, `isolate=False`"),
        ("git_worktree", "`git worktree add` per candidate, run, copy the winner's file, "
                         "`git worktree remove`"),
        ("cp_a", "`cp -a` per candidate, run, copy the winner's file, `rm -rf`"),
    ):
        s = p2.get(key)
        if s is None and key == "best_of_n_unisolated":
            continue
        per = f" {_ms(s.median_ms / n)} |" if s is not None else " |"
        lines.append(_row(label, s, per))
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--backend", default="copy", help="backend to measure (copy)")
    p.add_argument("--repeat", type=int, default=10, help="part 1 runs per variant (10)")
    p.add_argument("--files", type=int, default=10_000, help="part 2 tree size (10000)")
    p.add_argument("--candidates", type=int, default=16, help="part 2 candidates (16)")
    p.add_argument("--rounds", type=int, default=3, help="part 2 rounds, at most (3)")
    p.add_argument("--budget", type=float, default=120,
                   help="part 2 starts no round that would end after this many seconds (120)")
    p.add_argument("--unisolated", action="store_true",
                   help="part 2: also BestOfN with isolate=False")
    p.add_argument("--json", type=Path, default=None, help="also write every sample here")
    p.add_argument("--dir", type=Path, default=None,
                   help="where the temporary trees go (default: the system temp dir, or "
                        "/dev/shm when that is ext4 without a journal; see the output)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if min(args.repeat, args.files, args.candidates, args.rounds) < 1:
        p.error("--repeat, --files, --candidates and --rounds must be positive")
    return args


async def bench_main(args: argparse.Namespace, tmp: Path, log: Log) -> tuple[Samples, Samples,
                                                                              int]:
    p1 = await part1(args, tmp, log)
    p2, files = await part2(args, tmp, log)
    return p1, p2, files


NO_JOURNAL_NOTE = (
    "the system temp dir is on ext4 without a journal, where creating an inode skips every "
    "inode freed in the last 60-360 s (fs/ext4/ialloc.c, recently_deleted()): after the first "
    "round deleted its trees, every file create costs far more, whoever creates it (measured: "
    "16 `cp -a` of a 2,000-file tree 23.5 s there vs 1.4 s on tmpfs). Using /dev/shm instead; "
    "pass --dir to choose"
)


def _pick_dir(args: argparse.Namespace, log: Log) -> Path:
    if args.dir is not None:
        return Path(args.dir)
    system = Path(tempfile.gettempdir())
    shm = Path("/dev/shm")
    if machine_facts(system)["ext4_journal"] == "none" and shm.is_dir():
        log(f"note: {NO_JOURNAL_NOTE}")
        args.dir_note = NO_JOURNAL_NOTE
        return shm
    return system


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.dir_note = ""
    _quiet_logs()

    def log(msg: str) -> None:
        print(f"# {msg}", file=sys.stderr, flush=True)

    base = _pick_dir(args, log)
    tmp = Path(tempfile.mkdtemp(prefix="branchagent-bench-strategies-", dir=base))
    started = time.monotonic()
    try:
        facts = machine_facts(tmp)
        p1, p2, files = anyio.run(bench_main, args, tmp, log)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.monotonic() - started
    print(render(facts, args, p1, p2, files, seconds))
    if args.json is not None:
        data = {
            "config": vars(args) | {"json": os.fspath(args.json), "dir": os.fspath(base)},
            "machine": facts, "seconds": seconds,
            "part1": {k: {"stats": stats(v).to_json(), "samples_ms": [x / 1e6 for x in v]}
                      for k, v in p1.data.items()},
            "part2": {k: {"stats": stats(v).to_json(), "samples_ms": [x / 1e6 for x in v]}
                      for k, v in p2.data.items()},
        }
        args.json.write_text(json.dumps(data, indent=1) + "\n")
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
