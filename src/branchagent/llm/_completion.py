"""Completions from vLLM (offline or OpenAI-compatible) and the scores made from their logprobs.

A :class:`Completion` is one of the ``n`` samples a model returned for a
prompt, whatever API it came through: the text, the logprob of each sampled
token, their sum and why generation stopped. :func:`completions_from_vllm`
reads an offline ``vllm.RequestOutput``; :func:`completions_from_openai` reads
a ``/v1/completions`` or ``/v1/chat/completions`` response (the ``openai``
client's objects, or the JSON as plain dicts).

A *scorer* maps a completion to a number, higher is better:
:func:`cumulative_logprob` (the sequence's log-likelihood; favours short
answers), :func:`mean_logprob` (per token; length-neutral) and the
length-normalised families in between, :func:`length_normalized` and
:func:`gnmt_normalized`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeAlias

import attrs

__all__ = [
    "SCORERS",
    "Completion",
    "Scorer",
    "completions_from_openai",
    "completions_from_vllm",
    "cumulative_logprob",
    "get_scorer",
    "gnmt_normalized",
    "length_normalized",
    "mean_logprob",
]


def _to_logprobs(value: Iterable[float] | None) -> tuple[float, ...] | None:
    if value is None:
        return None
    out = tuple(float(v) for v in value)
    if any(math.isnan(v) for v in out):
        raise ValueError("a token logprob must not be NaN")
    return out


def _default_cumulative(self: Completion) -> float | None:
    return math.fsum(self.token_logprobs) if self.token_logprobs is not None else None


def _to_optional_float(value: float | None) -> float | None:
    return None if value is None else float(value)


@attrs.frozen
class Completion:
    """One sampled answer to a prompt.

    ``index`` is its position in the model's response; ``token_logprobs`` the
    logprob of each generated token (``None`` when logprobs were not asked
    for); ``cumulative_logprob`` their sum (computed from ``token_logprobs``
    when not given; vLLM reports it itself); ``finish_reason`` is the API's
    (``"stop"``, ``"length"``, ...).
    """

    index: int
    text: str
    token_logprobs: tuple[float, ...] | None = attrs.field(default=None, converter=_to_logprobs)
    cumulative_logprob: float | None = attrs.field(
        default=attrs.Factory(_default_cumulative, takes_self=True),
        converter=_to_optional_float,
    )
    finish_reason: str | None = None

    @property
    def n_tokens(self) -> int | None:
        """How many tokens were generated (``None`` without logprobs)."""
        return len(self.token_logprobs) if self.token_logprobs is not None else None

    @property
    def mean_logprob(self) -> float | None:
        """The mean token logprob (``None`` without logprobs; ``-inf`` for no token)."""
        try:
            return mean_logprob(self)
        except ValueError:
            return None


# -- scorers -----------------------------------------------------------------------------

Scorer: TypeAlias = Callable[[Completion], float]
"""Maps a completion to a score (higher is better)."""


def _require(c: Completion) -> tuple[float, int]:
    if c.cumulative_logprob is None:
        raise ValueError(
            f"completion {c.index} carries no logprobs: ask the model for them "
            "(logprobs=1 in the sampling parameters)"
        )
    n = c.n_tokens
    if n is None:
        raise ValueError(f"completion {c.index} has a cumulative logprob but no token logprobs")
    return c.cumulative_logprob, n


def cumulative_logprob(c: Completion) -> float:
    """The log-likelihood of the whole completion: the sum of its token logprobs."""
    total, _ = _require(c)
    return total


def mean_logprob(c: Completion) -> float:
    """The mean token logprob: ``cumulative / n_tokens`` (``-inf`` for an empty completion)."""
    return length_normalized(1.0)(c)


def length_normalized(alpha: float = 1.0) -> Scorer:
    """A scorer ``cumulative / n_tokens ** alpha``.

    ``alpha=0`` is :func:`cumulative_logprob`, ``alpha=1`` is :func:`mean_logprob`;
    values between trade a preference for short answers against one for long
    ones. An empty completion scores ``-inf`` for ``alpha > 0``.
    """
    alpha = _check_alpha(alpha)

    def score(c: Completion) -> float:
        total, n = _require(c)
        if alpha == 0:
            return total
        if n == 0:
            return -math.inf
        return total / math.pow(n, alpha)

    score.__name__ = score.__qualname__ = f"length_normalized({alpha:g})"
    return score


def gnmt_normalized(alpha: float = 0.6) -> Scorer:
    """A scorer ``cumulative / ((5 + n_tokens) / 6) ** alpha``.

    The length penalty of Wu et al., "Google's Neural Machine Translation
    System" (2016), used by beam search decoders: unlike
    :func:`length_normalized` it stays finite (and ranks sensibly) for very
    short completions.
    """
    alpha = _check_alpha(alpha)

    def score(c: Completion) -> float:
        total, n = _require(c)
        return total / math.pow((5 + n) / 6, alpha)

    score.__name__ = score.__qualname__ = f"gnmt_normalized({alpha:g})"
    return score


def _check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 <= alpha <= 10:
        raise ValueError(f"alpha must be a number between 0 and 10, got {alpha!r}")
    return float(alpha)


#: The scorers :func:`get_scorer` knows by name.
SCORERS: Mapping[str, Scorer] = {
    "cumulative_logprob": cumulative_logprob,
    "mean_logprob": mean_logprob,
    "gnmt_logprob": gnmt_normalized(0.6),
}


def get_scorer(score: str | Scorer) -> Scorer:
    """``score`` itself if it is callable, else the scorer of that name in :data:`SCORERS`."""
    if callable(score):
        return score
    try:
        return SCORERS[score]
    except (KeyError, TypeError):
        known = ", ".join(sorted(SCORERS))
        raise ValueError(f"no scorer named {score!r}; known: {known}, or pass a callable") from None


# -- reading API responses -------------------------------------------------------------------


def _field(obj: object, name: str) -> Any:
    """``obj[name]`` for a mapping (JSON), else ``obj.name``; ``None`` when absent."""
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


def completions_from_vllm(output: Any) -> list[Completion]:
    """The completions of one offline ``vllm.RequestOutput`` (``llm.generate(...)[i]``).

    Each ``CompletionOutput`` gives its text, ``cumulative_logprob`` and, when
    ``SamplingParams(logprobs=k)`` was set, per position a dict from token id
    to ``Logprob``: the sampled token's entry is its logprob.
    """
    outputs = _field(output, "outputs")
    if outputs is None:
        raise TypeError(
            f"expected a vllm RequestOutput (with .outputs), got {type(output).__name__}"
        )
    result = []
    for position, o in enumerate(outputs):
        index = _field(o, "index")
        token_ids: Sequence[int] | None = _field(o, "token_ids")
        per_token = _field(o, "logprobs")
        logprobs: list[float] | None = None
        if per_token is not None and token_ids is not None:
            logprobs = [
                _logprob_value(per_token[j][token_id])
                for j, token_id in enumerate(token_ids[: len(per_token)])
            ]
        cumulative = _field(o, "cumulative_logprob") if logprobs is not None else None
        if logprobs is not None and cumulative is None:
            cumulative = math.fsum(logprobs)
        result.append(Completion(
            index=position if index is None else int(index),
            text=_field(o, "text") or "",
            token_logprobs=logprobs,
            cumulative_logprob=cumulative,
            finish_reason=_field(o, "finish_reason"),
        ))
    return result


def _logprob_value(entry: object) -> float:
    value = _field(entry, "logprob")
    return float(value if value is not None else entry)  # type: ignore[arg-type]


def completions_from_openai(response: Any) -> list[Completion]:
    """The completions of an OpenAI-compatible response, completions or chat.

    ``/v1/completions``: ``choices[i].text`` and ``choices[i].logprobs.token_logprobs``
    (``None`` entries, as ``echo`` gives for the first prompt token, are skipped).
    ``/v1/chat/completions``: ``choices[i].message.content`` and
    ``choices[i].logprobs.content[j].logprob``. Accepts the ``openai``
    client's objects or the parsed JSON.
    """
    choices = _field(response, "choices")
    if choices is None:
        raise TypeError(
            f"expected an OpenAI-compatible response (with .choices), got {type(response).__name__}"
        )
    result = []
    for position, choice in enumerate(choices):
        index = _field(choice, "index")
        message = _field(choice, "message")
        if message is not None:
            text = _field(message, "content") or ""
        else:
            text = _field(choice, "text") or ""
        lp = _field(choice, "logprobs")
        logprobs: list[float] | None = None
        if lp is not None:
            content = _field(lp, "content")
            if content is not None:  # chat
                logprobs = [float(_field(t, "logprob")) for t in content]
            else:
                token_logprobs = _field(lp, "token_logprobs")
                if token_logprobs is not None:
                    logprobs = [float(v) for v in token_logprobs if v is not None]
        result.append(Completion(
            index=position if index is None else int(index),
            text=text,
            token_logprobs=logprobs,
            finish_reason=_field(choice, "finish_reason"),
        ))
    return result
