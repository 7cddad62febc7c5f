"""A data-analysis agent that searches over transformations of an in-memory table.

The workspace holds a messy sales table (``sales.csv``). The agent loads it into a
live Python interpreter (``branch.session()``) once: the load stands for an
expensive warm-up (``--warmup`` seconds of it are a deliberate sleep, as a slow
parse, a DataFrame build or a model load would take). Then ``ba.TreeSearch`` looks
for a sequence of cleaning steps after which the table passes five checks. Every
node is a ``ba.InSession`` candidate: its interpreter is a fork of its parent
node's, so it starts from the parent's table in memory, applies one step, and
scores the result; backtracking to any earlier node costs one fork. The proposer
is scripted: at each node it proposes the steps not yet applied.

Order matters: duplicate rows differ in the case of their region, so ``dedupe``
only works after ``normalize_region``, and ``clip_outliers`` needs the amounts
parsed by ``parse_amount`` first. The winner writes ``clean.csv`` and
``steps.json`` in its branch, and the search commits them into the workspace.

With ``--compare``, the same search runs again without sessions: every node
starts a fresh interpreter and re-runs the load and its whole path from the root
(what an agent without forkable state must do). Both runs print the time to a
solution and the work done.

Run:  .venv/bin/python examples/stateful_analysis.py [--warmup 0.5] [--compare]
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

import branchagent as ba

#: The interpreter's setup: load the table (plus the warm-up), define the steps and
#: the checks. Runs once per root node.
SETUP = """
import csv, json, time
time.sleep({warmup})  # stands for an expensive load
with open('sales.csv', newline='') as f:
    table = list(csv.DictReader(f))
steps = []
loads = 1
REGIONS = {{'north', 'south', 'east', 'west'}}

def drop_missing(t):
    return [r for r in t if r['amount'] not in ('', 'NA')]

def normalize_region(t):
    return [dict(r, region=r['region'].strip().lower()) for r in t]

def dedupe(t):
    seen, out = set(), []
    for r in t:
        key = tuple(sorted(r.items()))
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out

def parse_amount(t):
    return [dict(r, amount=float(r['amount'])) for r in t]

def clip_outliers(t):
    return [r for r in t if r['amount'] <= 10_000]

STEPS = {{f.__name__: f for f in (drop_missing, normalize_region, dedupe, parse_amount,
                                  clip_outliers)}}

def checks(t):
    ids = [r['id'] for r in t]
    return {{
        'no_missing': all(r['amount'] not in ('', 'NA') for r in t),
        'unique_ids': len(ids) == len(set(ids)),
        'known_regions': all(r['region'] in REGIONS for r in t),
        'numeric': all(isinstance(r['amount'], float) for r in t),
        'no_outliers': all(isinstance(r['amount'], float) and r['amount'] <= 10_000
                           for r in t),
    }}

def apply(name):
    global table
    table = STEPS[name](table)
    steps.append(name)
    passed = sum(checks(table).values())
    with open('steps.json', 'w') as f:
        json.dump({{'steps': steps, 'passed': passed}}, f)
    if passed == 5:
        with open('clean.csv', 'w', newline='') as f:
            w = csv.DictWriter(f, fieldnames=list(table[0]))
            w.writeheader()
            w.writerows(table)
    return passed
"""
STEP_NAMES = ("drop_missing", "normalize_region", "dedupe", "parse_amount", "clip_outliers")


def make_sales(path: Path, rows: int = 400, seed: int = 7) -> None:
    """A messy table: missing amounts, regions in mixed case with spaces, duplicate rows
    that differ only in the case of their region, and a few outliers."""
    rng = random.Random(seed)
    regions = ["north", "south", "east", "west"]
    out = []
    for i in range(rows):
        amount = "" if i % 37 == 0 else ("NA" if i % 53 == 0 else f"{rng.uniform(1, 900):.2f}")
        if i % 61 == 0:
            amount = f"{rng.uniform(20_000, 90_000):.2f}"
        out.append({"id": str(i), "region": rng.choice(regions), "amount": amount})
    for r in list(out[:: 9]):  # duplicates, as a second export would add them
        out.append(dict(r, region=f" {r['region'].upper()} "))
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "region", "amount"])
        w.writeheader()
        w.writerows(out)


def done_steps(branch: ba.Branch) -> dict[str, Any]:
    """What the node's steps.json says: its steps so far, and the checks they pass."""
    f = branch.path / "steps.json"
    return json.loads(f.read_text()) if f.exists() else {"steps": [], "passed": 0}


