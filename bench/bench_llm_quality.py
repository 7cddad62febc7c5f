"""A real model's solve rate with and without verified best-of-N, and what a request costs.

    make vllm smollm2
    .venv-vllm/bin/python bench/bench_llm_quality.py [--n 16] [--tasks 32] [--quick]
    .venv-vllm/bin/python bench/bench_llm_quality.py --check-tasks   # the task set itself

SmolLM2-135M-Instruct (``make smollm2``) on vLLM's CPU build, in this process. For each
task of bench/llm_tasks.py (a small function or bug fix in ``solution.py`` with a pytest
file that fails on it) the model is asked ONCE for ``n`` samples (chat, temperature 0.7,
top_p 0.95, a fixed seed). Each sample is written into its own branch of a workspace
holding the task (``--apply file:solution.py`` semantics: its one code block) and the
task's real pytest runs there. From those ``n`` verdicts:

- pass@1: whether the first sample passes; also the mean over samples (the unbiased
  pass@1 estimate);
- verified best-of-N for N = 4, 8, 16 (the first N samples): a verified one exists, and
  for N = n the best verified (by mean token logprob) is committed for real and the
  task's test is run again in the workspace itself;
- logprob-only best_of (what vLLM's removed ``best_of`` did): the sample with the best
  mean logprob among the first N, verified or not: does it pass?

Cost per request (one task, N = n): the model's generation time, branch work (fork +
apply of every sample, the commit and the abort of the others, summed), the verifiers'
time, and branch work as a share of the request's wall time. Results: Markdown on stdout,
bench/results/llm_quality.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio

if __package__ in (None, ""):  # run as a script: make ``bench._util`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._util import load_smollm2, machine_facts, machine_line
from bench.llm_tasks import FILE, TASKS, TEST_FILE, Task

ROOT = Path(__file__).resolve().parents[1]
SAMPLING: dict[str, Any] = {"max_tokens": 192, "temperature": 0.7, "top_p": 0.95, "seed": 0}
PYTEST = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", TEST_FILE]
PYTEST_ENV = {"PYTHONDONTWRITEBYTECODE": "1", "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
#: Seconds one verification may run (a sample may loop forever).
VERIFY_TIMEOUT = 20


def _write_task(root: Path, task: Task, source: str | None = None) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / FILE).write_text(task.start if source is None else source)
    (root / TEST_FILE).write_text(task.test)


def _pytest(root: Path) -> int:
    try:
        return subprocess.run(PYTEST, cwd=root, env={**os.environ, **PYTEST_ENV},
                              capture_output=True, timeout=VERIFY_TIMEOUT,
                              check=False).returncode
    except subprocess.TimeoutExpired:
        return -1


def check_tasks(tasks: Sequence[Task]) -> int:
    """Each task's test fails on its start and passes on its reference."""
    bad = 0
    with tempfile.TemporaryDirectory(prefix="llm-tasks-") as tmp:
        for task in tasks:
            root = Path(tmp) / task.name
            _write_task(root, task)
            before = _pytest(root)
            _write_task(root, task, task.reference)
            after = _pytest(root)
            ok = before == 1 and after == 0
            bad += not ok
            print(f"{'ok ' if ok else 'BAD'} {task.name}: start exit {before}, "
                  f"reference exit {after}")
    print(f"{len(tasks) - bad} of {len(tasks)} tasks check out")
    return 1 if bad else 0


