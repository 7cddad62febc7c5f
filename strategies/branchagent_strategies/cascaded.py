"""Cascaded: waves of growing width, first success wins; each wave learns from the last."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TypeAlias

import attrs

from branchagent.strategy import (
    ATTEMPT_ENV,
    FEEDBACK_ENV,
    Branch,
    Command,
    Outcome,
    Result,
    Strategy,
    Target,
    VerdictLike,
    check_timeout,
    deadline_after,
)

from ._tasks import bind, describe_failure, env_text

__all__ = ["Cascaded", "CascadedTask"]

CascadedTask: TypeAlias = (
    Callable[[Branch, int, str | None], Awaitable[VerdictLike | Outcome] | VerdictLike | Outcome]
    | Command
)
"""``task(branch, attempt_index, feedback)`` (async or sync), or a Command reading
``$BRANCHAGENT_ATTEMPT`` and ``$BRANCHAGENT_FEEDBACK``."""


def _check_fan_out(fan_out: Sequence[int]) -> tuple[int, ...]:
    widths = tuple(fan_out)
    if not widths or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
        raise ValueError(f"fan_out must be a non-empty sequence of positive ints, got {fan_out!r}")
    return widths


@attrs.define(kw_only=True, eq=False)
class Cascaded(Strategy):
    """Escalate: one attempt, then a wider wave, then a wider one, until one succeeds.

    Wave ``w`` runs ``fan_out[w]`` attempts at once, each in its own child
    branch of the target, first-wins like :class:`~branchagent.Speculate`:
    the first success is committed at once, the rest of its wave is
    cancelled and their processes killed, and no later wave runs. Attempts
    are numbered across waves (``0, 1, 2, ...``); attempt ``i`` runs
    ``task(branch, i, feedback)``, where ``feedback`` is ``None`` in the
    first wave and afterwards the description of every failure of the
    earlier waves (errors, the candidate's ``Verdict.info["feedback"]``, a
    command's exit status and output tails), oldest first. A
    :class:`~branchagent.Command` task gets ``$BRANCHAGENT_ATTEMPT`` and
    ``$BRANCHAGENT_FEEDBACK`` (empty in the first wave, at most 64 KiB, the
    end kept). A task may also return the :class:`~branchagent.Outcome` of a
    strategy it ran on its branch.

    ``wave_timeout`` bounds each wave: its unfinished attempts fail with a
    timeout (fed forward like any failure) and the next wave starts.
    ``timeout`` bounds the wall time of the whole run; when it expires
    nothing more is committed and ``Outcome.timed_out`` is set. A failed
    wave's branches are aborted before the next wave forks. A success whose
    commit is refused (a conflict) fails like any attempt and the cascade
    goes on. Each result's ``info`` says its ``wave`` and the
    ``received_feedback``; ``Outcome.info`` the ``fan_out`` and how many
    ``waves`` ran.
    """

    name = "cascaded"

    task: CascadedTask = attrs.field(kw_only=False)
    fan_out: tuple[int, ...] = attrs.field(default=(1, 2, 4), converter=_check_fan_out)
    wave_timeout: float | None = attrs.field(default=None, converter=check_timeout)

    @task.validator
    def _check_task(self, _attr: object, task: object) -> None:
        if not (isinstance(task, Command) or callable(task)):
            raise TypeError(
                f"task must be a callable taking (branch, attempt_index, feedback) or a Command, "
                f"not {type(task).__name__}"
            )

    async def run(self, target: Target) -> Outcome:
        async with self.open_arena(target) as arena:
            failures: list[Result] = []
            attempt = 0
            waves = 0
            for wave, width in enumerate(self.fan_out):
                waves += 1
                feedback = _join(failures)
                candidates = [
                    bind(self.task, (attempt + i, feedback),
                         {ATTEMPT_ENV: str(attempt + i), FEEDBACK_ENV: env_text(feedback)})
                    for i in range(width)
                ]
                attempt += width
                wave_end = deadline_after(self.wave_timeout)
                by_wave = wave_end is not None and (
                    arena.deadline is None or wave_end < arena.deadline)
                arena.stopped_by = None  # first-wins anew in every wave
                trials = await arena.run(candidates, deadline=wave_end, stop=lambda t: t.success)
                if by_wave and arena.timed_out:  # the wave's bound, not the strategy's
                    arena.timed_out = False
                    for t in trials:
                        if not t.done and arena.stopped_by is None:
                            t.error = (f"TimeoutError: the wave's timeout expired "
                                       f"(wave_timeout={self.wave_timeout:g} s)")
                for t in trials:
                    t.info["wave"] = wave
                    t.info["received_feedback"] = feedback
                winner = arena.stopped_by
                if winner is not None and await arena.commit(winner):
                    break
                if arena.timed_out:
                    break
                # Feed forward what ran to its end or hit the wave's timeout; not the attempts
                # cancelled because a success (whose commit was then refused) came first.
                failures.extend(t.result() for t in trials if t.done or winner is None)
                for t in trials:
                    await arena.abort(t)
            return arena.outcome({"fan_out": list(self.fan_out), "waves": waves})


def _join(failures: Sequence[Result]) -> str | None:
    if not failures:
        return None
    return "\n\n".join(f"attempt {r.index} failed:\n{describe_failure(r)}" for r in failures)
