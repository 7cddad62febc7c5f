"""SpeculativeExecution on real branches (copy backend), on asyncio and trio.

A scripted proposer hands out fixed drafts; every action appends its name to
``log.txt``, ``verify`` rejects a log holding ``BAD``, and the goal is a log
of a given length. So the committed prefix, the acceptance rate and the
proposer calls saved can be predicted exactly, and every test also checks
that no branch (and no process) is left behind.
"""

from __future__ import annotations

import os
import secrets
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import branchagent as ba
import branchagent.llm as llm
from branchagent_strategies.speculative_execution import llm_proposer

pytestmark = pytest.mark.anyio

LOG = "log.txt"


# -- the scripted world ---------------------------------------------------------------------------


@asynccontextmanager
async def workspace(repo: Path) -> AsyncIterator[ba.Workspace]:
    async with ba.open_workspace(repo, backend="copy") as ws:
        yield ws
        assert ws.branches() == [], "a branch was left open"


def read_log(root: Path) -> list[str]:
    path = root / LOG
    return path.read_text().split() if path.exists() else []


def action(name: str) -> ba.Candidate:
    """A step: ``fail`` returns False, ``raise`` raises, ``hang`` sleeps; others append ``name``."""

    async def step(b: ba.Branch) -> Any:
        if name.startswith("fail"):
            return False
        if name.startswith("raise"):
            raise RuntimeError(f"step {name} broke")
        if name.startswith("hang"):
            await anyio.sleep(30)
        with (b.path / LOG).open("a") as f:
            f.write(name + "\n")
        return True

    step.__qualname__ = step.__name__ = f"step_{name}"
    return step


async def no_bad(b: ba.Branch) -> bool:
    return "BAD" not in read_log(b.path)


def log_length(n: int) -> ba.Candidate:
    async def goal(b: ba.Branch) -> bool:
        return len(read_log(b.path)) >= n

    return goal


class Script:
    """A proposer handing out ``drafts`` in turn (then empty drafts); records what it saw."""

    def __init__(self, drafts: Sequence[Sequence[str]]) -> None:
        self.drafts = [list(d) for d in drafts]
        self.seen: list[list[str]] = []
        self.asked: list[int] = []

    async def __call__(self, b: ba.Branch, k: int) -> list[ba.Candidate]:
        self.asked.append(k)
        self.seen.append(read_log(b.path))
        (b.path / "scratch-only").write_text("the proposer's own notes")  # must not leak
        draft = self.drafts[len(self.seen) - 1] if len(self.seen) <= len(self.drafts) else []
        return [action(name) for name in draft]


async def run(strategy: ba.SpeculativeExecution, repo: Path) -> ba.Outcome:
    async with workspace(repo) as ws:
        return await strategy.run(ws)


def names_of(outcome: ba.Outcome, script: Sequence[Sequence[str]]) -> list[str]:
    return [script[r.info["round"]][r.info["step"]] for r in outcome.results]


def check(outcome: ba.Outcome, repo: Path, script: Sequence[Sequence[str]]) -> None:
    names = names_of(outcome, script)
    accepted = [n for r, n in zip(outcome.results, names, strict=True) if r.info["accepted"]]
    assert read_log(repo) == accepted
    assert not (repo / "scratch-only").exists()
    info = outcome.info
    assert info["accepted"] == len(accepted)
    assert info["calls_saved"] == info["accepted"] - info["proposer_calls"]
    if info["drafted"]:
        assert info["acceptance_rate"] == pytest.approx(info["accepted"] / info["drafted"])
    else:
        assert info["acceptance_rate"] is None
    assert outcome.committed == bool(accepted)
    if accepted:
        last = max(i for i, r in enumerate(outcome.results) if r.info["accepted"])
        assert outcome.winner == outcome.results[last]
    else:
        assert outcome.winner is None
    for i, r in enumerate(outcome.results):
        assert r.index == i
        assert (r.parent is None) == (r.depth == 0)
        if r.parent is not None:
            assert r.parent == i - 1
    outcome.to_json()


# -- the commit rule and the accounting -----------------------------------------------------------


