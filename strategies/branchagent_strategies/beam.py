"""Beam: K lineages of nested branches; at each depth the K best children survive."""

from __future__ import annotations

from typing import Any

import anyio
import attrs

from branchagent.strategy import (
    AfterHook,
    Arena,
    BranchState,
    Candidate,
    Outcome,
    Strategy,
    Target,
    Trial,
    describe_error,
    get_logger,
    pick_best,
    rank_key,
    to_candidates_or_empty,
)

from ._options import at_least, callable_as
from ._search import Expand, judge_with, propose, viable

__all__ = ["Beam"]

log = get_logger("branchagent.strategy")


@attrs.define(kw_only=True, eq=False)
class Beam(Strategy):
    """Beam search over nested branches: ``beam_width`` lineages, ``max_depth`` levels.

    The ``candidates`` run in children of the target (depth 0); the
    ``beam_width`` best viable ones become the beams. At each further depth,
    ``expand(branch, depth)`` (async or sync; ``branch`` is a throwaway fork
    of the beam, so nothing it writes reaches the beam) proposes candidates
    for every beam, each proposal runs in its own fork of its beam's branch,
    all the children of that depth are ranked together, and the
    ``beam_width`` best viable children become the new beams. A beam may
    contribute several survivors: each is its own branch, so the width is
    kept (nothing is ever committed into a beam during the search). Losing
    children are aborted at once; so is a beam whose lineage no longer leads
    to a current beam (``info["dropped"]``), unless it is verified.

    A node is *viable* when its candidate succeeded (and ``evaluate``, if
    any, did not raise) and *verified* when it succeeded outright:
    ``evaluate`` (a candidate-like callable, :class:`~branchagent.Command` or
    strategy, run in the node's branch after a successful candidate) decides
    success and gives the score; without it, the candidate's own verdict
    does. Ranking is by score (a number beats none; ties to the node that
    came first).

    The search ends after ``max_depth`` expansions, when a depth yields no
    viable child, or when ``timeout`` (the wall time of the whole search)
    expires. Then the best verified node that was ever a beam (at any depth:
    a lineage may end early, or a verified beam may beat all its
    continuations) is committed with its lineage: into its parent beam, that
    one into its own, ..., into the target, one commit into each. Every
    other branch is aborted, on every path. An
    ``expand`` that raises fails that beam (its ``error``); the others go
    on. Results carry ``parent`` and ``depth``; ``info["beam"]`` marks the
    nodes that were selected as beams, ``info["candidate"]`` a node's index
    among its proposals.
    """

    name = "beam"

    candidates: tuple[Candidate, ...] = attrs.field(converter=to_candidates_or_empty,
                                                    kw_only=False)
    expand: Expand = attrs.field(validator=callable_as("a callable (branch, depth) -> candidates"))
    beam_width: int = attrs.field(default=4, validator=at_least(1))
    max_depth: int = attrs.field(default=3, validator=at_least(0))
    evaluate: Candidate | None = None

    async def run(self, target: Target) -> Outcome:
        async with self.open_arena(target) as arena:
            search = _BeamSearch(self, arena)
            await search.run()
            return arena.outcome(info=search.summary())


class _BeamSearch:
    def __init__(self, spec: Beam, arena: Arena) -> None:
        self.spec = spec
        self.arena = arena
        self.after: AfterHook = judge_with(arena, spec.evaluate)
        self.beams: list[Trial] = []
        self.ever: list[Trial] = []  # every node selected as a beam, in order
        self.depth = 0
        self.stopped = ""

    async def run(self) -> None:
        arena = self.arena
        born = await arena.run(self.spec.candidates, after=self.after)
        await self._select(born, list(range(len(born))))
        while True:
            if arena.timed_out:
                self.stopped = "timeout"
                break
            if not self.beams:
                self.stopped = "exhausted"
                break
            if self.depth >= self.spec.max_depth:
                self.stopped = "max_depth"
                break
            proposals = await self._expand_all(self.beams)
            if arena.timed_out:
                await self._prune()
                self.stopped = "timeout"
                break
            candidates: list[Candidate] = []
            parents: list[Trial | None] = []
            positions: list[int] = []
            for beam, proposed in zip(self.beams, proposals, strict=True):
                for i, candidate in enumerate(proposed):
                    candidates.append(candidate)
                    parents.append(beam)
                    positions.append(i)
            born = await arena.run(candidates, parents=parents, after=self.after)
            if not await self._select(born, positions):
                self.stopped = "exhausted"
                break
            self.depth += 1
        winner = pick_best([t for t in self.ever if t.success and _open(t)])
        if winner is not None:
            await arena.commit(winner)

    def summary(self) -> dict[str, Any]:
        return {
            "beam_width": self.spec.beam_width, "max_depth": self.spec.max_depth,
            "depth_reached": self.depth, "nodes": len(self.arena.trials),
            "beams": [t.index for t in self.beams], "stopped": self.stopped,
        }

    async def _select(self, born: list[Trial], positions: list[int]) -> bool:
        """Rank one depth's children; the best ``beam_width`` become the beams.

        Returns whether any child survived (if none did, the beams stay as they were).
        """
        for t, i in zip(born, positions, strict=True):
            t.info["candidate"] = i
        survivors = sorted((t for t in born if viable(t)), key=rank_key)[: self.spec.beam_width]
        for t in survivors:
            t.info["beam"] = True
        self.ever.extend(survivors)
        if survivors:
            self.beams = survivors
            log.info("beams_selected", strategy=self.spec.name, node_depth=survivors[0].depth,
                     beams=[t.index for t in survivors], children=len(born))
        await self._prune()
        return bool(survivors)

    def _needed(self) -> set[int]:
        """The lineages of the current beams and of every verified beam."""
        heads = [t for t in self.beams if viable(t)] + [t for t in self.ever if t.success]
        return {x.index for t in heads if _open(t) for x in self.arena.lineage(t)}

    async def _prune(self) -> None:
        """Abort every branch no lineage needs (losing children, dead-ended beams)."""
        needed = self._needed()
        victims = [t for t in self.arena.trials if t.index not in needed and _open(t)]
        for t in victims:
            if t.info.get("beam"):
                t.info["dropped"] = True
        for t in victims:
            await self.arena.abort(t)

    async def _expand_all(self, beams: list[Trial]) -> list[list[Candidate]]:
        """What ``expand`` proposes for every beam, all at once ([] for one that failed)."""
        proposals: list[list[Candidate]] = [[] for _ in beams]

        async def expand_one(i: int, beam: Trial) -> None:
            try:
                async with self.arena.open_scratch(beam) as scratch:
                    proposals[i] = await propose(self.spec.expand, scratch, beam.depth)
            except Exception as exc:
                beam.error = describe_error(exc)
                beam.info["error_in"] = "expand"
                log.info("expand_failed", strategy=self.spec.name, index=beam.index,
                         error=beam.error)
            else:
                beam.info["proposed"] = len(proposals[i])

        with self.arena.deadline_scope():
            async with anyio.create_task_group() as tg:
                for i, beam in enumerate(beams):
                    tg.start_soon(expand_one, i, beam)
        return proposals


def _open(t: Trial) -> bool:
    return t.branch is not None and t.branch.state is BranchState.OPEN
