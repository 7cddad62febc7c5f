"""Inputs checked at the door: candidates, limits and workspace paths that cannot work are
refused with an error that names the problem and the fix, and nothing is created."""

from __future__ import annotations

import math
import os
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import branchagent as ba
from _support import requires_fuse, tree_state, workspace
from branchagent._sandbox._spawn import isolation_problem

pytestmark = pytest.mark.anyio


def _there(path: str) -> bool:
    return os.path.lexists(path)


def _ok(b: ba.Branch) -> bool:
    return True


async def _expand(b: ba.Branch, depth: int) -> list[ba.Candidate]:
    return []


async def _judge(a: ba.Branch, b: ba.Branch) -> int:
    return 0


#: Every built-in strategy that takes a list of candidates, built with ``candidates``.
MAKERS: dict[str, Callable[[Any], ba.Strategy]] = {
    "BestOfN": lambda c: ba.BestOfN(c),
    "Speculate": lambda c: ba.Speculate(c),
    "Merge": lambda c: ba.Merge(c),
    "Tournament": lambda c: ba.Tournament(c, judge=_judge),
    "Beam": lambda c: ba.Beam(c, expand=_expand),
    "TreeSearch": lambda c: ba.TreeSearch(c, expand=_expand),
}
#: Those whose candidates may be empty: expand proposes more (it is never called on none,
#: and the run says so); every other one would fork nothing and commit nothing.
MAY_START_EMPTY = {"Beam", "TreeSearch"}


# -- candidates --------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MAKERS))
async def test_a_string_is_not_a_list_of_candidates(name: str, repo: Path) -> None:
    before = tree_state(repo)
    async with workspace(repo) as ws:
        with pytest.raises(ba.InvalidCandidates) as info:
            MAKERS[name]("echo hi")
        assert ws.branches() == []
    message = str(info.value)
    assert "not the string 'echo hi'" in message
    assert "Command(['echo', 'hi'])" in message  # the fix, spelt out
    assert isinstance(info.value, ValueError)
    assert tree_state(repo) == before


@pytest.mark.parametrize("name", sorted(MAKERS))
@pytest.mark.parametrize(
    ("bad", "says"),
    [
        (b"echo hi", "not the string"),
        (42, "not int 42"),
        (None, "not NoneType None"),
        (ba.Command(["true"]), "not one candidate"),
        (_ok, "not one candidate"),
        ([_ok, "echo hi"], "candidates[1] is not a candidate: str 'echo hi'"),
        ([ba.Command(["true"]), 3.5], "candidates[1] is not a candidate: float 3.5"),
        ([None], "candidates[0] is not a candidate: NoneType None"),
    ],
)
def test_what_is_not_a_candidate_is_named(name: str, bad: Any, says: str) -> None:
    with pytest.raises(ba.InvalidCandidates) as info:
        MAKERS[name](bad)
    assert says in str(info.value)


@pytest.mark.parametrize("name", sorted(set(MAKERS) - MAY_START_EMPTY))
@pytest.mark.parametrize("empty", [[], (), iter([]), {}])
def test_no_candidates_is_refused(name: str, empty: Any) -> None:
    with pytest.raises(ba.InvalidCandidates, match=r"no candidates.*pass at least one"):
        MAKERS[name](empty)


async def test_best_of_n_with_no_candidates_creates_nothing(repo: Path) -> None:
    before = tree_state(repo)
    async with workspace(repo) as ws:
        with pytest.raises(ba.InvalidCandidates):
            await ba.BestOfN([]).run(ws)
        assert ws.branches() == []
    assert tree_state(repo) == before


@pytest.mark.parametrize("name", sorted(MAY_START_EMPTY))
async def test_strategies_that_allow_no_candidates_still_run(name: str, repo: Path) -> None:
    before = tree_state(repo)
    async with workspace(repo) as ws:
        outcome = await MAKERS[name]([]).run(ws)
    assert not outcome.committed
    assert outcome.results == ()
    assert outcome.info["stopped"] == "exhausted"
    assert tree_state(repo) == before