async def test_longest_verified_prefix_is_committed_then_drafting_resumes(repo: Path) -> None:
    script = [["a", "b", "BAD", "d"], ["c", "d", "e", "f"]]
    proposer = Script(script)
    strategy = ba.SpeculativeExecution(proposer, verify=no_bad, goal=log_length(5), k=4)
    outcome = await run(strategy, repo)
    check(outcome, repo, script)
    assert read_log(repo) == ["a", "b", "c", "d", "e"]
    assert proposer.seen == [[], ["a", "b"]]  # the second draft starts from the new state
    assert proposer.asked == [4, 4]
    assert names_of(outcome, script) == ["a", "b", "BAD", "c", "d", "e"]  # "d" never ran
    assert [r.success for r in outcome.results] == [True, True, False, True, True, True]
    assert [r.parent for r in outcome.results] == [None, 0, 1, None, 3, 4]
    assert [r.depth for r in outcome.results] == [0, 1, 2, 0, 1, 2]
    bad = outcome.results[2]
    assert bad.info["action_success"] is True
    assert bad.info["verify"]["success"] is False
    assert outcome.results[5].info["goal"] is True
    info = outcome.info
    assert info["stopped"] == "goal"
    assert info["goal_reached"] is True
    assert (info["drafted"], info["accepted"], info["rejected"]) == (7, 5, 1)  # "f": after goal
    assert info["acceptance_rate"] == pytest.approx(5 / 7)
    assert (info["proposer_calls"], info["calls_saved"]) == (2, 3)
    assert info["rounds"] == [{"drafted": 4, "accepted": 2, "rejected_at": 2},
                              {"drafted": 3, "accepted": 3, "rejected_at": None}]
    assert outcome.strategy == "speculative_execution"
    assert outcome.winner is not None
    assert outcome.winner.index == 5


async def test_a_dry_run_takes_the_same_rounds_and_leaves_the_base_alone(repo: Path) -> None:
    """``commit=False``: the rounds still build on each other (in a scratch fork that is
    thrown away), the same steps are accepted, and the workspace never changes."""
    script = [["a", "b", "BAD", "d"], ["c", "d", "e", "f"]]
    proposer = Script(script)
    strategy = ba.SpeculativeExecution(proposer, verify=no_bad, goal=log_length(5), k=4,
                                       commit=False)
    async with workspace(repo) as ws:
        outcome = await strategy.run(ws)
        assert ws.branches() == []
    assert read_log(repo) == []
    assert proposer.seen == [[], ["a", "b"]]  # round two saw round one's accepted steps
    assert names_of(outcome, script) == ["a", "b", "BAD", "c", "d", "e"]
    assert outcome.committed is False
    assert outcome.winner is None
    assert outcome.info["uncommitted_winner"] == 5
    assert outcome.info["goal_reached"] is True


async def test_a_failing_or_raising_action_is_rejected_like_a_failed_verification(
    repo: Path,
) -> None:
    script = [["a", "fail"], ["raise", "x"], ["b", "c"]]
    outcome = await run(ba.SpeculativeExecution(Script(script), k=2, goal=log_length(3)), repo)
    check(outcome, repo, script)
    assert read_log(repo) == ["a", "b", "c"]
    assert outcome.results[1].success is False
    assert outcome.results[1].error is None
    assert outcome.results[2].error == "RuntimeError: step raise broke"
    info = outcome.info
    assert (info["drafted"], info["accepted"], info["rejected"]) == (6, 3, 2)
    assert (info["proposer_calls"], info["calls_saved"]) == (3, 0)
    assert info["rounds"][1] == {"drafted": 2, "accepted": 0, "rejected_at": 0}


async def test_goal_that_already_holds_drafts_nothing(repo: Path) -> None:
    proposer = Script([["a"]])
    outcome = await run(ba.SpeculativeExecution(proposer, goal=log_length(0)), repo)
    assert proposer.seen == []
    assert not outcome.committed
    assert outcome.results == ()
    assert outcome.info["stopped"] == "goal"
    assert outcome.info["goal_reached"]
    assert outcome.info["acceptance_rate"] is None
    assert read_log(repo) == []


# -- budgets --------------------------------------------------------------------------------------


