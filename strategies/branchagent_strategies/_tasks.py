"""What the feedback-driven strategies share: binding tasks, feedback text.

Reflexion and Cascaded call a *task* with more than the branch (the
feedback of earlier failures, an attempt index). :func:`bind` turns such a
task into an ordinary candidate so it runs through the arena and its
executor like any other; a :class:`~branchagent.Command` task gets the same
values in its environment instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from branchagent.strategy import (
    ATTEMPT_ENV,
    FEEDBACK_ENV,
    Branch,
    Candidate,
    Command,
    Outcome,
    Result,
    Verdict,
    call,
    from_outcome,
    to_verdict,
)

__all__ = ["ATTEMPT_ENV", "FEEDBACK_ENV", "bind", "describe_failure", "env_text"]

# Linux caps one environment string at 128 KiB (MAX_ARG_STRLEN); stay well below.
_ENV_BYTES = 64 * 1024
_TRUNCATED = "[... earlier feedback truncated ...]\n"


def bind(task: Any, args: tuple[Any, ...], env: Mapping[str, str]) -> Candidate:
    """A candidate that runs ``task(branch, *args)``, or the Command ``task`` with ``env`` added.

    The task may return what a candidate returns, or the :class:`Outcome` of
    a strategy it ran on the branch (success: that strategy committed).
    """
    if isinstance(task, Command):
        return attrs.evolve(task, env={**(task.env or {}), **env})

    async def candidate(branch: Branch) -> Verdict:
        value = await call(task, branch, *args)
        if isinstance(value, Outcome):
            return from_outcome(value)
        return to_verdict(value)

    candidate.__qualname__ = f"bound({getattr(task, '__qualname__', repr(task))})"
    return candidate


def describe_failure(result: Result) -> str:
    """The feedback text of a failed attempt, from its result alone.

    In order: the text the candidate gave as ``Verdict.info["feedback"]``,
    its error, then for a command its exit status and the tails of its
    output, for a nested strategy its candidates' errors.
    """
    parts: list[str] = []
    info = result.info
    own = info.get("feedback")
    if isinstance(own, str) and own.strip():
        parts.append(own.rstrip())
    if result.error is not None:
        parts.append(result.error)
    returncode = info.get("returncode")
    if isinstance(returncode, int) and not isinstance(returncode, bool):
        killed = info.get("killed")
        parts.append(f"exit status {returncode}" + (f" (killed: {killed})" if killed else ""))
        for key, label in (("stdout_tail", "stdout"), ("stderr_tail", "stderr")):
            text = info.get(key)
            if isinstance(text, str) and text.strip():
                parts.append(f"{label}:\n{text.rstrip()}")
    nested = info.get("outcome")
    if isinstance(nested, Mapping):
        inner = [r for r in nested.get("results", ()) if isinstance(r, Mapping)]
        for r in inner:
            if r.get("error"):
                parts.append(f"{nested.get('strategy', 'strategy')} candidate {r.get('index')}: "
                             f"{r['error']}")
        if not nested.get("committed"):
            parts.append(f"the nested {nested.get('strategy', 'strategy')} committed nothing")
    if not parts:
        score = f" (score {result.score:g})" if result.score is not None else ""
        parts.append(f"the attempt did not succeed{score}")
    return "\n".join(parts)


def env_text(text: str | None) -> str:
    """``text`` fit for one environment variable: no NUL, at most 64 KiB (its end is kept)."""
    if not text:
        return ""
    text = text.replace("\x00", "\\0")
    data = text.encode("utf-8", errors="replace")
    if len(data) <= _ENV_BYTES:
        return data.decode("utf-8")
    keep = _ENV_BYTES - len(_TRUNCATED.encode())
    return _TRUNCATED + data[-keep:].decode("utf-8", errors="ignore")