@pytest.mark.parametrize("name", sorted(MAKERS))
async def test_good_candidates_in_any_collection_still_run(name: str, repo: Path) -> None:
    def writes(b: ba.Branch) -> bool:
        (b.path / "won.txt").write_text(name)
        return True

    strategy = MAKERS[name](c for c in [writes])  # a generator is a collection too
    assert len(getattr(strategy, "candidates", getattr(strategy, "root_candidates", ()))) == 1
    async with workspace(repo) as ws:
        outcome = await strategy.run(ws)
    assert outcome.committed
    assert (repo / "won.txt").read_text() == name


def test_a_plugin_strategy_gets_the_checks_from_the_kit() -> None:
    import attrs

    from branchagent.strategy import Candidate, Strategy, Target, to_candidates

    @attrs.define(kw_only=True, eq=False)
    class Mine(Strategy):
        candidates: tuple[Candidate, ...] = attrs.field(converter=to_candidates,
                                                        kw_only=False)

        async def run(self, target: Target) -> ba.Outcome:
            raise AssertionError("not run")

    with pytest.raises(ba.InvalidCandidates, match="not the string"):
        Mine("pytest -q")  # type: ignore[arg-type]
    with pytest.raises(ba.InvalidCandidates, match="no candidates"):
        Mine([])
    assert Mine([_ok]).candidates == (_ok,)


# -- limits ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"network": "no"}, "Limits.network must be True or False, got 'no'"),
        ({"network": 0}, "Limits.network must be True or False, got 0"),
        ({"network": None}, "Limits.network must be True or False, got None"),
        ({"pids": 2.5}, "Limits.pids must be a whole number, got 2.5"),
        ({"pids": "8"}, "Limits.pids must be a number, got '8'"),
        ({"pids": True}, "Limits.pids must be a number, got True"),
        ({"cpu": "2"}, "Limits.cpu must be a number, got '2'"),
        ({"cpu": math.nan}, "Limits.cpu must be a finite number"),
        ({"timeout": math.inf}, "Limits.timeout must be a finite number"),
        ({"timeout": -1}, "Limits.timeout must be positive, got -1"),
        ({"memory": True}, "Limits.memory: a size must be an int or a string"),
        ({"memory": [1]}, "Limits.memory: a size must be an int or a string"),
        ({"output": "lots"}, "Limits.output: cannot read 'lots' as a size"),
        ({"disk": 0}, "Limits.disk: size must be positive"),
    ],
)
def test_every_limits_field_is_checked(kwargs: dict[str, Any], says: str) -> None:
    with pytest.raises(ba.InvalidLimits) as info:
        ba.Limits(**kwargs)
    assert says in str(info.value)
    assert isinstance(info.value, ValueError)
    # the message also says what to pass instead
    assert any(fix in str(info.value) for fix in ("None", "pass", "e.g.")), str(info.value)


def test_good_limits_still_work() -> None:
    lim = ba.Limits(network=False, pids=8, cpu=0.5, timeout=2, memory="64M", disk=1 << 20)
    assert (lim.network, lim.pids, lim.cpu, lim.timeout) == (False, 8, 0.5, 2)


# -- workspaces --------------------------------------------------------------------------


async def test_the_filesystem_root_is_refused() -> None:
    existed = _there("/..branchagent")
    with pytest.raises(ba.InvalidWorkspace) as info:
        async with ba.open_workspace("/", backend="copy"):
            pytest.fail("opened /")
    message = str(info.value)
    assert "root of the filesystem" in message
    assert "open a project directory" in message
    assert "must not be inside" not in message
    assert _there("/..branchagent") == existed


