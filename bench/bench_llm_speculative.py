"""Speculative execution with a real model as the proposer: acceptance and calls saved.

    make vllm smollm2
    .venv-vllm/bin/python bench/bench_llm_speculative.py [--k 4]

SmolLM2-135M-Instruct (vLLM CPU, in this process) writes a list one line per step into
``out.txt`` of a workspace (which starts with the list's first line; the prompt is a
plain completion: a header, then the list so far); a real verifier
(``python3 check.py``, a file of the workspace) accepts a step when the list so far is a
correct prefix of the target, and the goal holds when the list is complete.
``SpeculativeExecution`` with
``llm_proposer``: each proposer call is ONE model completion (greedy), cut into lines,
whose first ``k`` are run as a chain of steps; the verified prefix is committed and the
next call starts from there. The same runs with ``k=1`` are the step-by-step baseline
(one model call per step). Reported per task: drafted, accepted, acceptance rate,
proposer calls, calls saved, whether the goal was reached, and wall time.
Results: Markdown on stdout, bench/results/llm_speculative.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import attrs

if __package__ in (None, ""):  # run as a script: make ``bench._util`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._util import load_smollm2, machine_facts, machine_line

ROOT = Path(__file__).resolve().parents[1]
SAMPLING: dict[str, Any] = {"max_tokens": 64, "temperature": 0.0}
OUT = "out.txt"

CHECK = '''\
import json, sys
target = json.load(open("target.json"))
lines = open("out.txt").read().splitlines() if __import__("os").path.exists("out.txt") else []
sys.exit(0 if lines == target[:len(lines)] and len(lines) <= len(target) else 1)
'''


@attrs.frozen
class ListTask:
    name: str
    header: str
    target: tuple[str, ...]


TASKS = (
    ListTask("count", "Numbers from 1 to 24, one per line:",
             tuple(str(i) for i in range(1, 25))),
    ListTask("alphabet", "The letters of the alphabet from a to z, one per line:",
             tuple(chr(c) for c in range(ord("a"), ord("z") + 1))),
    ListTask("fives", "Multiples of 5 from 5 to 100, one per line:",
             tuple(str(5 * i) for i in range(1, 21))),
    ListTask("evens", "Even numbers from 2 to 40, one per line:",
             tuple(str(2 * i) for i in range(1, 21))),
)


async def _run(engine: Any, task: ListTask, k: int, tmp: Path) -> dict[str, Any]:
    import branchagent as ba
    import branchagent.llm as llm
    from branchagent_strategies.speculative_execution import llm_proposer

    repo = tmp / f"{task.name}-k{k}"
    repo.mkdir()
    (repo / "check.py").write_text(CHECK)
    (repo / "target.json").write_text(json.dumps(list(task.target)))
    (repo / OUT).write_text(task.target[0] + "\n")  # the list starts with its first line

    def prompt(branch: ba.Branch) -> str:
        # A plain completion: this small chat model continues a list it sees; asked in a
        # chat turn it writes one run-on line instead.
        return f"{task.header}\n" + (branch.path / OUT).read_text()

    async def append(branch: ba.Branch, completion: llm.Completion) -> list[str]:
        path = anyio.Path(branch.path / OUT)
        old = await path.read_text() if await path.exists() else ""
        await path.write_text(old + completion.text.strip() + "\n")
        return [OUT]

    async def goal(branch: ba.Branch) -> bool:
        path = anyio.Path(branch.path / OUT)
        return await path.exists() and len((await path.read_text()).splitlines()) >= len(
            task.target)

    propose = llm_proposer(engine, prompt, apply=append, sampling=SAMPLING)
    strategy = ba.SpeculativeExecution(
        propose, verify=ba.Command([sys.executable, "check.py"], isolate=False), goal=goal,
        k=k, max_steps=4 * len(task.target), max_proposals=2 * len(task.target))
    started = time.perf_counter()
    async with ba.open_workspace(repo, backend="copy") as ws:
        outcome = await strategy.run(ws)
    wall = time.perf_counter() - started
    written = (repo / OUT).read_text().splitlines() if (repo / OUT).exists() else []
    info = outcome.info
    return {"task": task.name, "k": k, "drafted": info["drafted"],
            "accepted": info["accepted"], "acceptance_rate": info["acceptance_rate"],
            "proposer_calls": info["proposer_calls"], "calls_saved": info["calls_saved"],
            "goal_reached": info["goal_reached"], "stopped": info["stopped"],
            "lines_committed": len(written), "correct_prefix":
                written == list(task.target[:len(written)]), "wall_s": wall}


async def _bench(engine: Any, ks: Sequence[int], tmp: Path) -> list[dict[str, Any]]:
    out = []
    for task in TASKS:
        for k in ks:
            r = await _run(engine, task, k, tmp)
            out.append(r)
            print(f"{task.name} k={k}: {r['accepted']}/{r['drafted']} accepted, "
                  f"{r['proposer_calls']} calls, goal {r['goal_reached']}, "
                  f"{r['wall_s']:.1f} s", file=sys.stderr, flush=True)
    return out


def render(facts: dict[str, str], results: list[dict[str, Any]]) -> str:
    lines = [f"Machine: {machine_line(facts)}; SmolLM2-135M-Instruct, vLLM CPU float32, "
             f"greedy, max_tokens {SAMPLING['max_tokens']}.", "",
             "| task | k | drafted | accepted | acceptance | proposer calls | calls saved "
             "| goal | lines committed (all correct) | wall |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        rate = "-" if r["acceptance_rate"] is None else f"{100 * r['acceptance_rate']:.0f} %"
        lines.append(
            f"| {r['task']} | {r['k']} | {r['drafted']} | {r['accepted']} | {rate} "
            f"| {r['proposer_calls']} | {r['calls_saved']} | {r['goal_reached']} "
            f"| {r['lines_committed']} ({r['correct_prefix']}) | {r['wall_s']:.1f} s |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=ROOT / ".models" / "smollm2")
    p.add_argument("--k", type=int, default=4, help="steps drafted per proposer call (4)")
    args = p.parse_args(argv)
    if not (args.model / "config.json").is_file():
        print(f"no model at {args.model}: run `make smollm2` first", file=sys.stderr)
        return 2
    engine, _ = load_smollm2(args.model)
    with tempfile.TemporaryDirectory(prefix="bench-llm-spec-") as tmp_name:
        tmp = Path(tmp_name)
        results = anyio.run(_bench, engine, (args.k, 1), tmp)
        facts = machine_facts(tmp)
    print(render(facts, results))
    out = ROOT / "bench" / "results" / "llm_speculative.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"facts": facts, "sampling": SAMPLING, "results": results},
                              indent=2))
    return 0 if all(r["correct_prefix"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
