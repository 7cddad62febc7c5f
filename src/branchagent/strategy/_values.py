"""The values a strategy run speaks: verdicts, commands, results, outcomes."""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeAlias, TypeVar

import attrs

from .._limits import Limits
from ..exceptions import CandidateError

__all__ = [
    "ATTEMPT_ENV",
    "FEEDBACK_ENV",
    "SCORE_FILE_ENV",
    "Command",
    "Isolated",
    "Outcome",
    "Result",
    "Verdict",
    "VerdictLike",
    "best",
    "describe_error",
    "to_verdict",
]

#: Environment variable naming the file a :class:`Command` may write its score to.
SCORE_FILE_ENV = "BRANCHAGENT_SCORE_FILE"

#: Environment variable carrying the feedback of earlier failures to a Command task.
FEEDBACK_ENV = "BRANCHAGENT_FEEDBACK"

#: Environment variable carrying the attempt index to a Command task.
ATTEMPT_ENV = "BRANCHAGENT_ATTEMPT"

_T = TypeVar("_T")


def _to_score(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"a score must be a number or None, not {type(value).__name__}")
    score = float(value)
    if math.isnan(score):
        raise ValueError("a score must not be NaN")
    return score


def _check_bool(_inst: object, attr: attrs.Attribute[bool], value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{attr.name} must be a bool, not {type(value).__name__}")


@attrs.frozen
class Verdict:
    """What a candidate says about its own branch: did it succeed, and how well.

    ``score`` is any number (higher is better) or ``None``; ``info`` is free
    form and is carried into the candidate's :class:`Result`.
    """

    success: bool = attrs.field(validator=_check_bool)
    score: float | None = attrs.field(default=None, converter=_to_score)
    info: Mapping[str, Any] = attrs.field(factory=dict)


VerdictLike: TypeAlias = bool | float | tuple[bool, float] | Verdict
"""What a candidate callable may return."""


def _to_argv(argv: Sequence[str | os.PathLike[str]]) -> tuple[str, ...]:
    if isinstance(argv, str | bytes) or not argv:
        raise ValueError("argv must be a non-empty sequence of strings, e.g. ['pytest', '-q']")
    return tuple(os.fspath(a) for a in argv)


@attrs.frozen
class Command:
    """A candidate that runs ``argv`` in the branch (see ``Branch.run``).

    Success is exit status 0 (and not killed). The process may report a
    score by writing a number to the file named by ``$BRANCHAGENT_SCORE_FILE``
    (a fresh path outside the branch and the workspace) or to file descriptor 3,
    which is open on the same file; the last non-empty line counts.
    """

    argv: tuple[str, ...] = attrs.field(converter=_to_argv)
    limits: Limits | None = attrs.field(default=None, kw_only=True)
    isolate: bool = attrs.field(default=True, kw_only=True)
    env: Mapping[str, str] | None = attrs.field(default=None, kw_only=True)


@attrs.frozen
class Isolated:
    """A callable candidate run in a child process inside the branch's sandbox.

    Plain callables run in the agent process and act on ``branch.path``.
    Wrapped in ``Isolated``, the callable runs through :meth:`Branch.call`:
    in private namespaces where the branch is at the workspace's path, under
    ``limits``, killed with the branch. It receives a stand-in branch
    (``name``, ``path``, ``depth``) and returns what a candidate returns; it
    and its result travel with cloudpickle.
    """

    fn: Callable[..., Any]
    limits: Limits | None = attrs.field(default=None, kw_only=True)
    isolate: bool = attrs.field(default=True, kw_only=True)
    env: Mapping[str, str] | None = attrs.field(default=None, kw_only=True)


@attrs.frozen(kw_only=True)
class Result:
    """What became of one candidate in a strategy run.

    ``error`` is ``"TypeName: message"`` when the candidate raised, returned
    something that is not a verdict, was cancelled (``"Cancelled: ..."``) or
    timed out (``"TimeoutError: ..."``), else ``None``. ``branch`` is the
    name of the branch it ran in (gone by now unless it won), ``changes`` the
    paths it changed there, ``duration`` seconds from its start to its end.

    ``index`` is unique within an :class:`Outcome`. Strategies that search a
    tree (``TreeSearch``, ``Beam``) fork a node's branch from its parent
    node's branch: ``parent`` is the index of the parent node's result
    (``None`` for a child of the strategy's target) and ``depth`` its
    distance from the target's children (``0`` for them), so the results
    carry the whole tree.

    ``start`` and ``end`` are seconds from the strategy run's start to the
    candidate's start and end (``None``: it never started), so a report can
    show which candidates ran at the same time. ``diff`` is the unified diff
    of its branch when it ended, cut to a bounded size (``None``: unknown).
    """

    index: int
    success: bool
    score: float | None = None
    duration: float = 0.0
    error: str | None = None
    branch: str | None = None
    changes: tuple[str, ...] = ()
    info: Mapping[str, Any] = attrs.field(factory=dict)
    parent: int | None = None
    depth: int = 0
    start: float | None = None
    end: float | None = None
    diff: str | None = attrs.field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "index": self.index,
            "parent": self.parent,
            "depth": self.depth,
            "success": self.success,
            "score": _jsonable(self.score),
            "duration": self.duration,
            "start": self.start,
            "end": self.end,
            "error": self.error,
            "branch": self.branch,
            "changes": list(self.changes),
            "info": _jsonable(self.info),
            "diff": self.diff,
        }


