"""Benchmark of forkable sessions: ``session.fork()`` against re-running the setup.

    .venv/bin/python bench/bench_sessions.py [--sizes 10,100,1000] [--forks 20]
                                             [--fresh 3] [--commits 20] [--backend fuse]
                                             [--json out.json]

For each size (MB of Python objects: a table of dicts, as a data-analysis agent holds
one), an interpreter is started in a branch with ``branch.session()`` and the setup
code builds the table in it. Then:

1. **session.fork()**, as the caller sees it (the child branch, the interpreter's
   ``fork()``, the child's own mount namespace and cgroups, the new connection, the
   child's first reply), ``--forks`` times; each child is checked (it holds the table)
   and closed, and its branch aborted, outside the timed part. Median and p95.
2. **os.fork() alone**, timed inside the interpreter (fork, child exits at once):
   what the kernel's copy of the page tables costs at this size.
3. **The naive alternative**, in the same run: a fresh session
   (``branch.session()``) plus re-running the setup code, ``--fresh`` times.

4. **Commit with a session alive** (``--commits`` times, once per run, not per size):
   ``await child.commit()`` of a child branch holding one written file, timed as the
   caller sees it, in three interleaved cases: no session in the child (the baseline),
   a session started in the child (``child.session()``), and a fork of the parent's
   session (``s.fork()``). With a session, the commit also moves it into the parent
   (a helper process enters the session's namespaces and swaps the view); each moved
   session is checked to read the committed file, then closed, outside the timed part.

The table's size is measured in the interpreter (the RSS the setup added). Output:
Markdown tables plus the machine's facts.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import structlog

if __package__ in (None, ""):  # run as a script: make ``bench._util`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._util import machine_facts, machine_line, stats

import branchagent as ba

#: Setup code: a table of rows (dicts), about ``mb`` MB of Python objects.
SETUP = """
import os, resource
def _rss():
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
_before = _rss()
rows = [{{'id': i, 'name': 'row%d' % i, 'value': i * 0.5, 'tag': ('a', 'b', 'c')[i % 3]}}
        for i in range({n})]
setup_bytes = _rss() - _before
"""
#: Bytes of RSS per row of SETUP, measured on CPython 3.11 (x86_64); the run reports
#: the real figure.
BYTES_PER_ROW = 330

FORK_ALONE = """
import os, time
def _fork_alone():
    t = time.perf_counter_ns()
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    dt = time.perf_counter_ns() - t
    os.waitpid(pid, 0)
    return dt