async def test_max_steps_truncates_the_last_draft(repo: Path) -> None:
    script = [["a", "b", "c", "d"], ["e", "f", "g", "h"]]
    proposer = Script(script)
    outcome = await run(ba.SpeculativeExecution(proposer, k=4, max_steps=6), repo)
    check(outcome, repo, script)
    assert read_log(repo) == ["a", "b", "c", "d", "e", "f"]
    info = outcome.info
    assert info["stopped"] == "max_steps"
    assert not info["goal_reached"]
    assert (info["drafted"], info["accepted"], info["steps_run"]) == (6, 6, 6)
    assert info["acceptance_rate"] == 1.0
    assert info["calls_saved"] == 4


async def test_max_proposals_bounds_a_proposer_that_keeps_failing(repo: Path) -> None:
    script = [["fail", "a"]] * 5
    proposer = Script(script)
    outcome = await run(ba.SpeculativeExecution(proposer, k=2, max_proposals=3), repo)
    check(outcome, repo, script)
    assert len(proposer.seen) == 3
    info = outcome.info
    assert info["stopped"] == "max_proposals"
    assert not outcome.committed
    assert outcome.winner is None
    assert (info["drafted"], info["accepted"], info["acceptance_rate"]) == (6, 0, 0.0)
    assert info["calls_saved"] == -3


async def test_k_caps_the_draft_and_an_empty_draft_stops(repo: Path) -> None:
    script = [["a", "b", "c", "d", "e"]]
    proposer = Script(script)
    outcome = await run(ba.SpeculativeExecution(proposer, k=2), repo)
    assert read_log(repo) == ["a", "b"]  # c, d, e dropped: k=2; then the script ran dry
    assert outcome.info["stopped"] == "exhausted"
    assert outcome.info["proposer_calls"] == 2
    assert outcome.info["drafted"] == 2


async def test_timeout_keeps_the_verified_prefix_and_kills_the_hung_step(
    repo: Path, tmp_path: Path,
) -> None:
    token = f"30.{secrets.randbelow(10**6):06d}"
    hang = ba.Command([sys.executable, "-c", f"import time; time.sleep({token})"])

    async def propose(b: ba.Branch, k: int) -> list[ba.Candidate]:
        return [action("a"), action("b"), hang, action("c")]

    started = time.monotonic()
    outcome = await run(ba.SpeculativeExecution(propose, timeout=0.8), repo)
    elapsed = time.monotonic() - started
    assert elapsed < 0.8 + 3
    assert outcome.timed_out
    assert outcome.info["stopped"] == "timeout"
    assert read_log(repo) == ["a", "b"]
    assert outcome.committed
    assert outcome.results[2].error is not None
    assert "TimeoutError" in outcome.results[2].error
    assert outcome.info["rejected"] == 0  # cut by the timeout, not rejected
    assert processes_with(token) == []


async def test_timeout_while_proposing(repo: Path) -> None:
    async def slow(b: ba.Branch, k: int) -> list[ba.Candidate]:
        await anyio.sleep(30)
        return []

    outcome = await run(ba.SpeculativeExecution(slow, timeout=0.3), repo)
    assert outcome.timed_out
    assert outcome.info["stopped"] == "timeout"
    assert outcome.info["proposer_calls"] == 1
    assert not outcome.committed


# -- errors and cancellation ----------------------------------------------------------------------


async def test_raising_proposer_stops_the_run_and_keeps_earlier_rounds(repo: Path) -> None:
    calls = 0

    async def propose(b: ba.Branch, k: int) -> list[ba.Candidate]:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise ValueError("the draft model is down")
        return [action("a"), action("b")]

    outcome = await run(ba.SpeculativeExecution(propose, k=2), repo)
    assert read_log(repo) == ["a", "b"]
    assert outcome.committed
    assert outcome.info["stopped"] == "propose_error"
    assert outcome.info["error"] == "ValueError: the draft model is down"
    assert outcome.info["proposer_calls"] == 2


async def test_proposer_returning_nonsense_is_an_error(repo: Path) -> None:
    def propose(b: ba.Branch, k: int) -> Any:  # sync: runs in a thread
        return "rm -rf /"

    outcome = await run(ba.SpeculativeExecution(propose), repo)
    assert outcome.info["stopped"] == "propose_error"
    assert outcome.info["error"].startswith("CandidateError: propose returned str")


