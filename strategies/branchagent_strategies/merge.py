"""Merge: run every candidate; combine the changes of the successes that do not conflict."""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import anyio.to_thread
import attrs

from branchagent.strategy import (
    Branch,
    Candidate,
    LocalExecutor,
    Outcome,
    Strategy,
    Target,
    Trial,
    Verdict,
    rank_key,
    to_candidates,
)

__all__ = ["Merge"]


@attrs.define(kw_only=True, eq=False)
class Merge(Strategy):
    """Synthesis: commit the union of the successful candidates' non-conflicting changes.

    Every candidate runs to the end in its own child branch of the target, as
    in :class:`~branchagent.BestOfN` (``evaluate``, when given, runs in a
    candidate's branch after it succeeded: its success is required and its
    score ranks the candidate). The successes are taken best-first (highest
    score, ties to the lowest index); each one *joins the merge* unless a path
    it changed overlaps a path changed by one that joined before it. Two
    paths overlap when they are the same path or one lies under the other,
    except where both are directories on both sides (adding files to the
    same directory is no conflict; replacing or deleting it is). So of a
    group of conflicting candidates the best-ranked one is kept and the others
    are left out (``Outcome.info["conflicts"]`` says with whom each one
    conflicted).

    When two or more joined, a merge branch is forked from the target and each
    joined candidate's changes are written into it, as they are in its branch:
    contents, deletions, modes, symlinks, directories. The merged branch is
    then verified by ``verify`` (a candidate-like callable,
    :class:`~branchagent.Command` or strategy run in the merged branch; it
    defaults to ``evaluate``; when both are ``None`` a clean merge is accepted
    as it is, as a clean ``git merge`` is). If it passes, it is committed, and
    ``Outcome.merged`` lists the candidates it combines (the winner is the
    merge's own result, the last one, whose ``info["merged"]`` says the same).
    If it fails, or only one success joined, the best single success is
    committed instead, and ``Outcome.merged`` is empty. ``timeout`` bounds the
    whole run, merge and verification included.
    """

    name = "merge"

    candidates: tuple[Candidate, ...] = attrs.field(converter=to_candidates, kw_only=False)
    evaluate: Candidate | None = None
    verify: Candidate | None = None

    async def run(self, target: Target) -> Outcome:
        async with self.open_arena(target) as arena:

            async def judge(trial: Trial, check: Candidate | None, key: str) -> None:
                assert trial.verdict is not None
                assert trial.branch is not None
                verdict = trial.verdict
                if not verdict.success or check is None:
                    return
                judged = await arena.executor.execute(check, trial.branch)
                trial.info[key] = {"success": judged.success, "score": judged.score,
                                   **judged.info}
                score = judged.score if judged.score is not None else verdict.score
                trial.verdict = Verdict(judged.success, score, verdict.info)

            async def evaluate(trial: Trial) -> None:
                await judge(trial, self.evaluate, "evaluate")

            trials = await arena.run(self.candidates, after=evaluate)
            passing = sorted((t for t in trials if t.success), key=rank_key)
            joined, conflicts = await anyio.to_thread.run_sync(_plan, passing)
            info: dict[str, Any] = {"conflicts": conflicts, "merge": None,
                                    "merge_verified": None}
            if len(joined) > 1:
                check = self.verify if self.verify is not None else self.evaluate
                merge = _union_writer(joined)

                async def verify(trial: Trial) -> None:
                    await judge(trial, check, "verify")

                (merged,) = await arena.run([merge], after=verify, executor=LocalExecutor())
                merged.info["merged"] = [t.index for t in joined]
                info["merge"] = merged.index
                info["merge_verified"] = merged.success
                if merged.success and await arena.commit(merged):
                    return arena.outcome(info, merged=joined)
                await arena.abort(merged)
            if passing:
                await arena.commit(passing[0])
            return arena.outcome(info)


def _union_writer(joined: Sequence[Trial]) -> Candidate:
    """The merge's candidate: write every joined trial's changes into the merge branch."""
    sources = [(Path(t.branch.path), t.changes) for t in joined if t.branch is not None]
    score = max((t.score for t in joined if t.score is not None), default=None)

    async def write_union(branch: Branch) -> Verdict:
        await anyio.to_thread.run_sync(_write_union, sources, Path(branch.path))
        return Verdict(True, score)

    return write_union


def _plan(passing: Sequence[Trial]) -> tuple[list[Trial], dict[str, int]]:
    """Who joins the merge (best-first), and for each one left out, the one it conflicts with."""
    joined: list[tuple[Trial, dict[str, bool]]] = []
    conflicts: dict[str, int] = {}
    for trial in passing:
        if trial.branch is None or "changes_error" in trial.info:
            continue
        root = Path(trial.branch.path)
        ours = {p: _is_dir(root / p) for p in trial.changes}
        clash = next((t for t, theirs in joined if _overlap(ours, theirs)), None)
        if clash is None:
            joined.append((trial, ours))
        else:
            conflicts[str(trial.index)] = clash.index
    return [t for t, _ in joined], conflicts


def _overlap(ours: dict[str, bool], theirs: dict[str, bool]) -> bool:
    """Whether two sets of changed paths (path -> is a directory now) touch the same entries."""
    if any(p in theirs and not (is_dir and theirs[p]) for p, is_dir in ours.items()):
        return True  # the same path, unless a directory on both sides
    return _under_file(ours, theirs) or _under_file(theirs, ours)


def _under_file(ours: dict[str, bool], theirs: dict[str, bool]) -> bool:
    """Whether one of our paths lies under a path theirs deleted or made a non-directory."""
    return any(
        str(up) in theirs and not theirs[str(up)]
        for path in ours
        for up in PurePosixPath(path).parents
    )


def _is_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _write_union(sources: Sequence[tuple[Path, Sequence[str]]], dest: Path) -> None:
    for root, changes in sources:
        # Deletions deepest first, then the rest parents first.
        gone = sorted((p for p in changes if not os.path.lexists(root / p)),
                      key=lambda p: -p.count("/"))
        for rel in gone:
            _remove(dest / rel)
        for rel in sorted((p for p in changes if p not in gone), key=lambda p: p.count("/")):
            _copy_entry(root / rel, dest / rel)


def _remove(path: Path) -> None:
    if stat.S_ISDIR(_lmode(path)):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def _lmode(path: Path) -> int:
    try:
        return os.lstat(path).st_mode
    except FileNotFoundError:
        return 0


def _copy_entry(src: Path, dst: Path) -> None:
    """Make ``dst`` what ``src`` is: a directory (its mode), a symlink, a file, a FIFO."""
    st = os.lstat(src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if stat.S_ISDIR(st.st_mode):
        if not stat.S_ISDIR(_lmode(dst)):
            _remove(dst)
            dst.mkdir()
        os.chmod(dst, stat.S_IMODE(st.st_mode))
        return
    _remove(dst)
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(src), dst)
    elif stat.S_ISFIFO(st.st_mode):
        os.mkfifo(dst, stat.S_IMODE(st.st_mode))
    else:
        shutil.copy2(src, dst, follow_symlinks=False)
