"""What the searching strategies (TreeSearch, Beam) share: proposing, judging, state keys."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TypeAlias

import anyio.to_thread

from branchagent.exceptions import CandidateError
from branchagent.strategy import AfterHook, Arena, Branch, Candidate, Target, Trial, Verdict, call

__all__ = ["Expand", "judge_with", "propose", "state_key", "viable"]

Expand: TypeAlias = Callable[[Branch, int], Awaitable[Iterable[Candidate]] | Iterable[Candidate]]
"""``expand(branch, depth)``, async or sync: the candidates to try from a node's state."""

_CHUNK = 1 << 20


async def propose(
    expand: Callable[..., object], branch: Branch, arg: int, *, what: str = "expand"
) -> list[Candidate]:
    """Call ``expand(branch, arg)`` (a sync one in a worker thread) and check what it returned.

    Raises what ``expand`` raised, or :class:`CandidateError` when it returned
    something that is not an iterable of candidates (a string, a mapping, ...);
    ``what`` names the callback in that error.
    """
    value: object = await call(expand, branch, arg)
    if isinstance(value, str | bytes | Mapping) or not isinstance(value, Iterable):
        raise CandidateError(
            f"{what} returned {type(value).__name__}; expected an iterable of candidates"
        )
    return list(value)


def judge_with(arena: Arena, evaluate: Candidate | None) -> AfterHook:
    """The after-hook that scores a node: its candidate's verdict, then ``evaluate``'s.

    ``evaluate`` (a candidate-like callable, Command or strategy) runs in the
    node's branch through the arena's executor, only when the candidate
    succeeded; its success decides whether the node is *verified* and its
    score (when it gives one) replaces the candidate's. The candidate's own
    verdict is kept in ``info`` (``candidate_success``, ``candidate_score``):
    a node whose candidate succeeded can be expanded even when it is not
    verified yet.
    """

    async def after(trial: Trial) -> None:
        assert trial.verdict is not None
        assert trial.branch is not None
        verdict = trial.verdict
        trial.info["candidate_success"] = verdict.success
        trial.info["candidate_score"] = verdict.score
        if not verdict.success or evaluate is None:
            return
        judged = await arena.executor.execute(evaluate, trial.branch)
        trial.info["evaluate"] = {"success": judged.success, "score": judged.score,
                                  **judged.info}
        score = judged.score if judged.score is not None else verdict.score
        trial.verdict = Verdict(judged.success, score, verdict.info)

    return after


def viable(trial: Trial) -> bool:
    """Whether ``trial`` ran to the end without error and its candidate succeeded."""
    return trial.done and trial.error is None and bool(trial.info.get("candidate_success"))


async def state_key(node: Trial, lineage: Sequence[Trial], target: Target) -> str | None:
    """A content hash of what ``node``'s branch differs in from ``target``.

    Only paths some trial of the lineage changed can differ; each one that
    does (by type, mode, content or link target) goes into the hash with
    its path, so two nodes that reached the same state along different
    paths (or by undoing an edit) get the same key. ``None`` when a
    lineage's changes are unknown or the branch is gone.
    """
    if node.branch is None or any("changes_error" in t.info for t in lineage):
        return None
    paths = sorted({p for t in lineage for p in t.changes})
    return await anyio.to_thread.run_sync(_state_key, node.branch.path, target.path, paths)


def _state_key(tree: Path, base: Path, paths: list[str]) -> str | None:
    h = hashlib.sha256()
    for rel in paths:
        ours = _entry_key(tree / rel)
        if ours is None:
            return None
        if ours != _entry_key(base / rel):
            h.update(os.fsencode(rel) + b"\0" + ours + b"\0")
    return h.hexdigest()


def _entry_key(path: Path) -> bytes | None:
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return b"-"
    except OSError:
        return None
    mode = stat.S_IMODE(st.st_mode)
    if stat.S_ISDIR(st.st_mode):
        return b"d%o" % mode
    if stat.S_ISLNK(st.st_mode):
        try:
            return b"l" + os.fsencode(os.readlink(path))
        except OSError:
            return None
    if not stat.S_ISREG(st.st_mode):
        return b"o%o:%o" % (stat.S_IFMT(st.st_mode), mode)
    digest = hashlib.sha256()
    try:
        with path.open("rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
    except OSError:
        return None
    return b"f%o:" % mode + digest.hexdigest().encode()