async def test_raising_verify_and_goal_reject_the_step(repo: Path) -> None:
    async def verify(b: ba.Branch) -> bool:
        if "b" in read_log(b.path):
            raise OSError("verifier crashed")
        return True

    script = [["a", "b", "c"]]
    outcome = await run(ba.SpeculativeExecution(Script(script), verify=verify), repo)
    check(outcome, repo, script)
    assert read_log(repo) == ["a"]
    assert outcome.results[1].error == "OSError: verifier crashed"
    assert outcome.results[1].info["error_in"] == "verify"

    async def goal(b: ba.Branch) -> bool:
        raise RuntimeError("goal crashed")

    outcome = await run(ba.SpeculativeExecution(Script([["x"]]), goal=goal), repo)
    assert read_log(repo) == ["a"]  # the first goal check failing is "not yet"; x then fails
    assert outcome.results[0].info["error_in"] == "goal"
    assert not outcome.committed


async def test_command_verify_and_sync_proposer(repo: Path) -> None:
    def propose(b: ba.Branch, k: int) -> list[ba.Candidate]:
        return [ba.Command(["sh", "-c", f"echo {i} >> {LOG}"]) for i in range(k)]

    verify = ba.Command(["sh", "-c", f"test $(wc -l < {LOG}) -le 3"])
    outcome = await run(ba.SpeculativeExecution(propose, verify=verify, k=5, max_proposals=2),
                        repo)
    assert read_log(repo) == ["0", "1", "2"]
    assert outcome.info["rounds"][0] == {"drafted": 5, "accepted": 3, "rejected_at": 3}
    assert outcome.results[3].info["verify"]["returncode"] == 1
    assert outcome.info["rounds"][1] == {"drafted": 5, "accepted": 0, "rejected_at": 0}


async def test_outside_cancellation_leaves_nothing_open(repo: Path) -> None:
    token = f"30.{secrets.randbelow(10**6):06d}"
    rounds = 0

    async def propose(b: ba.Branch, k: int) -> list[ba.Candidate]:
        nonlocal rounds
        rounds += 1
        if rounds == 1:
            return [action("a")]
        return [action("b"), ba.Command(["sleep", token])]

    async with workspace(repo) as ws:
        with anyio.move_on_after(1.0):
            await ba.SpeculativeExecution(propose, k=2).run(ws)
    assert read_log(repo) == ["a"]  # round 1 committed; round 2 was cut, "b" not committed
    assert processes_with(token) == []


async def test_runs_on_a_branch_and_nests(repo: Path) -> None:
    script = [["a", "b"]]
    async with workspace(repo) as ws:
        outer = await ws.fork()
        outcome = await ba.SpeculativeExecution(Script(script), k=2).run(outer)
        assert read_log(outer.path) == ["a", "b"]
        assert read_log(repo) == []
        await outer.commit()
    assert outcome.committed
    assert read_log(repo) == ["a", "b"]


def test_arguments_are_checked() -> None:
    with pytest.raises(TypeError, match="propose must be a callable"):
        ba.SpeculativeExecution("draft")  # type: ignore[arg-type]
    for bad in ({"k": 0}, {"max_steps": 0}, {"max_proposals": True}):
        with pytest.raises(ValueError, match="must be an int >= 1"):
            ba.SpeculativeExecution(Script([]), **bad)
    with pytest.raises(ValueError, match="timeout"):
        ba.SpeculativeExecution(Script([]), timeout=0)
    assert ba.get_strategy("speculative_execution") is ba.SpeculativeExecution


# -- a model as the proposer (scripted completions) -----------------------------------------------


class ScriptedSource:
    """A :class:`branchagent.llm.Source` answering from a list of texts, one per call."""

    def __init__(self, texts: Sequence[str]) -> None:
        self.texts = list(texts)
        self.prompts: list[Any] = []

    async def sample(self, prompt: Any, n: int, *, sampling: Any = None) -> list[llm.Completion]:
        self.prompts.append(prompt)
        text = self.texts.pop(0) if self.texts else ""
        return [llm.Completion(index=i, text=text, token_logprobs=[-0.5]) for i in range(n)]


def append_line(b: ba.Branch, c: llm.Completion) -> list[str]:
    with (b.path / LOG).open("a") as f:
        f.write(c.text.strip() + "\n")
    return [LOG]


