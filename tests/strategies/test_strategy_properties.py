"""Properties every strategy keeps, whatever its candidates and callbacks do.

Hypothesis draws candidate behaviours (succeed, fail, raise, hang in Python,
hang in a process, return garbage, succeed with a score) and, where the
strategy has them, callback behaviours (a judge, a critique, wave widths),
runs Speculate, BestOfN, Reflexion, Tournament, Cascaded, Merge and
MajorityVote (below: a strategy written with the public kit alone, in 30
lines) on a fresh copy backend workspace, and checks after every run:

- no branch is left open, no process the candidates started is alive;
- the base changed exactly when ``outcome.committed``, and then it holds
  exactly the winner's changes;
- at most one commit reached the base (one ``winner_committed`` log line,
  one ``branch_committed`` into the base, both naming the winner's branch);
- ``winner`` names a successful candidate whose behaviour can succeed;
- the wall time is bounded by the strategy's timeout plus slack;
- where the behaviours leave nothing to chance (no hang), the winner is the
  one a plain model of the strategy predicts.
"""

from __future__ import annotations

import itertools
import os
import secrets
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

import branchagent as ba
from _support import processes_with
from branchagent.strategy import Candidate, Outcome, Strategy, Target, Trial, to_candidates

pytestmark = pytest.mark.anyio

TIMEOUT = 0.4  # every strategy's timeout; a hanging candidate sleeps 30 s
SLACK = 2.5  # forks, commits and cleanup after the timeout, on a loaded machine
SUCCESSES = {"succeed", "score"}
HANGS = {"hang", "hang_process"}

behaviours = st.sampled_from(
    ["succeed", "fail", "raise", "hang", "hang_process", "garbage", "score"])
scores = st.sampled_from([-1.0, 0.0, 0.5, 2.0])
plays = st.lists(st.tuples(behaviours, scores), min_size=1, max_size=5)


# -- a strategy from the public kit alone ---------------------------------------------------


@attrs.define(kw_only=True, eq=False)
class MajorityVote(Strategy):
    """Run every candidate; commit the first success whose output most successes gave.

    A candidate's output is what a Command printed, or ``Verdict.info["output"]``.
    """

    name = "majority_vote"

    candidates: tuple[Candidate, ...] = attrs.field(converter=to_candidates, kw_only=False)

    async def run(self, target: Target) -> Outcome:
        async with self.open_arena(target) as arena:
            ok = [t for t in await arena.run(self.candidates) if t.success]
            votes: dict[str, list[Trial]] = {}
            for t in ok:
                votes.setdefault(_output(t), []).append(t)
            if votes:
                # Most votes; ties to the answer given first (dicts keep insertion order).
                await arena.commit(max(votes.values(), key=len)[0])
            return arena.outcome({"votes": {k: len(v) for k, v in votes.items()}})


def _output(t: Trial) -> str:
    info = t.verdict.info if t.verdict is not None else {}
    return str(info.get("stdout_tail", info.get("output", "")))


# -- helpers --------------------------------------------------------------------------------


def make_repo(root: Path) -> Path:
    repo = root / "repo"
    (repo / "src").mkdir(parents=True)
    (repo / "README.md").write_text("# demo\n")
    (repo / "src" / "mod.py").write_text("x = 1\n")
    return repo