def _to_indices(indices: Iterable[int]) -> tuple[int, ...]:
    return tuple(indices)


@attrs.frozen(kw_only=True)
class Outcome:
    """What a strategy run did: whether it committed, which candidate won, every result.

    ``winner`` is the committed candidate's result (``None`` when nothing was
    committed): it never names an aborted candidate. ``results`` are in
    candidate order (node order, parents first, for tree searches).
    ``timed_out`` says the strategy's ``timeout`` expired. ``info`` is what
    the strategy says about the run as a whole (a search's node count, why
    it stopped, ...). ``merged`` lists the indices of the results whose
    changes the committed winner combines, when a strategy (``Merge``)
    committed a synthesis of several candidates; it is empty otherwise.
    """

    committed: bool
    winner: Result | None
    results: tuple[Result, ...]
    strategy: str = ""
    duration: float = 0.0
    timed_out: bool = False
    info: Mapping[str, Any] = attrs.field(factory=dict)
    merged: tuple[int, ...] = attrs.field(default=(), converter=_to_indices)

    @property
    def best(self) -> Result | None:
        """The highest-scoring success (ties: lowest index), committed or not."""
        return best([r for r in self.results if r.success], lambda r: (r.score, r.index))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "strategy": self.strategy,
            "committed": self.committed,
            "winner": self.winner.to_dict() if self.winner is not None else None,
            "results": [r.to_dict() for r in self.results],
            "merged": list(self.merged),
            "duration": self.duration,
            "timed_out": self.timed_out,
            "info": _jsonable(self.info),
        }

    def to_json(self, *, indent: int | None = None) -> str:
        """The outcome as JSON text (``info`` values JSON cannot hold become strings)."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def to_html(self, *, title: str | None = None) -> str:
        """A self-contained HTML report of the run (no network: inline CSS, JS and SVG).

        It draws the tree of candidates parent to child with each one's state,
        score, duration and verdict, the winner's path highlighted, a timeline
        of which candidates ran at the same time, and each one's diff on
        click. ``branchagent report TRACE.json`` makes the same page from
        :meth:`to_json`'s text.
        """
        from ._report import render_report

        return render_report(self.to_dict(), title=title)


def _jsonable(value: object) -> Any:
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    if isinstance(value, Outcome | Result):
        return value.to_dict()
    return repr(value)


def best(items: Sequence[_T], key: Callable[[_T], tuple[float | None, int]]) -> _T | None:
    """The item with the highest score (a number beats None), ties to the lowest index."""
    found: _T | None = None
    found_key: tuple[bool, float, int] | None = None
    for item in items:
        score, index = key(item)
        k = (score is not None, score if score is not None else 0.0, -index)
        if found_key is None or k > found_key:
            found, found_key = item, k
    return found


def describe_error(exc: BaseException) -> str:
    """``"TypeName: message"`` for a result's ``error``."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def to_verdict(value: object) -> Verdict:
    """Normalise what a candidate returned; raise :class:`CandidateError` for anything else."""
    if isinstance(value, Verdict):
        return value
    if isinstance(value, bool):
        return Verdict(value)
    if isinstance(value, numbers.Real):  # int, float, numpy scalars, ...
        if math.isnan(value):
            raise CandidateError("candidate returned NaN as its score")
        return Verdict(True, float(value))
    if (
        isinstance(value, tuple)
        and len(value) == 2
        and isinstance(value[0], bool)
        and isinstance(value[1], numbers.Real)
        and not isinstance(value[1], bool)
    ):
        if math.isnan(value[1]):
            raise CandidateError("candidate returned NaN as its score")
        return Verdict(value[0], float(value[1]))
    shown = repr(value)
    if len(shown) > 200:
        shown = shown[:200] + "..."
    raise CandidateError(
        f"candidate returned {type(value).__name__} {shown}; "
        "expected bool, a number, (bool, float) or Verdict"
    )