async def test_llm_proposer_splits_one_completion_into_steps(repo: Path) -> None:
    source = ScriptedSource(["one\ntwo\n\nBAD\nfour\n", "three\nfive\nsix\n"])
    propose = llm_proposer(source, lambda b: f"log so far: {read_log(b.path)}",
                           apply=append_line)
    strategy = ba.SpeculativeExecution(propose, verify=no_bad, goal=log_length(4), k=3)
    outcome = await run(strategy, repo)
    assert read_log(repo) == ["one", "two", "three", "five"]
    assert source.prompts == ["log so far: []", "log so far: ['one', 'two']"]
    info = outcome.info
    assert (info["drafted"], info["accepted"], info["proposer_calls"]) == (5, 4, 2)
    assert info["calls_saved"] == 2
    assert info["goal_reached"]
    assert outcome.results[0].info["applied"] == [LOG]



async def test_llm_proposer_awaits_an_async_prompt_and_takes_a_plain_one(repo: Path) -> None:
    async def prompt(b: ba.Branch) -> str:
        await anyio.lowlevel.checkpoint()
        return f"async log: {read_log(b.path)}"

    source = ScriptedSource(["one\ntwo\n"])
    outcome = await run(ba.SpeculativeExecution(
        llm_proposer(source, prompt, apply=append_line), verify=no_bad, k=2, max_proposals=1),
        repo)
    assert source.prompts == ["async log: []"]
    assert read_log(repo) == ["one", "two"]
    assert outcome.committed
    plain = ScriptedSource(["three\n"])
    await run(ba.SpeculativeExecution(
        llm_proposer(plain, "a fixed prompt", apply=append_line), verify=no_bad, k=1,
        max_proposals=1), repo)
    assert plain.prompts == ["a fixed prompt"]
    assert read_log(repo) == ["one", "two", "three"]

# -- the invariant --------------------------------------------------------------------------------

moves = st.sampled_from(["ok", "ok", "ok", "BAD", "fail", "raise"])


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(drafts=st.lists(st.lists(moves, max_size=5), max_size=5),
       k=st.integers(1, 4), goal_at=st.one_of(st.none(), st.integers(0, 8)),
       max_steps=st.integers(1, 12), max_proposals=st.integers(1, 6))
async def test_no_branch_left_and_base_is_the_replay_of_accepted_steps(
    tmp_path_factory: pytest.TempPathFactory, drafts: list[list[str]], k: int,
    goal_at: int | None, max_steps: int, max_proposals: int,
) -> None:
    repo = tmp_path_factory.mktemp("spec")
    (repo / "README.md").write_text("# demo\n")
    numbered = [[f"{m}{r}.{i}" for i, m in enumerate(d)] for r, d in enumerate(drafts)]
    strategy = ba.SpeculativeExecution(
        Script(numbered), k=k, verify=no_bad_prefix,
        goal=log_length(goal_at) if goal_at is not None else None,
        max_steps=max_steps, max_proposals=max_proposals)
    outcome = await run(strategy, repo)
    # The model: replay the drafts with the same rules.
    expected: list[str] = []
    calls = steps = drafted = 0
    stopped = "goal" if goal_at == 0 else ""
    while not stopped:
        if steps >= max_steps:
            stopped = "max_steps"
            break
        if calls >= max_proposals:
            stopped = "max_proposals"
            break
        draft = numbered[calls] if calls < len(numbered) else []
        calls += 1
        draft = draft[: min(k, max_steps - steps)]
        if not draft:
            stopped = "exhausted"
            break
        for i, name in enumerate(draft):
            steps += 1
            if not name.startswith("ok"):
                drafted += len(draft)
                break
            expected.append(name)
            if goal_at is not None and len(expected) >= goal_at:
                drafted += i + 1
                stopped = "goal"
                break
        else:
            drafted += len(draft)
    assert read_log(repo) == expected
    assert outcome.info["stopped"] == stopped
    assert outcome.info["proposer_calls"] == calls
    assert outcome.info["steps_run"] == steps
    assert outcome.info["drafted"] == drafted
    check(outcome, repo, numbered)


async def no_bad_prefix(b: ba.Branch) -> bool:
    return not any(line.startswith("BAD") for line in read_log(b.path))


def processes_with(token: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if token.encode() in cmdline and state != "Z" and int(entry.name) != os.getpid():
            found.append(int(entry.name))
    return found
