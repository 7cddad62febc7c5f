"""Benchmark of running processes in branches: sandbox overhead, kill time, fan-out.

    .venv/bin/python bench/bench_sandbox.py [--runs 50] [--tree 200] [--branches 64]
                                            [--cores 2] [--json out.json]

What it measures, through the public API on the copy backend:

1. **Overhead of one run.** ``await branch.run(["true"])`` isolated (mount,
   PID namespaces) with cgroup limits (memory, pids, cpu), isolated without
   limits, unisolated with and without limits; ``await branch.call(fn)``;
   baselines ``subprocess.run(["true"])`` (blocking) and
   ``anyio.run_process(["true"])``. Interleaved rounds (each round runs every
   operation once, rotated by one per round); median and p95.
2. **Abort to last process gone** for a tree of ``--tree`` processes (a shell
   that starts that many ``sleep``s), confirmed by counting the run's cgroup
   (``cgroup.procs``) before the abort; then the time from calling
   ``branch.abort()`` until every process of the tree is dead (polled in
   /proc), and until ``abort()`` returned. With cgroups (``cgroup.kill``, or
   the kill loop over ``cgroup.procs``) and, for comparison, the fallback
   without cgroups (the PID namespace's teardown when isolated, the process
   group otherwise).
3. **Fan-out.** ``--branches`` branches forked, each running a short test
   command (``python -c "import json; print(1)"``), all at once in one anyio
   task group, then aborted; the process is pinned to ``--cores`` CPUs. The
   wall time of each phase and of the whole; baseline: the same commands
   started with ``anyio.run_process`` without branches.

The output is Markdown tables plus the machine's facts (including the cgroup
hierarchy found: ``branchagent._sandbox._cgroup.host().describe()``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import structlog

if __package__ in (None, ""):  # run as a script: make ``bench._util`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._util import Stats, machine_facts, machine_line, make_tree, remove_tree, stats

import branchagent as ba
from branchagent._sandbox import _cgroup
from branchagent._sandbox._run import isolation_available

TOKEN_VAR = "BRANCHAGENT_BENCH_TOKEN"
LIMITS = ba.Limits(memory="256M", pids=256, cpu=1.0)
SHORT = [sys.executable, "-c", "import json; print(1)"]
NO_CGROUPS = _cgroup.CgroupHost(None, frozenset(), False, {})


def _quiet_logs() -> None:
    """branchagent logs every fork/abort at INFO through structlog; keep them out of the output."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


def _one(_branch: object) -> int:
    return 1


# -- 1. overhead of one run ------------------------------------------------------------------


def _time_subprocess() -> int:
    t = time.perf_counter_ns()
    subprocess.run(["true"], check=True)
    return time.perf_counter_ns() - t


