"""SpeculativeExecution: draft k actions, verify them in nested branches, keep the verified prefix.

The action-level analogue of speculative decoding. vLLM's draft/verify
speculative decoding (``speculative_config={"method": "draft_model" |
"ngram" | "eagle", "num_speculative_tokens": k, ...}``) maps onto it so:

- a cheap draft model proposes ``k`` tokens -> ``propose(branch, k)``
  drafts ``k`` next actions in one call (a small model, a script, any
  callable);
- the target model verifies all ``k`` positions in one forward pass -> each
  drafted action runs in its own nested branch (step ``i`` forks from step
  ``i - 1``) and ``verify`` checks it there; the branches make trying
  ahead free to undo;
- the longest prefix the target accepts is kept -> the longest verified
  prefix is committed (the chain commits up into the target); the rest is
  aborted, its processes killed;
- resample from the first rejection and draft again -> the proposer is
  called again from the new state (after the last accepted step);
- acceptance rate = accepted / drafted tokens ->
  ``Outcome.info["acceptance_rate"]``, with the proposer calls saved
  against proposing one step per call (``calls_saved``);
- EOS or ``max_tokens`` ends generation -> ``goal(branch)`` passes, or a
  budget (``max_steps``, ``max_proposals``, ``timeout``) runs out.

Unlike tokens, actions have effects, and step ``i + 1`` needs step ``i``'s
state: the steps of a draft run one after the other, each in a fork of the
previous one, and a rejected step's branch (with its descendants) is thrown
away, never undone by hand. :func:`llm_proposer` makes a proposer of a
:mod:`branchagent.llm` source: one completion per call, split into steps.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, TypeAlias

import anyio
import attrs

from branchagent.exceptions import InvalidCandidates
from branchagent.strategy import (
    Arena,
    Branch,
    Candidate,
    InSession,
    Outcome,
    Result,
    Strategy,
    Target,
    Trial,
    Verdict,
    deadline_after,
    describe_error,
    get_logger,
    open_arena,
)

from ._options import at_least, callable_as
from ._search import propose as call_proposer

if TYPE_CHECKING:
    from branchagent.llm import Apply, Prompt, Source

__all__ = ["Propose", "SpeculativeExecution", "llm_proposer"]

log = get_logger("branchagent.strategy")

Propose: TypeAlias = Callable[
    [Branch, int], Awaitable[Iterable[Candidate]] | Iterable[Candidate]
]
"""``propose(branch, k)``, async or sync: up to ``k`` next actions, in order."""


@attrs.define(kw_only=True, eq=False)
class SpeculativeExecution(Strategy):
    """Draft ``k`` actions per proposer call; commit the longest verified prefix; repeat.

    Each round calls ``propose(branch, k)`` once (async or sync; a sync one
    runs in a worker thread). ``branch`` is a throwaway fork of the current
    state: the proposer may read it or run commands in it, and nothing it
    writes reaches the target. It returns up to ``k`` candidates (callables,
    :class:`~branchagent.Command`, ...: anything a strategy takes), the
    next actions in order; extra ones are dropped. The drafted actions then
    run in a chain of nested branches: step ``0`` in a child of the target,
    step ``i`` in a child of step ``i - 1``'s branch, so each sees the
    steps before it. A step is *verified* when its action succeeds and
    ``verify`` (a candidate-like callable, Command or strategy run in the
    step's branch after the action; omitted: the action's verdict decides)
    succeeds. The first step that fails (the action or ``verify`` fails,
    returns nonsense or raises) is *rejected*, and the steps after it are
    not run. The verified prefix is committed into the target (the last
    verified step into its parent, ..., the first into the target: the
    target receives the whole prefix or none of it), everything else is
    aborted, and the next round drafts from the new state.

    After every verified step, ``goal`` (candidate-like, run in the step's
    branch) is asked whether the work is done; the run stops at the first
    step where it succeeds (that step is the last one committed). The goal
    is also checked once on the target's state before the first draft. A
    goal that raises fails the step it ran for.

    Actions, ``verify`` and ``goal`` that act on a live interpreter
    (:class:`~branchagent.InSession`) are refused with
    :class:`~branchagent.InvalidCandidates` (a drafted one when its round is drafted,
    before any of its steps runs): the prefix commits a step at a time, and an
    interpreter forked for a step follows one commit only, so the target could get
    every step's files but not the last step's memory (see ``docs/sessions.md``).

    The run stops when the goal is reached, ``max_steps`` steps have run
    (accepted or not), ``max_proposals`` proposer calls were made, the
    proposer returns no action or raises, or ``timeout`` (the wall time of
    the whole run) expires. Progress is kept: every round commits its
    verified prefix, including the round the timeout cut (its steps that
    were verified before it). A cancellation from outside commits nothing
    more (earlier rounds stay committed) and aborts the round's branches.
    No branch of the run is left open on any path.

    ``Outcome.committed`` says some step was committed; ``winner`` is the
    last committed step. ``results`` are the steps that ran, in order;
    each :class:`~branchagent.Result` has ``parent`` (the previous step of
    its round) and ``depth`` (its position in the round), and ``info``
    with ``round``, ``step`` (its position in the draft), ``accepted``
    (committed), ``verify`` and ``goal``. ``Outcome.info`` has:

    - ``drafted``: actions the proposer returned (at most ``k`` per call and
      within ``max_steps``; actions after a step that reached the goal are
      not counted), ``accepted``, ``rejected`` and ``acceptance_rate``
      (``accepted / drafted``; ``None`` when nothing was drafted);
    - ``proposer_calls`` and ``calls_saved`` (``accepted - proposer_calls``:
      the calls a step-by-step proposer, one call per accepted step, would
      have made beyond these; negative when drafts were mostly rejected);
    - ``goal_reached``, ``stopped`` (``"goal"``, ``"max_steps"``,
      ``"max_proposals"``, ``"exhausted"``, ``"propose_error"``, ``"timeout"``
      or ``"commit_failed"``), ``error`` (what the proposer raised) and
      ``rounds`` (per round: ``drafted``, ``accepted``, ``rejected_at``).
    """

    name = "speculative_execution"

    propose: Propose = attrs.field(kw_only=False,
                                   validator=callable_as("a callable (branch, k) -> candidates"))
    verify: Candidate | None = None
    goal: Candidate | None = None
    k: int = attrs.field(default=4, validator=at_least(1))
    max_steps: int = attrs.field(default=32, validator=at_least(1))
    max_proposals: int = attrs.field(default=16, validator=at_least(1))

    def __attrs_post_init__(self) -> None:
        for what in ("verify", "goal"):
            _refuse_sessions(getattr(self, what), what)

    async def run(self, target: Target) -> Outcome:
        if self.commit:
            run = _Run(self, target)
            await run.run()
            return run.outcome()
        # A dry run: each round builds on the steps committed before it, so the rounds
        # commit into a scratch fork of the target, which is thrown away at the end.
        scratch = await target.fork()
        try:
            run = _Run(self, scratch)
            await run.run()
            outcome = run.outcome()
        finally:
            with anyio.CancelScope(shield=True):
                await scratch.abort()
        info = dict(outcome.info)
        if outcome.winner is not None:
            info["uncommitted_winner"] = outcome.winner.index
        return attrs.evolve(outcome, committed=False, winner=None, info=info)


def _refuse_sessions(candidate: object, what: str) -> None:
    """InvalidCandidates for an :class:`~branchagent.InSession` candidate (see the class)."""
    if isinstance(candidate, InSession):
        raise InvalidCandidates(
            f"SpeculativeExecution cannot run InSession candidates ({what}): its verified "
            "prefix commits into the target a step at a time (the last step into the one "
            "before it, ..., the first into the target), and an interpreter forked for a "
            "step follows one commit only, so the target would get every step's files but "
            "at most the first step's memory; use TreeSearch or Beam over InSession "
            "candidates, or actions that keep their state in the branch's files")


class _Run:
    """The state of one SpeculativeExecution run."""

    def __init__(self, spec: SpeculativeExecution, target: Target) -> None:
        self.spec = spec
        self.target = target
        self.deadline = deadline_after(spec.timeout)
        self.started = time.monotonic()
        self.results: list[Result] = []
        self.winner: Result | None = None
        self.rounds: list[dict[str, Any]] = []
        self.calls = 0
        self.steps_run = 0
        self.drafted = 0
        self.accepted = 0
        self.rejected = 0
        self.goal_reached = False
        self.timed_out = False
        self.stopped = ""
        self.error: str | None = None

    def _open_arena(self) -> AbstractAsyncContextManager[Arena]:
        """An arena on the target bounded by the run's deadline (one per round)."""
        spec = self.spec
        return open_arena(self.target, strategy=spec.name, executor=spec.executor,
                          max_parallel=spec.max_parallel, deadline=self.deadline)

    # -- the loop -------------------------------------------------------------------------

    async def run(self) -> None:
        spec = self.spec
        if spec.goal is not None and await self._initial_goal():
            self.goal_reached = True
            self.stopped = "goal"
            return
        while not self.stopped:
            if self.timed_out:
                self.stopped = "timeout"
            elif self.steps_run >= spec.max_steps:
                self.stopped = "max_steps"
            elif self.calls >= spec.max_proposals:
                self.stopped = "max_proposals"
            else:
                await self._round()

    async def _round(self) -> None:
        spec = self.spec
        self.calls += 1
        async with self._open_arena() as arena:
            try:
                draft = await self._draft(arena)
            except Exception as exc:
                self.error = describe_error(exc)
                self.stopped = "propose_error"
                log.info("propose_failed", strategy=spec.name, call=self.calls, error=self.error)
                return
            if draft is None:
                self.timed_out = True
                self.stopped = "timeout"
                return
            draft = draft[: min(spec.k, spec.max_steps - self.steps_run)]
            for i, action in enumerate(draft):
                _refuse_sessions(action, f"drafted action {i}")
            if not draft:
                self.stopped = "exhausted"
                return
            number = len(self.rounds)
            summary: dict[str, Any] = {"drafted": len(draft), "accepted": 0, "rejected_at": None}
            self.rounds.append(summary)
            chain: list[Trial] = []
            after = self._judge(arena)
            for i, action in enumerate(draft):
                parents = [chain[-1] if chain else None]
                (trial,) = await arena.run([action], parents=parents, after=after)
                trial.info.update({"round": number, "step": i, "accepted": False})
                self.steps_run += 1
                if arena.timed_out:
                    self.timed_out = True
                if not trial.success:
                    summary["rejected_at"] = i
                    break
                chain.append(trial)
                if trial.info.get("goal") is True:
                    summary["drafted"] = i + 1  # what came after the goal was never needed
                    break
            if summary["rejected_at"] is not None and not self.timed_out:
                self.rejected += 1
            self.drafted += summary["drafted"]
            committed = False
            if chain:
                committed = await arena.commit(chain[-1])
                if committed:
                    for t in chain:
                        t.info["accepted"] = True
                    summary["accepted"] = len(chain)
                    self.accepted += len(chain)
                    if chain[-1].info.get("goal") is True:
                        self.goal_reached = True
                        self.stopped = "goal"
                else:
                    self.stopped = "commit_failed"
            first = len(self.results)
            for result in arena.outcome().results:
                parent = None if result.parent is None else first + result.parent
                self.results.append(attrs.evolve(result, index=first + result.index,
                                                 parent=parent))
            if committed:
                self.winner = self.results[first + chain[-1].index]
        log.info("speculation_round", strategy=spec.name, round=number, call=self.calls,
                 drafted=summary["drafted"], accepted=summary["accepted"],
                 rejected_at=summary["rejected_at"])

    def _judge(self, arena: Arena) -> Callable[[Trial], Awaitable[None]]:
        """The after-hook of a step: ``verify``, then ``goal``, in the step's branch."""
        verify, goal = self.spec.verify, self.spec.goal

        async def after(trial: Trial) -> None:
            assert trial.verdict is not None
            assert trial.branch is not None
            verdict = trial.verdict
            trial.info["action_success"] = verdict.success
            if not verdict.success:
                return
            if verify is not None:
                trial.info["error_in"] = "verify"
                judged = await arena.executor.execute(verify, trial.branch)
                del trial.info["error_in"]
                trial.info["verify"] = {"success": judged.success, "score": judged.score,
                                        **judged.info}
                score = judged.score if judged.score is not None else verdict.score
                trial.verdict = Verdict(judged.success, score, verdict.info)
                if not judged.success:
                    return
            if goal is not None:
                trial.info["error_in"] = "goal"
                reached = await arena.executor.execute(goal, trial.branch)
                del trial.info["error_in"]
                trial.info["goal"] = reached.success

        return after

    # -- drafting and the first goal check ----------------------------------------------------

    async def _draft(self, arena: Arena) -> list[Candidate] | None:
        """What the proposer drafts from the target's state (``None``: the timeout expired)."""
        draft: list[Candidate] | None = None
        with arena.deadline_scope() as scope:
            async with arena.open_scratch() as scratch:
                draft = await call_proposer(self.spec.propose, scratch, self.spec.k,
                                            what="propose")
        return None if scope.cancelled_caught else draft

    async def _initial_goal(self) -> bool:
        """Whether the goal holds on the target as it is (a failure or error: no)."""
        assert self.spec.goal is not None
        async with self._open_arena() as arena:
            with arena.deadline_scope() as scope:
                try:
                    async with arena.open_scratch() as scratch:
                        verdict = await arena.executor.execute(self.spec.goal, scratch)
                except Exception as exc:
                    log.info("goal_failed", strategy=self.spec.name, error=describe_error(exc))
                    return False
        if scope.cancelled_caught:
            self.timed_out = True
            return False
        return verdict.success

    # -- the outcome ------------------------------------------------------------------------------

    def outcome(self) -> Outcome:
        rate = self.accepted / self.drafted if self.drafted else None
        info = {
            "k": self.spec.k, "drafted": self.drafted, "accepted": self.accepted,
            "rejected": self.rejected, "acceptance_rate": rate,
            "proposer_calls": self.calls, "calls_saved": self.accepted - self.calls,
            "steps_run": self.steps_run, "goal_reached": self.goal_reached,
            "stopped": self.stopped, "error": self.error, "rounds": self.rounds,
        }
        return Outcome(
            committed=self.winner is not None, winner=self.winner, results=tuple(self.results),
            strategy=self.spec.name, duration=time.monotonic() - self.started,
            timed_out=self.timed_out, info=info,
        )