async def _one_task(engine: Any, task: Task, root: Path, n: int,
                    sizes: Sequence[int]) -> dict[str, Any]:
    import branchagent as ba
    import branchagent.llm as llm
    from branchagent.strategy import Command, run_candidate

    verify = Command(PYTEST, env=PYTEST_ENV, isolate=False,
                     limits=ba.Limits(timeout=VERIFY_TIMEOUT))
    _write_task(root, task)
    messages = [{"role": "user", "content": task.prompt()}]
    t_request = time.perf_counter()
    completions = await llm.VLLMSource(engine).sample(messages, n, sampling=SAMPLING)
    generation = time.perf_counter() - t_request
    rows: list[dict[str, Any]] = [{} for _ in completions]
    limiter = anyio.CapacityLimiter(2)  # two cores: two verifications at a time
    async with ba.open_workspace(root, backend="copy") as ws:
        branches: list[ba.Branch] = []

        async def candidate(i: int, c: llm.Completion) -> None:
            async with limiter:
                row = rows[i]
                t0 = time.perf_counter()
                b = await ws.fork(f"s{i}")
                branches.append(b)
                t1 = time.perf_counter()
                try:
                    await llm.write_file(b, c, path=FILE)
                    applied = True
                except ba.ApplyError:
                    applied = False
                t2 = time.perf_counter()
                verified = False
                if applied:
                    verified = (await run_candidate(verify, b)).success
                t3 = time.perf_counter()
                row.update(index=i, branch=b.name, applied=applied, verified=verified,
                           logprob=llm.mean_logprob(c), fork=t1 - t0, apply=t2 - t1,
                           verify=t3 - t2)

        t_candidates = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for i, c in enumerate(completions):
                tg.start_soon(candidate, i, c)
        candidates_wall = time.perf_counter() - t_candidates

        def best(pool: list[dict[str, Any]]) -> dict[str, Any] | None:
            return max(pool, key=lambda r: (r["logprob"], -r["index"]), default=None)

        result: dict[str, Any] = {"task": task.name, "pass_first": rows[0]["verified"],
                                  "pass_rate": sum(r["verified"] for r in rows) / n}
        for size in sizes:
            first = rows[:size]
            result[f"verified_best_of_{size}"] = best([r for r in first if r["verified"]]) \
                is not None
            top = best(first)
            result[f"logprob_best_of_{size}"] = bool(top and top["verified"])
        winner = best([r for r in rows if r["verified"]])
        by_name = {b.name: b for b in branches}
        t4 = time.perf_counter()
        if winner is not None:
            await by_name[winner["branch"]].commit()
        t5 = time.perf_counter()
        await ws.abort_many(branches)
        t6 = time.perf_counter()
    request_wall = time.perf_counter() - t_request
    committed_passes = winner is not None and _pytest(root) == 0
    branch_work = sum(r["fork"] + r["apply"] for r in rows) + (t5 - t4) + (t6 - t5)
    result.update(
        committed=winner is not None, committed_passes=committed_passes,
        generation_s=generation, candidates_wall_s=candidates_wall,
        verify_sum_s=sum(r["verify"] for r in rows), branch_work_s=branch_work,
        commit_s=t5 - t4, abort_s=t6 - t5, request_wall_s=request_wall,
        branch_share=branch_work / request_wall, samples=rows)
    return result


def _pct(values: Sequence[float]) -> tuple[float, float]:
    ordered = sorted(values)
    p95 = ordered[0] if len(ordered) == 1 else statistics.quantiles(
        ordered, n=20, method="inclusive")[18]
    return statistics.median(ordered), p95


