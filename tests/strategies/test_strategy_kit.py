"""The public strategy kit: events from the arena, the import cycle that is gone, the base class."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import attrs
import pytest

import branchagent as ba
from branchagent import strategy as kit

pytestmark = pytest.mark.anyio


def test_the_speculative_execution_module_imports_first_in_a_fresh_interpreter() -> None:
    code = "from branchagent_strategies.speculative_execution import llm_proposer; print('ok')"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


_BUILT_INS = Path(__file__).resolve().parents[2] / "strategies" / "branchagent_strategies"
_FIRST_IMPORTS = [
    *sorted(f"branchagent_strategies.{p.stem}".removesuffix(".__init__")
            for p in _BUILT_INS.glob("*.py")),
    "branchagent.llm",
    "branchagent.strategy",
]


@pytest.mark.parametrize("module", _FIRST_IMPORTS)
def test_every_built_in_and_kit_module_imports_first_in_a_fresh_interpreter(module: str) -> None:
    """Importing a submodule runs its packages' ``__init__`` first, which the layering test
    does not count: here any order of first import works, ``branchagent``'s names after it."""
    code = (f"import importlib; importlib.import_module({module!r}); import branchagent as ba; "
            "assert ba.BestOfN is ba.get_strategy('best_of_n'); print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def _one_of_each() -> list[kit.Strategy]:
    def ok(b: ba.Branch) -> bool:
        return True

    return [
        ba.Beam([ok], expand=lambda b, d: []),
        ba.BestOfN([ok]),
        ba.Cascaded(lambda b, i, f: True),
        ba.Merge([ok]),
        ba.Reflexion(lambda b, f: True, max_attempts=1),
        ba.Speculate([ok]),
        ba.SpeculativeExecution(lambda b, s: [], k=1, max_steps=1),
        ba.Tournament([ok], judge=lambda a, b: 0),
        ba.TreeSearch([ok], expand=lambda b, d: []),
    ]


def test_a_strategy_is_hashable_and_equal_only_to_itself() -> None:
    """Identity equality and hashing, as before the built-ins were attrs classes."""
    first, second = _one_of_each(), _one_of_each()
    assert {type(s).__name__ for s in first} == {
        name for name in ba.__all__
        if isinstance(getattr(ba, name), type) and issubclass(getattr(ba, name), kit.Strategy)
        and getattr(ba, name) is not kit.Strategy}
    for a, b in zip(first, second, strict=True):
        assert a == a, type(a).__name__
        assert a != b, type(a).__name__
        assert hash(a) == hash(a) == object.__hash__(a), type(a).__name__
    assert len(set(first) | set(second)) == 2 * len(first)
    assert {first[0]: 1}[first[0]] == 1


def test_the_kit_exports_the_branch_types_the_built_ins_use() -> None:
    assert kit.Branch is ba.Branch
    assert kit.BranchState is ba.BranchState


def test_the_kit_is_what_the_top_level_exports() -> None:
    for name in ("Strategy", "Outcome", "Result", "Verdict", "Command", "Executor",
                 "get_strategy", "run_candidate"):
        assert getattr(ba, name) is getattr(kit, name)
    assert sorted(kit.__all__, key=str.lower) == sorted(set(kit.__all__), key=str.lower)
    assert all(hasattr(kit, name) for name in kit.__all__)


def test_the_base_validates_the_common_options_once() -> None:
    with pytest.raises(ValueError, match="timeout must be a positive number"):
        ba.Speculate([ba.Command(["true"])], timeout=0)
    with pytest.raises(ValueError, match="max_parallel must be a positive int"):
        ba.Beam([], expand=lambda b, d: [], max_parallel=0)
    s = ba.Reflexion(lambda b, f: True, max_attempts=2, timeout=3, max_parallel=1)
    assert (s.timeout, s.max_parallel, s.executor) == (3.0, 1, None)
    assert repr(s).startswith("Reflexion(timeout=3.0, max_parallel=1, executor=None")


def test_a_plain_subclass_that_sets_nothing_still_has_a_repr() -> None:
    class Old(kit.Strategy):
        name = "old"

        def __init__(self) -> None:
            pass

        async def run(self, target: kit.Target) -> kit.Outcome:
            raise NotImplementedError

    assert repr(Old()) == "Old(timeout=None, max_parallel=None, executor=None, commit=None)"
    assert attrs.has(ba.BestOfN)


async def test_best_of_n_emits_candidate_events_in_order(repo: Path) -> None:
    def cand(i: int, ok: bool) -> kit.Candidate:
        async def candidate(b: ba.Branch) -> kit.Verdict:
            (b.path / "f.txt").write_text(str(i))
            return kit.Verdict(ok, float(i))

        return candidate

    events: list[ba.Event] = []
    async with ba.open_workspace(repo, backend="copy") as ws:
        with ba.observe(events.append):
            outcome = await ba.BestOfN([cand(0, True), cand(1, True), cand(2, False)]).run(ws)
    assert outcome.winner is not None
    assert outcome.winner.index == 1
    ours = [e for e in events if e.kind.startswith(("candidate_", "winner_"))]
    kinds = [(e.kind, e.index) for e in ours]
    for i in range(3):
        assert kinds.count(("candidate_started", i)) == 1
        assert kinds.count(("candidate_finished", i)) == 1
        assert kinds.index(("candidate_started", i)) < kinds.index(("candidate_finished", i))
    assert kinds[-1] == ("winner_committed", 1)  # after every candidate finished
    assert [k for k, _ in kinds].count("winner_committed") == 1
    for e in ours:
        assert e.strategy == "best_of_n"
        assert e.depth == 0
        assert e.branch == outcome.results[e.index or 0].branch
    finished = {e.index: e.data for e in ours if e.kind == "candidate_finished"}
    assert finished[2]["success"] is False
    assert finished[1]["success"] is True
    assert finished[1]["score"] == 1.0
    assert finished[1]["error"] is None
    assert finished[1]["duration"] > 0