def proposer(branch: ba.Branch, _depth: int) -> list[str]:
    """Scripted: the steps this node has not applied yet."""
    done = done_steps(branch)["steps"]
    return [s for s in STEP_NAMES if s not in done]


def all_checks_pass(branch: ba.Branch) -> ba.Verdict:
    """The search's evaluate: a node is a solution when its table passes all five checks
    (fewer steps score higher)."""
    d = done_steps(branch)
    return ba.Verdict(success=d["passed"] == 5, score=d["passed"] - 0.01 * len(d["steps"]))


class Counters:
    def __init__(self) -> None:
        self.loads = 0  # setup runs (table loads)
        self.steps = 0  # steps applied, replays included
        self.nodes = 0


def with_sessions(name: str, warmup: float, n: Counters) -> ba.InSession:
    async def act(s: ba.Session) -> ba.Verdict:
        n.nodes += 1
        fresh = await s.eval("loads")  # 1 in a fresh interpreter's first node, else 0
        n.loads += fresh
        await s.exec("loads = 0")
        n.steps += 1
        passed = await s.eval(f"apply({name!r})")
        return ba.Verdict(success=True, score=passed)  # a viable node; evaluate decides

    return ba.InSession(act, setup=SETUP.format(warmup=warmup))


def re_executing(name: str, warmup: float, n: Counters) -> Any:
    """The same node without forkable state: a fresh interpreter loads the table and
    replays the node's whole path from the root."""
    async def act(branch: ba.Branch) -> ba.Verdict:
        n.nodes += 1
        path = done_steps(branch)["steps"]
        s = await branch.session()  # type: ignore[attr-defined]
        try:
            await s.exec(SETUP.format(warmup=warmup))
            n.loads += 1
            passed = 0
            for step in [*path, name]:
                n.steps += 1
                passed = await s.eval(f"apply({step!r})")
            return ba.Verdict(success=True, score=passed)
        finally:
            await s.close()

    return act


async def search(repo: Path, warmup: float, mode: str) -> tuple[ba.Outcome, Counters, float]:
    n = Counters()
    make = with_sessions if mode == "sessions" else re_executing
    started = time.perf_counter()
    async with ba.open_workspace(repo) as ws:
        outcome = await ba.TreeSearch(
            [make(s, warmup, n) for s in STEP_NAMES],
            expand=lambda b, d: [make(s, warmup, n) for s in proposer(b, d)],
            evaluate=all_checks_pass, budget=60, max_depth=4, stop_on_success=True,
        ).run(ws)
    return outcome, n, time.perf_counter() - started


async def main(args: argparse.Namespace) -> int:
    modes = ["sessions", "re-executing"] if args.compare else ["sessions"]
    for mode in modes:
        with tempfile.TemporaryDirectory(prefix="stateful-analysis-") as tmp:
            repo = Path(tmp) / "repo"
            repo.mkdir()
            make_sales(repo / "sales.csv")
            outcome, n, took = await search(repo, args.warmup, mode)
            steps = (json.loads((repo / "steps.json").read_text())["steps"]
                     if outcome.committed else None)
            clean = (sum(1 for _ in csv.DictReader((repo / "clean.csv").open()))
                     if outcome.committed else 0)
            print(f"{mode}: committed={outcome.committed} steps={steps} rows={clean} "
                  f"nodes={n.nodes} loads={n.loads} steps_run={n.steps} time={took:.2f}s")
            if not outcome.committed:
                for r in outcome.results:
                    print(f"  node {r.index} (parent {r.parent}): success={r.success} "
                          f"score={r.score} error={r.error}")
                return 1
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--warmup", type=float, default=0.5,
                   help="seconds of deliberate sleep in the load (an expensive warm-up)")
    p.add_argument("--compare", action="store_true",
                   help="also run the search re-executing every node's path from the root")
    sys.exit(anyio.run(main, p.parse_args()))