async def bench_overhead(ws: ba.Workspace, runs: int, isolated: bool) -> dict[str, list[int]]:
    b = await ws.fork("overhead")

    async def timed(fn: Callable[[], Awaitable[object]]) -> int:
        t = time.perf_counter_ns()
        await fn()
        return time.perf_counter_ns() - t

    async def subprocess_true() -> int:
        return _time_subprocess()

    async def anyio_true() -> int:
        return await timed(lambda: anyio.run_process(["true"]))

    def run_op(isolate: bool, limits: ba.Limits | None) -> Callable[[], Awaitable[int]]:
        async def op() -> int:
            return await timed(lambda: b.run(["true"], isolate=isolate, limits=limits))
        return op

    ops: dict[str, Callable[[], Awaitable[int]]] = {
        "subprocess.run(['true'])": subprocess_true,
        "anyio.run_process(['true'])": anyio_true,
        "run, unisolated, no limits": run_op(False, None),
        "run, unisolated, cgroup limits": run_op(False, LIMITS),
    }
    if isolated:
        ops["run, isolated, no limits"] = run_op(True, None)
        ops["run, isolated, cgroup limits"] = run_op(True, LIMITS)
    for op in list(ops.values()):  # warm up: imports, thread pool, page cache
        await op()
    samples: dict[str, list[int]] = {name: [] for name in ops}
    names = list(ops)
    for i in range(runs):
        for name in names[i % len(names):] + names[:i % len(names)]:
            samples[name].append(await ops[name]())
    # A Python call starts an interpreter: fewer samples, not interleaved.
    for isolate in ([True, False] if isolated else [False]):
        name = f"call(fn), {'isolated' if isolate else 'unisolated'}, no limits"

        async def call(iso: bool = isolate) -> object:
            return await b.call(_one, isolate=iso)

        await call()
        samples[name] = [await timed(call) for _ in range(max(5, runs // 5))]
    await b.abort()
    return samples


# -- 2. abort to last process gone -------------------------------------------------------------


def _token_pids(tok: str) -> list[int]:
    needle = tok.encode()
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if needle in Path(f"/proc/{entry}/environ").read_bytes():
                    out.append(int(entry))
            except OSError:
                pass
    return out


def _alive(pids: list[int]) -> int:
    n = 0
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if state not in ("Z", "X"):
            n += 1
    return n


def _cgroup_count() -> int:
    """Processes in the (one) run cgroup alive now: its cgroup.procs, v2 or else v1 pids."""
    h = _cgroup.host()
    for parent in [*([h.v2] if h.v2 is not None else []), *h.v1.values()]:
        for d in parent.iterdir():
            if d.name.startswith("run-"):
                return len((d / "cgroup.procs").read_text().split())
    return -1


async def bench_kill(ws: ba.Workspace, size: int, isolate: bool, reps: int,
                     cgroups: bool) -> dict[str, Any]:
    gone: list[int] = []
    returned: list[int] = []
    counted: list[int] = []
    saved = _cgroup._host
    if not cgroups:
        _cgroup._host = NO_CGROUPS
    try:
        for _ in range(reps):
            tok = uuid.uuid4().hex
            b = await ws.fork()
            script = f"for i in $(seq {size}); do sleep 3600 & done; wait"
            async with anyio.create_task_group() as tg:
                async def run(b: ba.WorkspaceBranch = b, tok: str = tok,
                              script: str = script) -> None:
                    await b.run(["sh", "-c", script], isolate=isolate, env={TOKEN_VAR: tok},
                                limits=ba.Limits(pids=size + 64) if cgroups else None)

                tg.start_soon(run)
                with anyio.fail_after(30):
                    while True:  # the sleeps, the shell, and unshare when isolated
                        pids = _token_pids(tok)
                        if len(pids) >= size + 1 + isolate:
                            break
                        await anyio.sleep(0.02)
                counted.append(_cgroup_count() if cgroups else len(pids))
                t0 = time.perf_counter_ns()
                done: list[int] = []

                async def abort(b: ba.WorkspaceBranch = b, done: list[int] = done) -> None:
                    await b.abort()
                    done.append(time.perf_counter_ns())

                tg.start_soon(abort)
                with anyio.fail_after(30):
                    while True:
                        if not _alive(pids):
                            break
                        await anyio.sleep(0.001)
                gone.append(time.perf_counter_ns() - t0)
            returned.append(done[0] - t0)
    finally:
        _cgroup._host = saved
    return {"gone": gone, "returned": returned, "counted": counted}


# -- 3. fan-out -----------------------------------------------------------------------------------


async def bench_fanout(ws: ba.Workspace, n: int, isolate: bool | None) -> dict[str, float]:
    """Fork n branches, run SHORT in each, abort them; all at once. None: no branches."""
    out: dict[str, float] = {}
    failures: list[object] = []
    t0 = time.perf_counter()
    if isolate is None:
        async def plain() -> None:
            # Its own session, like a branch's run: with autogroup scheduling a session is
            # what gets a fair share of the CPU against the rest of the machine.
            r = await anyio.run_process(SHORT, check=False, start_new_session=True)
            if r.returncode != 0:
                failures.append(r)

        async with anyio.create_task_group() as tg:
            for _ in range(n):
                tg.start_soon(plain)
        out["run"] = out["total"] = time.perf_counter() - t0
    else:
        branches: list[ba.WorkspaceBranch] = []

        async def fork() -> None:
            branches.append(await ws.fork())

        async def run(b: ba.WorkspaceBranch) -> None:
            r = await b.run(SHORT, isolate=isolate, limits=ba.Limits(timeout=120))
            if not r.ok:
                failures.append(r)

        async with anyio.create_task_group() as tg:
            for _ in range(n):
                tg.start_soon(fork)
        t1 = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for b in branches:
                tg.start_soon(run, b)
        t2 = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for b in branches:
                tg.start_soon(b.abort)
        t3 = time.perf_counter()
        out = {"fork": t1 - t0, "run": t2 - t1, "abort": t3 - t2, "total": t3 - t0}
    if failures:
        raise RuntimeError(f"{len(failures)} runs failed: {failures[0]!r}")
    return out


# -- main ----------------------------------------------------------------------------------------


def _ms(ns: int | float) -> str:
    return f"{ns / 1e6:.1f}"


async def bench_main(args: argparse.Namespace, tmp: Path, log: Callable[[str], None]
                     ) -> dict[str, Any]:
    isolated = isolation_available()
    repo = tmp / "repo"
    make_tree(repo, args.files)
    out: dict[str, Any] = {"isolated": isolated}
    async with ba.open_workspace(repo, backend="copy") as ws:
        log(f"overhead: {args.runs} rounds")
        out["overhead"] = await bench_overhead(ws, args.runs, isolated)
        kill: dict[str, Any] = {}
        for isolate in ([True, False] if isolated else [False]):
            for cgroups in ([True, False] if _cgroup.host().kind != "none" else [False]):
                name = (f"{'isolated' if isolate else 'unisolated'}, "
                        f"{'cgroup' if cgroups else 'no cgroup (fallback)'}")
                log(f"kill a {args.tree}-process tree: {name}")
                kill[name] = await bench_kill(ws, args.tree, isolate, args.kill_reps, cgroups)
        out["kill"] = kill
        saved = os.sched_getaffinity(0)
        cpus = sorted(saved)[: args.cores]
        os.sched_setaffinity(0, cpus)
        try:
            fan: dict[str, list[dict[str, float]]] = {}
            modes: list[tuple[str, bool | None]] = [("anyio.run_process, no branches", None),
                                                    ("branches, unisolated", False)]
            if isolated:
                modes.append(("branches, isolated", True))
            for _ in range(args.fanout_reps):
                for name, mode in modes:
                    log(f"fan-out: {args.branches} x {name} on {len(cpus)} cores")
                    fan.setdefault(name, []).append(await bench_fanout(ws, args.branches, mode))
            out["fanout"] = fan
            out["fanout_cores"] = len(cpus)
        finally:
            os.sched_setaffinity(0, saved)
    return out


def render(facts: dict[str, str], out: dict[str, Any], args: argparse.Namespace,
           seconds: float) -> str:
    lines = ["## Sandbox", "", f"Machine: {machine_line(facts)}.",
             f"cgroups: `{json.dumps(_cgroup.host().describe())}`; namespaces "
             f"{'available' if out['isolated'] else 'NOT available'}; "
             f"limits used: memory 256M, pids 256, cpu 1.0.", ""]
    lines += [f"### One run of `true` ({args.runs} interleaved rounds; calls: fewer)", "",
              "| operation | n | median ms | p95 ms | min ms |", "|---|---|---|---|---|"]
    for name, samples in out["overhead"].items():
        s: Stats = stats(samples)
        lines.append(f"| {name} | {s.n} | {s.median_ms:.2f} | {s.p95_ms:.2f} | {s.min_ms:.2f} |")
    lines += ["", f"### Abort to last process gone, a tree of {args.tree} `sleep`s "
              f"({args.kill_reps} reps)", "",
              "| mode | processes counted | all dead: median ms | p95 ms | abort() returned: "
              "median ms |", "|---|---|---|---|---|"]
    for name, k in out["kill"].items():
        g = stats(k["gone"])
        lines.append(f"| {name} | {min(k['counted'])}-{max(k['counted'])} | "
                     f"{g.median_ms:.1f} | {g.p95_ms:.1f} | "
                     f"{_ms(statistics.median(k['returned']))} |")
    lines += ["", f"### {args.branches} branches at once, each running "
              f"`python -c \"import json; print(1)\"` on {out['fanout_cores']} cores "
              f"(median of {args.fanout_reps}; seconds)", "",
              "| mode | fork | run | abort | total |", "|---|---|---|---|---|"]
    for name, reps in out["fanout"].items():
        def med(key: str, reps: list[dict[str, float]] = reps) -> str:
            vals = [r[key] for r in reps if key in r]
            return f"{statistics.median(vals):.2f}" if vals else "-"
        lines.append(f"| {name} | {med('fork')} | {med('run')} | {med('abort')} | "
                     f"{med('total')} |")
    lines += ["", f"Tree: {args.files} files (`bench._util.make_tree`). "
              f"Whole benchmark: {seconds:.0f} s."]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--runs", type=int, default=50, help="rounds of the one-run overhead (50)")
    p.add_argument("--tree", type=int, default=200, help="processes in the killed tree (200)")
    p.add_argument("--kill-reps", type=int, default=5, help="trees killed per mode (5)")
    p.add_argument("--branches", type=int, default=64, help="branches in the fan-out (64)")
    p.add_argument("--fanout-reps", type=int, default=3, help="fan-outs per mode (3)")
    p.add_argument("--cores", type=int, default=2, help="CPUs the fan-out is pinned to (2)")
    p.add_argument("--files", type=int, default=200, help="files in the workspace tree (200)")
    p.add_argument("--json", type=Path, default=None, help="also write every sample here")
    args = p.parse_args(argv)
    if min(args.runs, args.tree, args.kill_reps, args.branches, args.fanout_reps,
           args.cores, args.files) < 1:
        p.error("every count must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    _quiet_logs()
    tmp = Path(tempfile.mkdtemp(prefix="branchagent-bench-sandbox-"))

    def log(msg: str) -> None:
        print(f"# {msg}", file=sys.stderr, flush=True)

    started = time.monotonic()
    try:
        facts = machine_facts(tmp)
        out = anyio.run(bench_main, args, tmp, log)
    finally:
        remove_tree(tmp)
    print(render(facts, out, args, time.monotonic() - started))
    if args.json is not None:
        data = {"facts": facts, "cgroups": _cgroup.host().describe(), **out}
        args.json.write_text(json.dumps(data, indent=1) + "\n")
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
