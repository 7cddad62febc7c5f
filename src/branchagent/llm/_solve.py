"""One call from a prompt to a committed, verified change: :func:`solve`."""

from __future__ import annotations

import inspect
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import anyio.to_thread
import attrs

from .._branch import Branch
from .._log import get_logger
from ..strategy import (
    Candidate,
    Outcome,
    Result,
    Strategy,
    Target,
    Verdict,
    describe_error,
    get_strategy,
    is_async_callable,
    run_candidate,
)
from ._actions import Apply, apply_auto
from ._completion import Completion, Scorer, get_scorer
from ._sources import Prompt, as_source

__all__ = ["TEXT_LIMIT", "as_candidate", "cap_text", "describe_apply", "describe_completion",
           "solve"]

log = get_logger("branchagent.llm")

#: Most characters of a completion's text kept in a record (``Result.info``, serve's
#: ``branchagent`` field); a longer text is cut there, with a last line saying so.
TEXT_LIMIT = 16_000

#: Most characters of what an action returned (a command's stdout) kept in a record.
_OUTPUT_LIMIT = 4096


def cap_text(text: str, limit: int = TEXT_LIMIT) -> str:
    """``text`` when it is at most ``limit`` characters, else its start and a marker line.

    The start is kept (a chat model's code block comes first; what runs on is
    usually repetition), and the marker names both lengths:
    ``... (completion cut at 16000 of 52311 characters)``.
    """
    if len(text) <= limit:
        return text
    return text[:limit] + f"\n... (completion cut at {limit} of {len(text)} characters)\n"


def describe_apply(value: object = None, error: str | None = None, *,
                   ran: bool = True) -> dict[str, Any]:
    """The record of what applying a completion did.

    ``{"ok": True, "paths": [...], "output": None, "error": None}`` when it
    succeeded (``paths``: what the action said it wrote; ``output``: the tail
    of a string it returned, a command's stdout), ``{"ok": False, ...,
    "error": "ApplyError: why"}`` when it refused or failed, and
    ``{"ok": None, ...}`` when it never finished (``ran=False``: cancelled or
    timed out first).
    """
    paths: list[str] = []
    output: str | None = None
    if isinstance(value, list | tuple) and all(isinstance(p, str) for p in value):
        paths = list(value)
    elif isinstance(value, str):
        output = value[-_OUTPUT_LIMIT:]
    ok: bool | None = (error is None) if ran or error is not None else None
    return {"ok": ok, "paths": paths, "output": output, "error": error}


async def _apply(apply: Apply, branch: Branch, completion: Completion) -> object:
    """Call ``apply``: an async one here, a sync one in a worker thread (it may block)."""
    if is_async_callable(apply):
        value = apply(branch, completion)
    else:
        value = await anyio.to_thread.run_sync(apply, branch, completion)
    if inspect.isawaitable(value):
        value = await value
    return value


def as_candidate(
    completion: Completion, *, apply: Apply = apply_auto, verify: Candidate | None = None,
    record: dict[str, Any] | None = None,
) -> Candidate:
    """A candidate that applies ``completion`` to its branch, then runs ``verify`` there.

    Its verdict is the verifier's (success and score; ``info["verify"]`` holds
    what the verifier said: exit status, stdout and stderr tails); without
    ``verify``, applying is success. ``info["apply"]`` says what applying did
    (:func:`describe_apply`) and ``info["applied"]`` lists the paths written.
    An :class:`~branchagent.llm.ApplyError` (or anything ``apply`` raises)
    fails the candidate with that error, and the verifier does not run; as
    that verdict is lost with the exception, pass a dict as ``record`` to get
    the apply record either way (it is updated in place). Use it to put model
    completions into any strategy.
    """

    async def candidate(branch: Branch) -> Verdict:
        if record is not None:
            record.update(describe_apply(ran=False))
        try:
            applied = await _apply(apply, branch, completion)
        except Exception as exc:
            if record is not None:
                record.update(describe_apply(error=describe_error(exc)))
            raise
        done = describe_apply(applied)
        if record is not None:
            record.update(done)
        info: dict[str, Any] = {"apply": done}
        if isinstance(applied, list | tuple) and all(isinstance(p, str) for p in applied):
            info["applied"] = list(applied)
        if verify is None:
            return Verdict(True, None, {**info, "verify": None})
        verdict = await run_candidate(verify, branch)
        info["verify"] = {"success": verdict.success, "score": verdict.score, **verdict.info}
        return Verdict(verdict.success, verdict.score, info)

    candidate.__qualname__ = candidate.__name__ = f"completion_{completion.index}"
    return candidate


def describe_completion(completion: Completion, score: float, scorer: Scorer) -> dict[str, Any]:
    """What :func:`solve` records in each :class:`~branchagent.Result`'s ``info``.

    ``text`` is the completion's text cut to :data:`TEXT_LIMIT` characters
    (:func:`cap_text`); ``text_chars`` its full length.
    """
    return {
        "completion": completion.index,
        "text": cap_text(completion.text),
        "text_chars": len(completion.text),
        "logprob_score": score,
        "scorer": getattr(scorer, "__name__", repr(scorer)),
        "cumulative_logprob": completion.cumulative_logprob,
        "mean_logprob": completion.mean_logprob,
        "n_tokens": completion.n_tokens,
        "finish_reason": completion.finish_reason,
    }