@pytest.mark.parametrize("backend", ["copy", pytest.param("fuse", marks=requires_fuse)])
async def test_a_workspace_inside_a_branch_is_refused(backend: str, repo: Path) -> None:
    async with ba.open_workspace(repo, backend=backend) as ws:
        b = await ws.fork("outer")
        inner = b.path / "inner"
        inner.mkdir()
        (inner / "f.txt").write_text("x")
        for path in (inner, b.path, b.path / "src"):
            with pytest.raises(ba.InvalidWorkspace, match="state directory of another"):
                async with ba.open_workspace(path, backend="copy"):
                    pytest.fail(f"opened {path} inside branch {b.name}")
        # nothing was created in the branch: its only change is what the test wrote
        assert not (b.path / ".inner.branchagent").exists()
        assert sorted(c.path for c in await b.changes()) == ["inner", "inner/f.txt"]
        assert [x.name for x in ws.branches()] == ["outer"]


async def test_a_path_inside_a_state_dir_is_refused(repo: Path, tmp_path: Path) -> None:
    async with ba.open_workspace(repo, backend="copy") as ws:
        sdir = ws.state_dir
        for path in (sdir, sdir / "runs"):
            with pytest.raises(ba.InvalidWorkspace, match=f"inside {sdir}, the state dir"):
                async with ba.open_workspace(path, backend="copy"):
                    pytest.fail(f"opened {path}")
        other = tmp_path / "other"
        other.mkdir()
        with pytest.raises(ba.InvalidWorkspace, match=r"state_dir .* is inside .*state dir"):
            async with ba.open_workspace(other, backend="copy", state_dir=sdir / "runs" / "x"):
                pytest.fail("opened with a state_dir inside another's")
        assert not (sdir / "runs" / ".runs.branchagent").exists()
        assert not (sdir / "runs" / "x").exists()
    assert not (tmp_path / ".other.branchagent").exists()


_OPEN_IN_CHILD = textwrap.dedent("""
    import sys, anyio, branchagent as ba

    async def main() -> None:
        try:
            async with ba.open_workspace(sys.argv[1], backend="copy"):
                print("opened")
        except ba.InvalidWorkspace as exc:
            print("refused:", exc)

    anyio.run(main)
""")


@pytest.mark.parametrize("isolate", [
    False,
    pytest.param(True, marks=pytest.mark.skipif(
        isolation_problem() is not None, reason=f"no isolated runs here: {isolation_problem()}")),
])
async def test_a_workspace_opened_by_a_branch_s_process_is_refused(
        isolate: bool, repo: Path) -> None:
    env = {"PYTHONPATH": os.pathsep.join(sys.path)}
    async with ba.open_workspace(repo, backend="copy") as ws:
        b = await ws.fork("runner")
        # Isolated, the process sees the branch at the workspace's path; unisolated, its
        # working directory is the branch's own path.
        where = str(repo / "src") if isolate else "src"
        r = await b.run([sys.executable, "-c", _OPEN_IN_CHILD, where], isolate=isolate,
                        env=env, limits=ba.Limits(timeout=60))
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith("refused:"), r.stdout + r.stderr
        assert "runs inside a branch of the workspace" in r.stdout
        assert await b.changes() == []  # no state dir became a change of the branch


async def test_opening_one_workspace_twice_in_one_process_says_where(repo: Path) -> None:
    line = sys._getframe().f_lineno + 1
    async with ba.open_workspace(repo, backend="copy") as ws:
        await ws.fork("kept")
        with pytest.raises(ba.WorkspaceAlreadyOpen) as info:
            async with ba.open_workspace(repo, backend="copy"):
                pytest.fail("opened twice")
        message = str(info.value)
        assert f"{__file__}:{line}" in message
        assert "already open in this process" in message
        assert "another process" not in message
        assert isinstance(info.value, ba.WorkspaceLocked)
        assert [b.name for b in ws.branches()] == ["kept"]  # the first is untouched
    async with ba.open_workspace(repo, backend="copy") as again:  # closed: fine again
        assert again.branches() == []