# -- a proposer from a model -------------------------------------------------------------------


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def llm_proposer(
    source: Any,
    prompt: Prompt | Callable[[Branch], Prompt | Awaitable[Prompt]],
    *,
    apply: Apply | None = None,
    split: Callable[[str], Sequence[str]] = _lines,
    sampling: Mapping[str, Any] | None = None,
    model: str | None = None,
) -> Propose:
    """A proposer backed by a :mod:`branchagent.llm` source: one completion, ``k`` steps.

    ``source`` is what :func:`branchagent.llm.as_source` takes (a
    ``vllm.LLM``, an ``openai.AsyncOpenAI`` client, a
    :class:`~branchagent.llm.Source`). Each proposer call samples one
    completion of ``prompt`` (text or chat messages, or a function of the
    scratch branch returning them, so the prompt can describe the current
    state), ``split`` cuts its text into steps (default: its non-empty
    lines), and the first ``k`` become actions: step ``i`` applies its text
    to the branch with ``apply(branch, completion)`` (default
    :func:`branchagent.llm.apply_auto`), the completion's ``index`` being
    ``i``. ``sampling`` goes to the source (``max_tokens``, ``temperature``,
    ``seed``, ...).
    """
    from branchagent.llm import Completion, apply_auto, as_candidate, as_source

    src: Source = as_source(source, model=model)
    act: Apply = apply if apply is not None else apply_auto

    async def propose(branch: Branch, k: int) -> list[Candidate]:
        made = prompt(branch) if callable(prompt) else prompt
        text_prompt: Prompt = await made if isinstance(made, Awaitable) else made
        (completion, *_) = await src.sample(text_prompt, 1, sampling=sampling)
        steps = list(split(completion.text))[:k]
        return [as_candidate(Completion(index=i, text=s), apply=act) for i, s in enumerate(steps)]

    return propose
