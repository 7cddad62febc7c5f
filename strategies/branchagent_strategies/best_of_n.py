"""BestOfN: run every candidate to the end, commit the highest-scoring success."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs

from branchagent.strategy import (
    Candidate,
    Outcome,
    Strategy,
    Target,
    Trial,
    Verdict,
    pick_best,
    to_candidates,
)

__all__ = ["BestOfN"]


def _to_scores(scores: Sequence[float] | None) -> tuple[float, ...] | None:
    return None if scores is None else tuple(float(s) for s in scores)


@attrs.define(kw_only=True, eq=False)
class BestOfN(Strategy):
    """Run every candidate, score each, commit the best success.

    A candidate's score is, in order of precedence: the score of
    ``evaluate`` (a candidate-like callable, :class:`~branchagent.Command`
    or strategy run on the candidate's branch after the candidate, only when
    the candidate succeeded; its success is required too), else
    ``scores[i]`` given from outside (e.g. a model's logprobs), else the
    candidate's own score. The highest-scoring success is committed; a
    number beats no score; ties go to the lowest index.

    With ``commit=False`` (the base class's option) nothing is committed:
    every branch is aborted, the base stays pristine, the outcome lists every
    ``(success, score)`` and ``info["uncommitted_winner"]`` names the one that
    would have won. ``timeout`` bounds
    the wall time of the run: candidates still running then are cancelled,
    and the best among those that finished is committed.
    """

    name = "best_of_n"

    candidates: tuple[Candidate, ...] = attrs.field(converter=to_candidates, kw_only=False)
    scores: tuple[float, ...] | None = attrs.field(default=None, converter=_to_scores)
    evaluate: Candidate | None = None

    @scores.validator
    def _check_scores(self, _attr: object, scores: tuple[float, ...] | None) -> None:
        if scores is not None and len(scores) != len(self.candidates):
            raise ValueError(
                f"scores has {len(scores)} entries for {len(self.candidates)} candidates"
            )

    async def run(self, target: Target) -> Outcome:
        async with self.open_arena(target) as arena:

            async def after(trial: Trial) -> None:
                assert trial.verdict is not None
                assert trial.branch is not None
                verdict = trial.verdict
                info: dict[str, Any] = {"candidate_score": verdict.score}
                score = verdict.score
                if self.scores is not None:
                    score = info["prior_score"] = self.scores[trial.index]
                success = verdict.success
                if success and self.evaluate is not None:
                    judged = await arena.executor.execute(self.evaluate, trial.branch)
                    info["evaluate"] = {"success": judged.success, "score": judged.score,
                                        **judged.info}
                    success = judged.success
                    if judged.score is not None:
                        score = judged.score
                trial.info.update(info)
                trial.verdict = Verdict(success, score, verdict.info)

            trials = await arena.run(self.candidates, after=after)
            best = pick_best([t for t in trials if t.success])
            if best is not None:
                await arena.commit(best)  # with commit=False: only chosen
            return arena.outcome()