def snapshot(root: Path) -> dict[str, bytes | str]:
    out: dict[str, bytes | str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            p = Path(dirpath, name)
            rel = p.relative_to(root).as_posix()
            out[rel] = "dir" if p.is_dir() else p.read_bytes()
    return out


async def act(b: ba.Branch, index: int, play: tuple[str, float], token: str) -> Any:
    """Candidate ``index``: write its mark, then behave as ``play`` says."""
    behaviour, score = play
    (b.path / "out.txt").write_text(str(index))
    (b.path / f"c{index}.txt").write_text(behaviour)
    if behaviour == "succeed":
        return True
    if behaviour == "score":
        return score
    if behaviour == "fail":
        return ba.Verdict(False, score)
    if behaviour == "raise":
        raise RuntimeError(f"candidate {index} raised")
    if behaviour == "garbage":
        return "yes"
    if behaviour == "hang":
        await anyio.sleep(30)
        return True
    await b.run(["sleep", token], isolate=False)
    return True


def candidates(play: Sequence[tuple[str, float]], token: str) -> list[ba.Candidate]:
    def one(i: int) -> ba.Candidate:
        async def candidate(b: ba.Branch) -> Any:
            return await act(b, i, play[i], token)

        return candidate

    return [one(i) for i in range(len(play))]


def best_index(play: Sequence[tuple[str, float]]) -> int | None:
    """BestOfN's model: the highest score among successes (a number beats none), lowest index."""
    found = [(beh == "score", score if beh == "score" else 0.0, -i)
             for i, (beh, score) in enumerate(play) if beh in SUCCESSES]
    return -max(found)[2] if found else None


def judge_of(moves: Sequence[str], token: str) -> Callable[[ba.Branch, ba.Branch], Any]:
    turn = itertools.count()

    async def judge(a: ba.Branch, b: ba.Branch) -> Any:
        move = moves[next(turn) % len(moves)]
        ia, ib = (int((x.path / "out.txt").read_text()) for x in (a, b))
        (a.path / "out.txt").write_text("judged")  # a fork: never reaches the base
        if move == "higher":
            return 0 if ia > ib else 1
        if move == "branch":
            return b
        if move == "raise":
            raise RuntimeError("judge raised")
        if move == "garbage":
            return "left"
        if move == "hang":
            await a.run(["sleep", token], isolate=False)
        return 0

    return judge


def critique_of(move: str | None, token: str) -> Callable[[ba.Branch, ba.Result], Any] | None:
    if move is None:
        return None

    async def critique(b: ba.Branch, result: ba.Result) -> Any:
        (b.path / "out.txt").write_text("critiqued")  # the failed branch: never reaches the base
        if move == "raise":
            raise RuntimeError("critique raised")
        if move == "garbage":
            return 7
        if move == "hang":
            await b.run(["sleep", token], isolate=False)
        return f"attempt {result.index} failed"

    return critique


def partition(n: int, cuts: Sequence[int]) -> tuple[int, ...]:
    """``n`` split into positive widths at the positions ``cuts`` (deduplicated, in range)."""
    points = sorted({c for c in cuts if 0 < c < n})
    bounds = [0, *points, n]
    return tuple(b - a for a, b in itertools.pairwise(bounds))


# -- the property ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["speculate", "best_of_n", "reflexion", "tournament",
                                  "cascaded", "merge", "majority_vote"])
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(play=plays, judge_moves=st.lists(
           st.sampled_from(["higher", "higher", "branch", "raise", "garbage", "hang"]),
           min_size=1, max_size=3),
       critique_move=st.sampled_from([None, "text", "raise", "garbage", "hang"]),
       cuts=st.lists(st.integers(1, 4), max_size=3),
       wave_timeout=st.sampled_from([None, 0.15]), dry=st.booleans())
