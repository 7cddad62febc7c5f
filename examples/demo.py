"""branchagent's main job, end to end: fix a bug by trying candidate patches in parallel branches.

It makes a small Python repository with a bug (``median()`` neither sorts
nor averages the middle pair) and a test suite, opens a workspace on it,
and hands five candidate patches to a strategy: some wrong, one right, one
that does not even parse. Each patch is applied in its own copy-on-write
branch and verified there by running the repository's tests in the branch
(``python -m pytest``, isolated so the tests see the branch at the
repository's own path). The winner is committed into the repository; the
losers vanish. Then it prints which branch won and why, the diff, and how
long each candidate took, and runs the tests once more in the repository.

    python examples/demo.py                      # BestOfN on the default (fuse) backend
    python examples/demo.py --strategy speculate # first patch that passes wins
    python examples/demo.py --workdir /tmp/x --json /tmp/x/outcome.json -v

Exit status 0 when a patch was committed and the repository's tests pass.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import structlog

import branchagent as ba

BUGGY = '''\
"""Small statistics helpers."""


def median(values):
    """The median of a non-empty sequence of numbers."""
    values = list(values)
    return values[len(values) // 2]
'''

TESTS = '''\
import pytest

from stats import median


def test_odd_length():
    assert median([3, 1, 2]) == 2


def test_even_length_averages_the_middle_pair():
    assert median([4, 1, 3, 2]) == 2.5


def test_single_value():
    assert median([7]) == 7


def test_input_is_not_modified():
    values = [3, 1, 2]
    median(values)
    assert values == [3, 1, 2]


def test_works_on_any_iterable():
    assert median(x for x in (5, 9, 1)) == 5


def test_empty_input_is_an_error():
    with pytest.raises(ValueError):
        median([])
'''

#: (title, new content of stats.py): what a model might propose, right and wrong.
PATCHES: list[tuple[str, str]] = [
    ("sort the input first", '''\
"""Small statistics helpers."""


def median(values):
    """The median of a non-empty sequence of numbers."""
    values = sorted(values)
    return values[len(values) // 2]
'''),
    ("average the middle pair", '''\
"""Small statistics helpers."""


def median(values):
    """The median of a non-empty sequence of numbers."""
    values = list(values)
    mid = len(values) // 2
    if len(values) % 2 == 0:
        return (values[mid - 1] + values[mid]) / 2
    return values[mid]
'''),
    ("sort in place, average evens", '''\
"""Small statistics helpers."""


def median(values):
    """The median of a non-empty sequence of numbers."""
    values.sort()
    mid = len(values) // 2
    if len(values) % 2 == 0:
        return (values[mid - 1] + values[mid]) / 2
    return values[mid]
'''),
    ("sorted copy, average evens, reject empty", '''\
"""Small statistics helpers."""


def median(values):
    """The median of a non-empty sequence of numbers."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("median() of an empty sequence")
    mid = len(ordered) // 2
    if len(ordered) % 2 == 0:
        return (ordered[mid - 1] + ordered[mid]) / 2
    return ordered[mid]
'''),
    ("one-liner (does not parse)", '''\
"""Small statistics helpers."""