"""


async def bench_size(ws: ba.Workspace, mb: int, forks: int, fresh: int) -> dict[str, Any]:
    n = mb * (1 << 20) // BYTES_PER_ROW
    setup = SETUP.format(n=n)
    b = await ws.fork()
    s = await b.session()
    t = time.perf_counter_ns()
    await s.exec(setup)
    first_setup = time.perf_counter_ns() - t
    await s.exec(FORK_ALONE)
    setup_bytes = await s.eval("setup_bytes")
    fork_ns: list[int] = []
    for _ in range(forks):
        t = time.perf_counter_ns()
        c = await s.fork()
        fork_ns.append(time.perf_counter_ns() - t)
        assert await c.eval("len(rows)") == n
        await c.close()
        await c.branch.abort()
    alone_ns = [await s.eval("_fork_alone()") for _ in range(forks)]
    fresh_ns: list[int] = []
    for _ in range(fresh):
        fb = await ws.fork()
        t = time.perf_counter_ns()
        f = await fb.session()
        await f.exec(setup)
        fresh_ns.append(time.perf_counter_ns() - t)
        await f.close()
        await fb.abort()
    await s.close()
    await b.abort()
    return {
        "mb": mb, "rows": n, "setup_rss_mb": round(setup_bytes / (1 << 20), 1),
        "first_setup_ms": round(first_setup / 1e6, 1),
        "fork": stats(fork_ns).to_json(), "os_fork": stats(alone_ns).to_json(),
        "fresh": stats(fresh_ns).to_json(),
    }


async def bench_commit(ws: ba.Workspace, n: int) -> dict[str, Any]:
    """Commit time of a child branch: no session, a fresh session, a forked session."""
    b = await ws.fork()
    s = await b.session()
    await s.exec("import os")
    times: dict[str, list[int]] = {"none": [], "fresh": [], "forked": []}
    for i in range(n):
        for case in times:
            child = await b.fork()
            session = None
            if case == "none":
                (child.path / f"{case}{i}.txt").write_text("x")
            else:
                session = await child.session() if case == "fresh" else await s.fork()
                if case == "forked":
                    child = session.branch
                await session.exec(f"open('{case}{i}.txt', 'w').write('x')")
            t = time.perf_counter_ns()
            await child.commit()
            times[case].append(time.perf_counter_ns() - t)
            if session is not None:
                assert session.branch is b, session
                assert await session.eval(f"open('{case}{i}.txt').read()") == "x"
                await session.close()
    await s.close()
    await b.abort()
    return {case: stats(ns).to_json() for case, ns in times.items()}


async def main(args: argparse.Namespace) -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    tmp = Path(tempfile.mkdtemp(prefix="bench-sessions-"))
    repo = tmp / "repo"
    repo.mkdir()
    (repo / "data.csv").write_text("id,value\n1,2\n")
    results = []
    try:
        async with ba.open_workspace(repo, backend=args.backend) as ws:
            for mb in args.sizes:
                r = await bench_size(ws, mb, args.forks, args.fresh)
                results.append(r)
                print(f"# {mb} MB done: fork p50 {r['fork']['median_ms']:.2f} ms",
                      file=sys.stderr)
            commits = await bench_commit(ws, args.commits) if args.commits else None
        facts = machine_facts(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"Machine: {machine_line(facts)}; backend {args.backend}\n")
    print("| Python objects | setup RSS | session.fork() p50 / p95 | os.fork() alone p50 / "
          "p95 | fresh session + setup p50 / p95 | speed-up (p50) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        f, a, z = r["fork"], r["os_fork"], r["fresh"]
        print(f"| {r['mb']} MB ({r['rows']:,} rows) | {r['setup_rss_mb']} MB | "
              f"{f['median_ms']:.2f} / {f['p95_ms']:.2f} ms | "
              f"{a['median_ms']:.2f} / {a['p95_ms']:.2f} ms | "
              f"{z['median_ms']:.0f} / {z['p95_ms']:.0f} ms | "
              f"{z['median_ms'] / f['median_ms']:.0f}x |")
    if commits is not None:
        base = commits["none"]["median_ms"]
        print(f"\nCommit of a child branch ({args.commits} each, interleaved):\n")
        print("| sessions in the child | commit p50 / p95 | added at p50 |")
        print("|---|---|---|")
        for case, label in (("none", "none (baseline)"), ("fresh", "one, started in it"),
                            ("forked", "one, forked from the parent's")):
            c = commits[case]
            print(f"| {label} | {c['median_ms']:.2f} / {c['p95_ms']:.2f} ms | "
                  f"{c['median_ms'] - base:+.2f} ms |")
    if args.json:
        await anyio.Path(args.json).write_text(json.dumps(
            {"machine": facts, "backend": args.backend, "results": results,
             "commits": commits}, indent=2))


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=lambda v: [int(x) for x in v.split(",")],
                   default=[10, 100, 1000], help="MB of Python objects, comma-separated")
    p.add_argument("--forks", type=int, default=20)
    p.add_argument("--fresh", type=int, default=3)
    p.add_argument("--commits", type=int, default=20,
                   help="commits timed per case (0: skip the commit section)")
    p.add_argument("--backend", default="fuse")
    p.add_argument("--json")
    return p.parse_args(argv)


if __name__ == "__main__":
    anyio.run(main, parse())