def render(facts: dict[str, str], results: list[dict[str, Any]], n: int,
           sizes: Sequence[int], model_load_s: float) -> str:
    k = len(results)

    def rate(key: str) -> str:
        hits = sum(bool(r[key]) for r in results)
        return f"{hits} / {k} ({100 * hits / k:.0f} %)"

    lines = [f"Machine: {machine_line(facts)}; SmolLM2-135M-Instruct, vLLM CPU float32, "
             f"{k} tasks, n={n} samples per task in one call, temperature "
             f"{SAMPLING['temperature']}, top_p {SAMPLING['top_p']}, max_tokens "
             f"{SAMPLING['max_tokens']}, seed {SAMPLING['seed']}; model load "
             f"{model_load_s:.1f} s.", "",
             "| method | tasks solved |", "|---|---|",
             f"| pass@1 (the first sample) | {rate('pass_first')} |",
             f"| pass@1, mean over all {n} samples | "
             f"{100 * statistics.mean(r['pass_rate'] for r in results):.0f} % |"]
    for size in sizes:
        lines.append(f"| logprob-only best_of={size} (vLLM's old best_of) "
                     f"| {rate(f'logprob_best_of_{size}')} |")
    for size in sizes:
        lines.append(f"| verified best-of-{size} | {rate(f'verified_best_of_{size}')} |")
    lines.append(f"| verified best-of-{n}, committed and re-tested in the workspace "
                 f"| {rate('committed_passes')} |")
    lines += ["", f"| per request (N = {n}) | median | p95 |", "|---|---|---|"]
    for key, label, scale, unit in [
        ("request_wall_s", "request wall time", 1, "s"),
        ("generation_s", "generation (the model)", 1, "s"),
        ("candidates_wall_s", "candidates: fork, apply, verify (2 at a time)", 1, "s"),
        ("verify_sum_s", "verifiers' own time (summed)", 1, "s"),
        ("branch_work_s", "branch work: fork + apply + commit + abort (summed)", 1e3, "ms"),
        ("commit_s", "commit of the winner (its siblings invalidated and released)", 1e3,
         "ms"),
        ("abort_s", f"abort_many of the other {n - 1} (after a commit: already released "
                    "by it)", 1e3, "ms"),
        ("branch_share", "branch work / request wall", 100, "%"),
    ]:
        p50, p95 = _pct([r[key] * scale for r in results])
        lines.append(f"| {label} | {p50:.2f} {unit} | {p95:.2f} {unit} |")
    return "\n".join(lines)


async def _bench(engine: Any, tasks: Sequence[Task], n: int, sizes: Sequence[int],
                 tmp: Path) -> list[dict[str, Any]]:
    out = []
    for i, task in enumerate(tasks):
        r = await _one_task(engine, task, tmp / task.name, n, sizes)
        out.append(r)
        print(f"[{i + 1}/{len(tasks)}] {task.name}: {sum(s['verified'] for s in r['samples'])}"
              f"/{n} verified, first {'passes' if r['pass_first'] else 'fails'}, "
              f"generation {r['generation_s']:.1f} s, branch work "
              f"{1e3 * r['branch_work_s']:.0f} ms", file=sys.stderr, flush=True)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=ROOT / ".models" / "smollm2")
    p.add_argument("--n", type=int, default=16, help="samples per task (16)")
    p.add_argument("--tasks", type=int, default=len(TASKS), help="how many of the tasks")
    p.add_argument("--quick", action="store_true", help="5 tasks, n=4: a smoke run")
    p.add_argument("--check-tasks", action="store_true",
                   help="only check that each task fails as given and passes as fixed")
    args = p.parse_args(argv)
    if args.check_tasks:
        return check_tasks(TASKS)
    n, tasks = (4, TASKS[:5]) if args.quick else (args.n, TASKS[: args.tasks])
    sizes = [s for s in (4, 8, 16) if s <= n]
    if not (args.model / "config.json").is_file():
        print(f"no model at {args.model}: run `make smollm2` first", file=sys.stderr)
        return 2
    engine, model_load = load_smollm2(args.model)
    with tempfile.TemporaryDirectory(prefix="bench-llm-quality-") as tmp_name:
        tmp = Path(tmp_name)
        results = anyio.run(_bench, engine, tasks, n, sizes, tmp)
        facts = machine_facts(tmp)
    print(render(facts, results, n, sizes, model_load))
    out = ROOT / "bench" / "results" / "llm_quality.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"facts": facts, "n": n, "sampling": SAMPLING,
                               "model_load_s": model_load, "results": results}, indent=2))
    solved = [r for r in results if r["committed"]]
    if solved and not all(r["committed_passes"] for r in solved):
        print("a committed winner did not pass its test in the workspace", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
