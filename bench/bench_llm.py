"""Benchmark of the vLLM pipeline after the model answered: response -> committed winner.

    .venv/bin/python bench/bench_llm.py [--files 10000] [--n 1,4,16] [--repeat 1]
        [--backends copy,fuse] [--json out.json]

For N = 1, 4 and 16 candidates on a generated 10k-file tree
(``_util.make_tree``), the time from the model's response (N scripted
completions, so no model is needed: each is the Markdown a model would
write, fenced code blocks naming three existing small files to rewrite and
a ``result.txt``) to the committed winner, split into four phases:

- fork: one branch per candidate (one at a time);
- apply: every completion's code blocks written into its branch
  (``branchagent.llm.write_code_blocks``, concurrently);
- verify: ``sh -c 'grep -q pass result.txt'`` run in every branch,
  concurrently (``ba.Command(..., isolate=False)``: the same process as the
  baselines run; the sandbox's own cost is measured in bench_sandbox.py);
  only the last candidate passes, so all N are verified;
- commit: the winner committed into the base and the other N - 1 aborted
  (for the baselines: the winner's changed files copied into the base, or
  fast-forwarded, and every copy or worktree removed).

The same pipeline is then run with temp-dir copies (``cp -a`` per candidate,
``rm -rf`` after) and with git worktrees (``git worktree add --detach`` per
candidate on a git repository of the same tree, one at a time since
concurrent adds race inside git; commit = ``git add -A && git commit`` in
the winner's worktree and ``git merge --ff-only`` in the base; ``git
worktree remove --force`` for all). The copies' commit knows which files the
winner wrote (it copies just those); branchagent finds the changes itself.

Rounds are interleaved: each round runs every method once per N, in an order
rotated by one per round. Times are ``time.perf_counter_ns`` wall clock;
the table shows medians (ms) over ``--repeat`` rounds and the machine facts.
Only the fuse backend is measured by default: the copy backend copies the
tree per fork, like ``cp -a`` (``--backends copy,fuse``; see bench_copy.py).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import anyio
import structlog

if __package__ in (None, ""):  # run as a script: make ``bench._util`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._util import GIT_ENV, Tree, git, machine_facts, machine_line, make_tree, remove_tree

import branchagent as ba
import branchagent.llm as llm

PHASES = ("fork", "apply", "verify", "commit")
VERIFY = ["sh", "-c", "grep -q pass result.txt"]
EDITS = 3  # existing small files each completion rewrites

Times = dict[str, int]  # phase -> ns
Method = Callable[[int, list[llm.Completion]], Awaitable[Times]]


def completions(tree: Tree, n: int, round_no: int) -> list[llm.Completion]:
    """N model answers: rewrite EDITS small files, write result.txt (only the last passes)."""
    out = []
    for i in range(n):
        blocks = []
        for j in range(EDITS):
            rel = tree.small_paths[(round_no * 997 + i * EDITS + j) % len(tree.small_paths)]
            code = f"def fixed_{i}_{j}():\n    return {i * 10 + j}\n"
            blocks.append(f"```python {rel}\n{code}```\n")
        verdict = "pass" if i == n - 1 else "fail"
        blocks.append(f"```text result.txt\n{verdict} {round_no}.{i}\n```\n")
        text = f"Candidate {i}: rewrite {EDITS} files.\n\n" + "\n".join(blocks)
        out.append(llm.Completion(index=i, text=text, token_logprobs=[-0.1] * 40))
    return out


def write_blocks(root: Path, completion: llm.Completion) -> list[str]:
    """What write_code_blocks does, for a plain directory (the baselines)."""
    written = []
    for block in llm.parse_code_blocks(completion.text):
        assert block.path is not None
        target = root / block.path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(block.code)
        written.append(block.path)
    return written


def _bind(fn: Callable[..., Awaitable[object]], *args: object) -> Callable[[], Awaitable[object]]:
    return functools.partial(fn, *args)


async def run_all(fns: Sequence[Callable[[], Awaitable[object]]]) -> list[object]:
    results: list[object] = [None] * len(fns)

    async def one(i: int) -> None:
        results[i] = await fns[i]()

    async with anyio.create_task_group() as tg:
        for i in range(len(fns)):
            tg.start_soon(one, i)
    return results


async def sh(argv: Sequence[str], cwd: Path | None = None) -> int:
    r = await anyio.run_process(list(argv), cwd=cwd, check=False, env=GIT_ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return r.returncode


class Clock:
    def __init__(self) -> None:
        self.times: Times = {}
        self.t = time.perf_counter_ns()

    def lap(self, phase: str) -> None:
        now = time.perf_counter_ns()
        self.times[phase] = now - self.t
        self.t = now


# -- the methods ----------------------------------------------------------------------------


def branchagent_method(ws: ba.Workspace) -> Method:
    async def run(n: int, answers: list[llm.Completion]) -> Times:
        clock = Clock()
        branches = [await ws.fork() for _ in range(n)]
        clock.lap("fork")
        await run_all([_bind(llm.write_code_blocks, b, c)
                       for b, c in zip(branches, answers, strict=True)])
        clock.lap("apply")
        cmd = ba.Command(VERIFY, isolate=False)
        verdicts = await run_all([_bind(ba.run_candidate, cmd, b) for b in branches])
        clock.lap("verify")
        ok = [i for i, v in enumerate(verdicts) if isinstance(v, ba.Verdict) and v.success]
        assert ok == [n - 1], ok
        for i, b in enumerate(branches):
            if i != ok[0]:
                await b.abort()
        await branches[ok[0]].commit()
        clock.lap("commit")
        assert (ws.path / "result.txt").read_text().startswith("pass")
        return clock.times

    return run


def copy_method(base: Path, scratch: Path) -> Method:
    async def run(n: int, answers: list[llm.Completion]) -> Times:
        clock = Clock()
        dirs = [scratch / f"copy-{i}" for i in range(n)]
        for d in dirs:
            assert await sh(["cp", "-a", os.fspath(base), os.fspath(d)]) == 0
        clock.lap("fork")
        written = await run_all([_bind(anyio.to_thread.run_sync, write_blocks, d, c)
                                 for d, c in zip(dirs, answers, strict=True)])
        clock.lap("apply")
        codes = await run_all([functools.partial(sh, VERIFY, cwd=d) for d in dirs])
        clock.lap("verify")
        ok = [i for i, rc in enumerate(codes) if rc == 0]
        assert ok == [n - 1], ok
        changed = written[ok[0]]
        assert isinstance(changed, list)
        for rel in changed:
            shutil.copy2(dirs[ok[0]] / rel, base / rel)
        for d in dirs:
            assert await sh(["rm", "-rf", os.fspath(d)]) == 0
        clock.lap("commit")
        assert (base / "result.txt").read_text().startswith("pass")
        return clock.times

    return run


def worktree_method(repo: Path, scratch: Path) -> Method:
    def g(*args: str) -> list[str]:
        return ["git", "-C", os.fspath(repo), *args]

    async def run(n: int, answers: list[llm.Completion]) -> Times:
        clock = Clock()
        dirs = [scratch / f"wt-{i}" for i in range(n)]
        for d in dirs:
            assert await sh(g("worktree", "add", "--detach", "-q", os.fspath(d), "HEAD")) == 0
        clock.lap("fork")
        await run_all([_bind(anyio.to_thread.run_sync, write_blocks, d, c)
                       for d, c in zip(dirs, answers, strict=True)])
        clock.lap("apply")
        codes = await run_all([functools.partial(sh, VERIFY, cwd=d) for d in dirs])
        clock.lap("verify")
        ok = [i for i, rc in enumerate(codes) if rc == 0]
        assert ok == [n - 1], ok
        win = os.fspath(dirs[ok[0]])
        assert await sh(["git", "-C", win, "add", "-A"]) == 0
        assert await sh(["git", "-C", win, "commit", "-q", "-m", "winner"]) == 0
        got = await anyio.run_process(["git", "-C", win, "rev-parse", "HEAD"], env=GIT_ENV)
        sha = got.stdout.decode().strip()
        assert await sh(g("merge", "--ff-only", "-q", sha)) == 0
        for d in dirs:
            assert await sh(g("worktree", "remove", "--force", os.fspath(d))) == 0
        clock.lap("commit")
        assert (repo / "result.txt").read_text().startswith("pass")
        return clock.times

    return run


# -- the run ---------------------------------------------------------------------------------


async def bench(args: argparse.Namespace, tmp: Path, log: Callable[[str], None]
                ) -> tuple[Tree, dict[str, dict[int, list[Times]]], dict[str, str]]:
    tree = make_tree(tmp / "tree", args.files, seed=args.seed)
    log(f"tree: {tree.files} files, {tree.total_bytes / 2**20:.0f} MiB")
    bases: dict[str, Path] = {}
    for name in ("copy", "worktree", *args.backends):
        bases[name] = tmp / f"base-{name}"
        await anyio.run_process(["cp", "-a", os.fspath(tree.root), os.fspath(bases[name])])
    git("init", "-q", "-b", "main", cwd=bases["worktree"])
    git("add", "-A", cwd=bases["worktree"])
    git("commit", "-q", "-m", "base", cwd=bases["worktree"])
    scratch = tmp / "scratch"
    scratch.mkdir()
    samples: dict[str, dict[int, list[Times]]] = {}
    skipped: dict[str, str] = {}
    async with contextlib.AsyncExitStack() as stack:
        spaces: dict[str, ba.Workspace] = {}
        for name in args.backends:
            try:
                spaces[name] = await stack.enter_async_context(
                    ba.open_workspace(bases[name], backend=name))
            except Exception as exc:  # unavailable here (no /dev/fuse, ...): say so
                skipped[name] = f"{type(exc).__name__}: {exc}"[:200]
        methods: dict[str, Method] = {
            f"branchagent ({name})": branchagent_method(ws) for name, ws in spaces.items()}
        methods["temp-dir copies (cp -a)"] = copy_method(bases["copy"], scratch)
        methods["git worktrees"] = worktree_method(bases["worktree"], scratch)
        order = list(methods)
        for r in range(args.repeat):
            for n in args.n:
                answers = completions(tree, n, r)
                for name in order:
                    samples.setdefault(name, {}).setdefault(n, []).append(
                        await methods[name](n, answers))
                order = order[1:] + order[:1]
            log(f"round {r + 1}/{args.repeat} done")
    return tree, samples, skipped


def _median_ms(values: Sequence[int]) -> float:
    return statistics.median(values) / 1e6


def render(facts: dict[str, str], tree: Tree, samples: dict[str, dict[int, list[Times]]],
           skipped: dict[str, str], args: argparse.Namespace, seconds: float) -> str:
    lines = [
        f"## From the model's response to the committed winner ({tree.files} files, "
        f"{tree.total_bytes / 2**20:.0f} MiB)",
        "",
        f"Median of {args.repeat} round(s), milliseconds. Scripted completions; every "
        f"completion rewrites {EDITS} files and writes result.txt; the verifier is "
        "`grep -q pass result.txt` (only the last candidate passes).",
        "",
        "| N | method | fork | apply | verify | commit | total |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for n in args.n:
        for name, per_n in samples.items():
            runs = per_n.get(n, [])
            if not runs:
                continue
            cells = [_median_ms([t[p] for t in runs]) for p in PHASES]
            total = _median_ms([sum(t.values()) for t in runs])
            lines.append(f"| {n} | {name} | " + " | ".join(f"{c:.1f}" for c in cells)
                         + f" | {total:.1f} |")
    lines.append("")
    for name, why in skipped.items():
        lines.append(f"Backend `{name}` not measured: {why}")
    lines += ["", f"Machine: {machine_line(facts)}.", "",
              f"Benchmark wall time: {seconds:.0f} s."]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--files", type=int, default=10_000, help="files in the tree (10000)")
    p.add_argument("--n", type=lambda s: [int(x) for x in s.split(",") if x],
                   default=[1, 4, 16], help="candidate counts, comma-separated (1,4,16)")
    p.add_argument("--repeat", type=int, default=1,
                   help="rounds (1: about 2.5 min on a 2-core VM, where cp -a dominates)")
    p.add_argument("--backends", type=lambda s: [x for x in s.split(",") if x],
                   default=[b for b in ("fuse",) if b in ba.available_backends()],
                   help="branchagent backends to measure, comma-separated (fuse; the copy "
                        "backend copies the tree per fork like cp -a: see bench_copy.py)")
    p.add_argument("--json", type=Path, default=None, help="also write every sample here")
    p.add_argument("--dir", type=Path, default=None, help="where the trees go (system temp)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.files < 100 or args.repeat < 1 or not args.n or min(args.n) < 1:
        p.error("--files >= 100, --repeat >= 1 and positive --n values, please")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    base = args.dir if args.dir is not None else Path(tempfile.gettempdir())
    tmp = Path(tempfile.mkdtemp(prefix="branchagent-bench-llm-", dir=base))

    def log(msg: str) -> None:
        print(f"# {msg}", file=sys.stderr, flush=True)

    started = time.monotonic()
    try:
        facts = machine_facts(tmp)
        tree, samples, skipped = anyio.run(bench, args, tmp, log)
    finally:
        subprocess.run(["git", "-C", os.fspath(tmp / "base-worktree"), "worktree", "prune"],
                       env=GIT_ENV, check=False, capture_output=True)
        remove_tree(tmp)
    seconds = time.monotonic() - started
    print(render(facts, tree, samples, skipped, args, seconds))
    if args.json is not None:
        data = {"facts": facts, "files": tree.files, "repeat": args.repeat, "skipped": skipped,
                "samples": {name: {str(n): runs for n, runs in per_n.items()}
                            for name, per_n in samples.items()}}
        args.json.write_text(json.dumps(data, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