async def test_strategies_keep_their_promises(
    tmp_path_factory: pytest.TempPathFactory, kind: str, play: list[tuple[str, float]],
    judge_moves: list[str], critique_move: str | None, cuts: list[int],
    wave_timeout: float | None, dry: bool,
) -> None:
    """Every strategy, also as a dry run (``commit=False``: the winner is chosen the same
    way, and named in ``info["uncommitted_winner"]``, but the base never changes)."""
    root = tmp_path_factory.mktemp(kind)
    repo = make_repo(root)
    token = f"30.{secrets.randbelow(10**6):06d}"
    before = snapshot(repo)
    hangs = any(beh in HANGS for beh, _ in play)
    fan_out = partition(len(play), cuts)
    strategy: ba.Strategy
    if kind == "speculate":
        strategy = ba.Speculate(candidates(play, token), timeout=TIMEOUT)
    elif kind == "best_of_n":
        strategy = ba.BestOfN(candidates(play, token), timeout=TIMEOUT)
    elif kind == "majority_vote":
        strategy = MajorityVote(candidates(play, token), timeout=TIMEOUT)
    elif kind == "merge":  # every candidate writes out.txt: they all conflict
        strategy = ba.Merge(candidates(play, token), timeout=TIMEOUT)
    elif kind == "tournament":
        strategy = ba.Tournament(candidates(play, token), judge=judge_of(judge_moves, token),
                                 judge_timeout=0.1, timeout=TIMEOUT)
    elif kind == "reflexion":
        attempts = itertools.count()

        async def reflexion_task(b: ba.Branch, feedback: str | None) -> Any:
            i = next(attempts)
            return await act(b, i, play[i], token)

        strategy = ba.Reflexion(reflexion_task, max_attempts=len(play),
                                critique=critique_of(critique_move, token), timeout=TIMEOUT)
    else:

        async def cascaded_task(b: ba.Branch, attempt: int, feedback: str | None) -> Any:
            return await act(b, attempt, play[attempt], token)

        strategy = ba.Cascaded(cascaded_task, fan_out=fan_out, wave_timeout=wave_timeout,
                               timeout=TIMEOUT)

    if dry:
        strategy = attrs.evolve(strategy, commit=False)
    async with ba.open_workspace(repo, backend="copy") as ws:
        with capture_logs() as logs:
            started = time.monotonic()
            outcome = await strategy.run(ws)
            elapsed = time.monotonic() - started
        assert ws.branches() == [], "a strategy left a branch open"
    try:
        assert processes_with(token) == [], "a candidate's process survived"
        assert elapsed < TIMEOUT + SLACK, f"{kind} took {elapsed:.2f} s"

        after = snapshot(repo)
        assert (after != before) == outcome.committed
        commits = [e for e in logs if e["event"] == "winner_committed"]
        into_base = [e for e in logs if e["event"] == "branch_committed" and e["parent"] is None]
        assert len(commits) == len(into_base) == int(outcome.committed)
        if outcome.committed:
            w = outcome.winner
            assert w is not None
            assert w.success
            assert w.error is None
            assert play[w.index][0] in SUCCESSES
            assert outcome.results[w.index] == w
            assert commits[0]["branch"] == into_base[0]["branch"] == w.branch
            assert after == {**before, "out.txt": str(w.index).encode(),
                             f"c{w.index}.txt": play[w.index][0].encode()}
        else:
            assert outcome.winner is None
        chosen = outcome.info.get("uncommitted_winner")
        if dry:
            assert not outcome.committed
            if chosen is not None:
                assert outcome.results[chosen].success
                assert play[chosen][0] in SUCCESSES
        else:
            assert chosen is None
        assert len(outcome.results) <= len(play)

        # The model, where nothing is left to timing.
        succeeded = [i for i, (beh, _) in enumerate(play) if beh in SUCCESSES]
        if hangs or outcome.timed_out:
            return
        winner = outcome.winner.index if outcome.winner is not None else chosen
        decided = winner is not None
        if kind == "speculate":
            assert decided == bool(succeeded)
        elif kind in ("best_of_n", "merge"):
            assert winner == best_index(play)
            assert outcome.merged == ()
        elif kind == "majority_vote" or (kind == "reflexion" and critique_move != "hang"):
            # MajorityVote: no outputs, so one answer, and its first success wins.
            assert winner == (succeeded[0] if succeeded else None)
        elif kind == "cascaded" and wave_timeout is None:
            assert decided == bool(succeeded)
            if succeeded:
                assert winner is not None
                wave_of = [w for w, width in enumerate(fan_out) for _ in range(width)]
                assert wave_of[winner] == wave_of[succeeded[0]]
        elif kind == "tournament" and set(judge_moves) == {"higher"}:
            assert winner == (succeeded[-1] if succeeded else None)
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def test_majority_vote_commits_the_output_printed_most_often(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    root = tmp_path_factory.mktemp("vote")
    repo = make_repo(root)

    def says(i: int, answer: str) -> ba.Command:
        return ba.Command(["sh", "-c", f"echo {i} > out.txt; echo {answer}"], isolate=False)

    plays = [says(0, "4"), says(1, "5"), says(2, "5"), says(3, "4"), says(4, "5"),
             ba.Command(["sh", "-c", "echo 5; exit 1"], isolate=False)]
    async with ba.open_workspace(repo, backend="copy") as ws:
        outcome = await MajorityVote(plays).run(ws)
        assert ws.branches() == []
    assert outcome.info["votes"] == {"4\n": 2, "5\n": 3}
    assert outcome.winner is not None
    assert outcome.winner.index == 1
    assert (repo / "out.txt").read_text() == "1\n"
