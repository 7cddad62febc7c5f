"""What starting a process in a branch costs, and whether it grows with the caller's memory.

    python bench/bench_spawn.py [--runs 40] [--ballast-mb 1500] [--quick]

Each run starts ``sh -c true`` in a branch (``Branch.run``, unisolated, no limits) and
waits for it, the way a verifier runs. Two ways of starting it are measured in the same
run, on each event loop available (asyncio; uvloop when it is installed, as in vLLM's
server and the vLLM venv), with a small caller and with a caller holding ``--ballast-mb``
of touched memory (a stand-in for an API server with torch loaded):

- ``sandbox``: branchagent's own start (``subprocess.Popen``, vfork, awaited through a pidfd);
- ``loop spawn``: ``anyio.open_process``, the event loop's own start (the baseline: what
  branchagent used before; uvloop forks there, copying the caller's page tables).

Each (loop, ballast, way) runs in a fresh interpreter of its own: a fork by one way
write-protects the caller's pages, which would slow the other way down in turn.
Results: a Markdown table on stdout and bench/results/spawn.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``bench._util`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._util import machine_facts, machine_line, stats

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("sandbox", "loop spawn")


def _has_uvloop() -> bool:
    return importlib.util.find_spec("uvloop") is not None


async def _measure(repo: Path, method: str, runs: int) -> list[int]:
    import anyio

    import branchagent as ba

    samples: list[int] = []
    async with ba.open_workspace(repo, backend="copy") as ws:
        branch = await ws.fork()
        for i in range(runs + 3):  # 3 warm-up rounds
            t0 = time.perf_counter_ns()
            if method == "sandbox":
                r = await branch.run(["sh", "-c", "true"], isolate=False)
                assert r.returncode == 0
            else:
                async with await anyio.open_process(["sh", "-c", "true"], cwd=branch.path,
                                                    start_new_session=True) as proc:
                    await proc.wait()
                assert proc.returncode == 0
            if i >= 3:
                samples.append(time.perf_counter_ns() - t0)
        await branch.abort()
    return samples


def _child(loop: str, ballast_mb: int, method: str, repo: str, runs: int) -> None:
    """One configuration, in this (fresh) interpreter: prints its samples as JSON."""
    import anyio

    ballast = bytearray(ballast_mb * 2**20)
    for i in range(0, len(ballast), 4096):  # touch every page: it is mapped for real
        ballast[i] = 1
    options = {"use_uvloop": True} if loop == "uvloop" else {}
    samples = anyio.run(_measure, Path(repo), method, runs, backend="asyncio",
                        backend_options=options)
    rss_kb = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text()
                  .splitlines() if line.startswith("VmRSS:"))
    print(json.dumps({"samples": samples, "rss_mb": rss_kb // 1024}))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=40)
    p.add_argument("--ballast-mb", type=int, default=1500)
    p.add_argument("--quick", action="store_true", help="10 runs, 300 MB: a smoke run")
    p.add_argument("--child", nargs=5, metavar=("LOOP", "MB", "METHOD", "REPO", "RUNS"),
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        loop, mb, method, repo, runs = args.child
        _child(loop, int(mb), method, repo, int(runs))
        return 0
    runs = 10 if args.quick else args.runs
    ballast = 300 if args.quick else args.ballast_mb
    loops = ["asyncio"] + (["uvloop"] if _has_uvloop() else [])
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-spawn-") as tmp_name:
        tmp = Path(tmp_name)
        repo = tmp / "repo"
        repo.mkdir()
        (repo / "a.txt").write_text("a\n")
        for loop in loops:
            for mb in (0, ballast):
                row: dict[str, Any] = {"loop": loop, "ballast_mb": mb, "stats": {}}
                for method in METHODS:
                    out = subprocess.run(
                        [sys.executable, os.fspath(Path(__file__).resolve()), "--child", loop,
                         str(mb), method, os.fspath(repo), str(runs)],
                        check=True, capture_output=True, text=True,
                        env={**os.environ, "PYTHONPATH": os.fspath(ROOT / "src")})
                    doc = json.loads(out.stdout.strip().splitlines()[-1])
                    row["rss_mb"] = doc["rss_mb"]
                    row["stats"][method] = stats(doc["samples"]).to_json()
                results.append(row)
        facts = machine_facts(tmp)
    lines = [f"Machine: {machine_line(facts)}; {runs} runs each of `sh -c true` in a branch "
             "(copy backend, unisolated, no limits).", "",
             "| loop | caller RSS | sandbox p50 / p95 | loop spawn p50 / p95 |",
             "|---|---|---|---|"]
    for r in results:
        s = r["stats"]
        cell = {k: f"{s[k]['median_ms']:.2f} / {s[k]['p95_ms']:.2f} ms" for k in s}
        lines.append(f"| {r['loop']} | {r['rss_mb']} MB | {cell['sandbox']} "
                     f"| {cell['loop spawn']} |")
    if len(loops) == 1:
        lines += ["", "uvloop is not installed in this interpreter: run this with "
                  "`.venv-vllm/bin/python` to measure it too."]
    print("\n".join(lines))
    path = ROOT / "bench" / "results" / "spawn.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"facts": facts, "runs": runs, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
