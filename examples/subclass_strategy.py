"""Subclassing a built-in strategy inside your own agent loop.

An agent fixes a tiny repository step by step. Each step is a best-of-N
over candidate edits, verified by running the tests in each branch. The
subclass adds what this agent wants on top of BestOfN: when no candidate of
a step passes, it widens the search once with fallback candidates before
giving up, and it keeps a log of every round.

Run:  .venv/bin/python examples/subclass_strategy.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import anyio
import attrs

import branchagent as ba
from branchagent.strategy import Target, to_candidates_or_empty


@attrs.define(kw_only=True, eq=False)
class WideningBestOfN(ba.BestOfN):
    """BestOfN that tries ``fallback`` candidates when the first round has no success.

    Every option of BestOfN (``evaluate``, ``timeout``, ``max_parallel``,
    ``executor``, ...) is inherited, and the fallback round keeps them.
    """

    fallback: tuple[ba.Candidate, ...] = attrs.field(default=(), converter=to_candidates_or_empty)
    rounds: list[ba.Outcome] = attrs.field(factory=list, init=False)

    async def run(self, target: Target) -> ba.Outcome:
        outcome = await super().run(target)
        self.rounds.append(outcome)
        if outcome.committed or not self.fallback:
            return outcome
        wider = attrs.evolve(self, candidates=self.fallback, fallback=(), scores=None)
        outcome = await wider.run(target)
        self.rounds.append(outcome)
        return outcome


def edit(path: str, text: str) -> ba.Candidate:
    async def candidate(branch: ba.Branch) -> bool:
        await anyio.Path(branch.path / path).write_text(text)
        return True

    return candidate


TESTS = ba.Command([sys.executable, "-c", "import calc; assert calc.add(2, 3) == 5; "
                    "assert calc.mul(2, 3) == 6"], isolate=False)


async def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        repo.mkdir()
        (repo / "calc.py").write_text("def add(a, b):\n    return a - b\n\n"
                                      "def mul(a, b):\n    return a + b\n")
        steps = [
            # Step 1: every first-round candidate is wrong; the fallback has the fix.
            WideningBestOfN(
                [edit("calc.py", "def add(a, b):\n    return a * b\n\n"
                                 "def mul(a, b):\n    return a + b\n")],
                fallback=[edit("calc.py", "def add(a, b):\n    return a + b\n\n"
                                          "def mul(a, b):\n    return a * b\n")],
                evaluate=TESTS,
                timeout=120,
            ),
        ]
        async with ba.open_workspace(repo, backend="copy") as ws:
            for number, strategy in enumerate(steps, 1):
                outcome = await strategy.run(ws)
                print(f"step {number}: {len(strategy.rounds)} round(s), "
                      f"committed={outcome.committed}")
                if not outcome.committed:
                    return 1
        print((repo / "calc.py").read_text(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(anyio.run(main))