async def solve(
    target: Target,
    llm_or_client: Any,
    prompt: Prompt,
    *,
    n: int = 8,
    apply: Apply = apply_auto,
    verify: Candidate | None = None,
    strategy: Literal["best_of_n", "speculate"] = "best_of_n",
    score: str | Scorer = "mean_logprob",
    model: str | None = None,
    sampling: Mapping[str, Any] | None = None,
    commit: bool = True,
    max_parallel: int | None = None,
    timeout: float | None = None,
) -> Outcome:
    """Ask a model for ``n`` candidates in one call, try each in its own branch, commit the best.

    ``llm_or_client`` is an offline ``vllm.LLM``, an ``openai.AsyncOpenAI``
    client of a vLLM (or other OpenAI-compatible) server, or a
    :class:`~branchagent.llm.Source`; ``model`` names the server's model
    (default: the first it lists). ``sampling`` holds sampling parameters
    (``temperature`` (default 1.0), ``max_tokens``, ``seed``, ``top_p``, ...;
    see :mod:`branchagent.llm`). Each completion is scored from its token
    logprobs with ``score`` (a name in :data:`~branchagent.llm.SCORERS` or a
    callable), then becomes a candidate (:func:`as_candidate`): in its own
    branch of ``target``, ``apply(branch, completion)`` changes files, then
    ``verify`` (a :class:`~branchagent.Command`, a callable or a strategy)
    judges the result.

    ``strategy="best_of_n"`` runs every candidate and commits the verified one
    with the highest logprob score (``ba.BestOfN`` with ``scores=``);
    ``commit=False`` commits nothing and ``Outcome.best`` names the one that
    would have won. ``strategy="speculate"`` starts the candidates best score
    first and commits the first that verifies, cancelling the rest
    (``ba.Speculate``). ``max_parallel`` and ``timeout`` go to the strategy.
    Either is the class registered under that name in the
    ``branchagent.strategies`` entry-point group (:func:`~branchagent.get_strategy`).

    Returns the strategy's :class:`~branchagent.Outcome`; each result's
    ``info`` holds the completion's ``text`` (capped, :func:`cap_text`), its
    ``logprob_score`` and the other fields of :func:`describe_completion`,
    ``apply`` (what applying did, or why it refused: :func:`describe_apply`,
    also for a candidate whose apply failed), ``verify`` (the verification's
    success, score, exit status and ``stdout_tail``/``stderr_tail``) and the
    paths ``applied``; ``changes`` lists what the branch changed.
    ``Outcome.info["llm"]`` says how sampling went.
    """
    if strategy not in ("best_of_n", "speculate"):
        raise ValueError(f"strategy must be 'best_of_n' or 'speculate', got {strategy!r}")
    if strategy == "speculate" and not commit:
        raise ValueError("strategy='speculate' commits its first verified candidate; "
                         "use strategy='best_of_n' with commit=False to compare without committing")
    scorer = get_scorer(score)
    source = as_source(llm_or_client, model=model)
    started = time.monotonic()
    completions = await source.sample(prompt, n, sampling=sampling)
    sampled = time.monotonic() - started
    scores = [scorer(c) for c in completions]
    log.info("llm_sampled", source=repr(source), n=len(completions),
             best_score=max(scores, default=None), duration_ms=round(sampled * 1e3, 3))

    # The built-in found by its entry-point name (the registry of the strategy kit), so that
    # this package, below the built-in strategies, never imports them.
    factory: Any = get_strategy(strategy)
    order: Sequence[int] = range(len(completions))
    records: list[dict[str, Any]] = [describe_apply(ran=False) for _ in completions]
    strat: Strategy
    if strategy == "speculate":
        order = sorted(order, key=lambda i: (-scores[i], i))
        strat = factory([as_candidate(completions[i], apply=apply, verify=verify,
                                      record=records[i])
                         for i in order], max_parallel=max_parallel, timeout=timeout)
    else:
        strat = factory([as_candidate(c, apply=apply, verify=verify, record=records[i])
                         for i, c in enumerate(completions)],
                        scores=scores, commit=commit, max_parallel=max_parallel,
                        timeout=timeout)
    outcome = await strat.run(target)

    def enrich(r: Result) -> Result:
        i = order[r.index]
        return attrs.evolve(r, info={**describe_completion(completions[i], scores[i], scorer),
                                     **r.info, "apply": records[i]})

    results = tuple(enrich(r) for r in outcome.results)
    by_index = {r.index: r for r in results}
    winner = by_index[outcome.winner.index] if outcome.winner is not None else None
    info = {**outcome.info, "llm": {
        "source": repr(source), "n": n, "strategy": strategy,
        "scorer": getattr(scorer, "__name__", repr(scorer)),
        "sample_duration": sampled,
    }}
    return attrs.evolve(outcome, results=results, winner=winner, info=info)