def median(values)
    return sorted(values)[len(values) // 2]
'''),
]

#: The index of the right patch in PATCHES (tests/api/test_demo.py checks the demo picks it).
RIGHT = 3


def make_repository(root: Path) -> Path:
    """A small repository with a bug and the tests that catch it."""
    repo = root / "stats-repo"
    repo.mkdir(parents=True)
    (repo / "stats.py").write_text(BUGGY)
    (repo / "test_stats.py").write_text(TESTS)
    (repo / "pytest.ini").write_text("[pytest]\naddopts = -p no:cacheprovider\n")
    (repo / "README.md").write_text("# stats\n\nSmall statistics helpers.\n")
    return repo


def configure_logging(verbose: bool) -> None:
    """Human-readable logs on stderr. The library never configures logging; the app does."""
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="%H:%M:%S", utc=False),
            structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.INFO if verbose else logging.WARNING
        ),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )


class Verifier:
    """Runs the repository's tests in a branch, isolated where the machine allows it."""

    def __init__(self) -> None:
        self.isolate = True
        self.note: str | None = None

    async def run_tests(self, branch: ba.Branch) -> ba.RunResult:
        limits = ba.Limits(timeout=120)
        if self.isolate:
            try:
                return await branch.run(PYTEST, isolate=True, env=PYTEST_ENV, limits=limits)
            except ba.IsolationUnavailable as exc:
                if self.isolate:
                    self.isolate = False
                    self.note = (f"note: namespaces are not permitted here ({exc}); "
                                 "the tests ran unisolated, with the branch as working directory")
                    print(self.note)
        return await branch.run(PYTEST, isolate=False, env=PYTEST_ENV, limits=limits)


#: How the verifier and the before/after checks run pytest: quiet, no cache, no bytecode
#: files (they would show up as the branch's changes), only pytest's own plugins (fast).
PYTEST = [sys.executable, "-m", "pytest", "-q", "--no-header", "-p", "no:cacheprovider"]
PYTEST_ENV = {"PYTHONDONTWRITEBYTECODE": "1", "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}


def tests_passed(output: str) -> tuple[int, int, str]:
    """(passed, total, short summary) from pytest -q output."""
    counts: dict[str, int] = {}
    for n, kind in re.findall(r"(\d+) (passed|failed|errors?)\b", output):
        counts[kind.rstrip("s") if kind.startswith("error") else kind] = int(n)
    passed = counts.get("passed", 0)
    total = passed + counts.get("failed", 0)
    if counts.get("error"):
        return passed, total, "error: tests not collected"
    return passed, total, f"{passed}/{total} passed"


def candidate(
    index: int, title: str, content: str, verifier: Verifier
) -> Callable[[ba.Branch], Awaitable[ba.Verdict]]:
    """Apply one patch in its branch, run the tests there, and say how it went."""

    async def apply_and_verify(branch: ba.Branch) -> ba.Verdict:
        await anyio.Path(branch.path / "stats.py").write_text(content)
        r = await verifier.run_tests(branch)
        passed, total, summary = tests_passed(r.stdout + r.stderr)
        score = passed / total if total else 0.0
        return ba.Verdict(
            r.ok, score,
            {"title": title, "tests": summary, "passed": passed, "total": total,
             "isolated": r.isolated, "diff": await branch.diff()},
        )

    apply_and_verify.__name__ = f"patch_{index}"
    return apply_and_verify


def short_error(error: str | None) -> str:
    if error is None:
        return ""
    if error.startswith("Cancelled: candidate"):
        return "cancelled: lost the race"
    if error.startswith("TimeoutError"):
        return "timed out"
    return error


def print_summary(outcome: ba.Outcome, strategy: str) -> None:
    print()
    print(f"{'candidate':<46} {'branch':<22} {'verdict':<8} {'tests':<26} time")
    print("-" * 110)
    for r in outcome.results:
        title = str(r.info.get("title", PATCHES[r.index][0]))
        verdict = "PASS" if r.success else "fail"
        tests = str(r.info.get("tests") or short_error(r.error))
        won = outcome.winner is not None and r.index == outcome.winner.index
        mark = "  <- winner" if won else ""
        print(f"{r.index} {title:<44} {r.branch or '-':<22} {verdict:<8} {tests[:26]:<26} "
              f"{r.duration:.2f} s{mark}")
    print()
    w = outcome.winner
    if w is None:
        print("no candidate was committed: none passed the test suite")
        return
    passed, total = w.info.get("passed"), w.info.get("total")
    if strategy == "speculate":
        why = ("it was the first candidate whose patch passed the whole test suite "
               f"({passed}/{total}); the others were cancelled at that instant")
    else:
        why = (f"its patch passed the whole test suite ({passed}/{total} tests, score "
               f"{w.score:.2f}), the best score among the candidates that passed; "
               "ties would go to the lowest index")
    others = len(outcome.results) - 1
    print(f"winner: candidate {w.index} \"{w.info.get('title')}\" in branch {w.branch}:")
    print(textwrap.fill(why, width=88, initial_indent="  ", subsequent_indent="  "))
    print(f"committed into the repository; the {others} other branches were aborted")
    print()
    print("what changed (the winning branch's diff):")
    print(textwrap.indent(str(w.info.get("diff", "")).rstrip(), "  "))


async def run_tests_in(repo: Path) -> subprocess.CompletedProcess[bytes]:
    """The repository's tests, run in the repository itself (outside any branch)."""
    return await anyio.run_process(PYTEST, cwd=repo, check=False,
                                   env={**os.environ, **PYTEST_ENV})


async def run_demo(args: argparse.Namespace, workdir: Path) -> int:
    repo = make_repository(workdir)
    verifier = Verifier()
    print(f"branchagent demo: fix a bug with {len(PATCHES)} candidate patches, "
          "each verified in its own branch")
    print(f"  repository: {repo}")
    print(f"  backend: {args.backend}, strategy: {args.strategy}")
    cands = [candidate(i, title, content, verifier) for i, (title, content) in enumerate(PATCHES)]
    strategy: ba.Strategy
    if args.strategy == "speculate":
        strategy = ba.Speculate(cands, timeout=args.timeout)
    else:
        strategy = ba.BestOfN(cands, timeout=args.timeout)
    async with ba.open_workspace(repo, backend=args.backend) as ws:
        before = await run_tests_in(repo)
        print(f"  before: the repository's tests: {tests_passed(before.stdout.decode())[2]}")
        outcome = await strategy.run(ws)
        left_open = ws.branches()
    print_summary(outcome, args.strategy)
    after = await run_tests_in(repo)
    print()
    summary = tests_passed(after.stdout.decode())[2]
    print(f"after the commit, the repository's own test run: {summary}")
    busy = sum(r.duration for r in outcome.results)
    print(f"the strategy took {outcome.duration:.2f} s for {len(PATCHES)} candidates "
          f"(their times add up to {busy:.2f} s: they ran in parallel)")
    if verifier.note:
        print(verifier.note)
    if args.json is not None:
        await anyio.Path(args.json).write_text(outcome.to_json(indent=2))
        print(f"outcome written to {args.json}")
    if left_open:
        print(f"error: branches left open: {left_open}", file=sys.stderr)
        return 1
    return 0 if outcome.committed and after.returncode == 0 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--backend", default="fuse",
                        help="workspace backend (default: fuse, the copy-on-write filesystem; "
                             "copy works anywhere)")
    parser.add_argument("--strategy", choices=["best_of_n", "speculate"], default="best_of_n")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="bound on the strategy's wall time, seconds (default 300)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="make the sample repository here and keep it (default: a temp dir)")
    parser.add_argument("--json", default=None, help="also write the outcome as JSON to this file")
    parser.add_argument("-v", "--verbose", action="store_true", help="show the library's logs")
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    try:
        if args.workdir is not None:
            args.workdir.mkdir(parents=True, exist_ok=True)
            return anyio.run(run_demo, args, args.workdir.resolve())
        with tempfile.TemporaryDirectory(prefix="branchagent-demo-") as tmp:
            return anyio.run(run_demo, args, Path(tmp))
    except ba.BackendNotFound as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
