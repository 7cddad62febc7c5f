"""TreeSearch: best-first or MCTS over nested branches; the best verified node's path commits."""

from __future__ import annotations

import math
import numbers
from collections import defaultdict
from collections.abc import Callable
from typing import Any, Literal, TypeAlias

import attrs

from branchagent.strategy import (
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
    to_candidates_or_empty,
)

from ._options import at_least, callable_as
from ._search import Expand, judge_with, propose, state_key, viable

__all__ = ["Policy", "TreeSearch"]

log = get_logger("branchagent.strategy")

Policy: TypeAlias = Literal["best-first", "mcts"]
_POLICIES = ("best-first", "mcts")


def _check_exploration(exploration: float) -> float:
    if (isinstance(exploration, bool) or not isinstance(exploration, numbers.Real)
            or not math.isfinite(exploration) or exploration < 0):
        raise ValueError(f"exploration must be a finite number >= 0, got {exploration!r}")
    return float(exploration)


@attrs.define(kw_only=True, eq=False)
class TreeSearch(Strategy):
    """Search a tree of nested branches; commit the best verified node's path.

    Every node is a branch: the ``root_candidates`` run in children of the
    target, and a node's children run in forks of the node's own branch, so
    each node sees its ancestors' changes. A node is *viable* when its
    candidate succeeded (and ``evaluate``, if any, did not raise) and
    *verified* when it succeeded outright: ``evaluate`` (a candidate-like
    callable, :class:`~branchagent.Command` or strategy, run in the node's
    branch after a successful candidate) decides success and gives the score;
    without it, the candidate's own verdict does.

    The search repeatedly picks a viable node and *expands* it:
    ``expand(branch, depth)`` (async or sync) returns the candidates to try
    from that node's state, and each runs in its own child branch (at most
    ``max_parallel`` at a time). ``branch`` is a throwaway fork of the node:
    ``expand`` may read it or run commands in it, and nothing it writes
    reaches the node. With ``policy="best-first"`` the picked node is the
    highest-scoring viable node not yet expanded, anywhere in the tree, so
    backtracking is free: every viable node's branch stays open, and
    forkable, until the search ends. With ``policy="mcts"`` it is chosen by
    UCT from the target down, ``Q + exploration * sqrt(ln N_parent / N)``,
    where ``Q`` is the mean reward of the node's subtree (rewards are the
    nodes' scores, normalised to [0, 1] over the scores seen; a failed
    node scores 0) and each new node's reward is backpropagated to its
    ancestors.

    The search ends when ``budget`` nodes have run, when no node is left to
    expand (nodes at ``max_depth`` are not expanded; the root candidates are
    at depth 0), when ``timeout`` (the wall time of the whole search)
    expires, or, with ``stop_on_success``, at the first verified node. Then
    the best verified node (highest score; ties to the node found first) is
    committed with its whole path: the node into its parent, the parent
    into its own, ..., the root node into the target. Every other branch is
    aborted, on every path.

    Identical states are explored once: a node whose branch holds exactly the
    same changes (paths, content, type, mode) relative to the target as an
    earlier viable node is a *duplicate*: it is recorded
    (``info["duplicate_of"]`` names the first, ``Outcome.info["dedup_hits"]``
    counts them), aborted at once, and neither expanded nor committed.

    A node's :class:`~branchagent.Result` has its ``parent`` and ``depth``;
    ``info["candidate"]`` is its index among what was proposed for it. An
    ``expand`` or ``evaluate`` that raises fails that node (its ``error``).
    """

    name = "tree_search"

    root_candidates: tuple[Candidate, ...] = attrs.field(converter=to_candidates_or_empty,
                                                         kw_only=False)
    expand: Expand = attrs.field(validator=callable_as("a callable (branch, depth) -> candidates"))
    evaluate: Candidate | None = None
    policy: Policy = attrs.field(default="best-first")
    budget: int = attrs.field(default=64, validator=at_least(1))
    max_depth: int = attrs.field(default=8, validator=at_least(0))
    exploration: float = attrs.field(default=1.4, converter=_check_exploration)
    stop_on_success: bool = attrs.field(default=False, converter=bool)

    @policy.validator
    def _check_policy(self, _attr: object, policy: object) -> None:
        if policy not in _POLICIES:
            raise ValueError(f"policy must be one of {', '.join(_POLICIES)}; got {policy!r}")

    async def run(self, target: Target) -> Outcome:
        async with self.open_arena(target) as arena:
            search = _Search(self, arena, target)
            await search.run()
            return arena.outcome(info=search.summary())


class _Search:
    """The state of one TreeSearch run: the tree (in the arena's trials) and its statistics."""

    def __init__(self, spec: TreeSearch, arena: Arena, target: Target) -> None:
        self.spec = spec
        self.arena = arena
        self.target = target
        self.after = judge_with(arena, spec.evaluate)
        self.children: dict[int | None, list[Trial]] = defaultdict(list)  # None: the target
        self.expanded: set[int] = set()
        self.seen: dict[str, int] = {}
        self.dedup_hits = 0
        self.stopped = ""
        # MCTS statistics per node (None: the target): visits, rewards counted, their sum.
        self.visits: dict[int | None, int] = defaultdict(int)
        self.rewarded: dict[int | None, int] = defaultdict(int)
        self.total: dict[int | None, float] = defaultdict(float)
        self.top: dict[int | None, int] = defaultdict(int)  # rewards of +inf: the best there is
        self.lo = math.inf
        self.hi = -math.inf

    async def run(self) -> None:
        arena = self.arena
        select: Callable[[], Trial | None] = (
            self._select_mcts if self.spec.policy == "mcts" else self._select_best_first
        )
        await self._grow(None, list(self.spec.root_candidates))
        while True:
            if arena.timed_out:
                self.stopped = "timeout"
                break
            if arena.stopped_by is not None:
                self.stopped = "success"
                break
            if len(arena.trials) >= self.spec.budget:
                self.stopped = "budget"
                break
            node = select()
            if node is None:
                self.stopped = "exhausted"
                break
            proposals = await self._expand(node)
            if proposals:
                await self._grow(node, proposals)
        winner = pick_best([t for t in arena.trials if self._committable(t)])
        if winner is not None:
            await arena.commit(winner)

    def summary(self) -> dict[str, Any]:
        if self.spec.policy == "mcts":
            for t in self.arena.trials:
                t.info["visits"] = self.visits[t.index]
        return {
            "policy": self.spec.policy, "roots": len(self.spec.root_candidates),
            "nodes": len(self.arena.trials),
            "expanded": len(self.expanded), "dedup_hits": self.dedup_hits,
            "stopped": self.stopped, "budget": self.spec.budget,
            "max_depth": self.spec.max_depth,
            "depth_reached": max((t.depth for t in self.arena.trials), default=-1),
        }

    # -- growing the tree -------------------------------------------------------------

    async def _grow(self, parent: Trial | None, proposals: list[Candidate]) -> None:
        """Run ``proposals`` in children of ``parent`` (the target for None), within budget."""
        arena = self.arena
        take = proposals[: max(0, self.spec.budget - len(arena.trials))]
        if parent is not None:
            parent.info["proposed"] = len(proposals)
        born = await arena.run(
            take, parents=[parent] * len(take), after=self.after,
            stop=(lambda t: t.success) if self.spec.stop_on_success else None,
        )
        self.children[parent.index if parent is not None else None].extend(born)
        for i, t in enumerate(born):
            t.info["candidate"] = i
            if viable(t):
                await self._dedup(t)
            if not viable(t) or "duplicate_of" in t.info:
                await arena.abort(t)  # never expanded nor committed: free it now
            self._backpropagate(t)

    async def _dedup(self, node: Trial) -> None:
        key = await state_key(node, self.arena.lineage(node), self.target)
        if key is None:
            return
        first = self.seen.setdefault(key, node.index)
        if first != node.index:
            node.info["duplicate_of"] = first
            self.dedup_hits += 1
            log.info("duplicate_state", strategy=self.spec.name, index=node.index,
                     duplicate_of=first)

    async def _expand(self, node: Trial) -> list[Candidate]:
        """What ``expand`` proposes from ``node`` ([] on error or timeout, recorded)."""
        self.expanded.add(node.index)
        proposals: list[Candidate] = []
        try:
            with self.arena.deadline_scope() as scope:
                async with self.arena.open_scratch(node) as scratch:
                    proposals = await propose(self.spec.expand, scratch, node.depth)
        except Exception as exc:
            node.error = describe_error(exc)
            node.info["error_in"] = "expand"
            log.info("expand_failed", strategy=self.spec.name, index=node.index,
                     error=node.error)
            await self.arena.abort(node)
            return []
        if scope.cancelled_caught:
            return []
        return proposals

    # -- choosing what to expand ----------------------------------------------------------

    def _expandable(self, t: Trial) -> bool:
        return (viable(t) and "duplicate_of" not in t.info and t.depth < self.spec.max_depth
                and t.index not in self.expanded and t.branch is not None
                and t.branch.state is BranchState.OPEN)

    def _committable(self, t: Trial) -> bool:
        return (t.success and "duplicate_of" not in t.info and t.branch is not None
                and t.branch.state is BranchState.OPEN)

    def _select_best_first(self) -> Trial | None:
        return pick_best([t for t in self.arena.trials if self._expandable(t)])

    def _select_mcts(self) -> Trial | None:
        # A subtree is alive while it holds a node still to expand. Children come after
        # their parents in the trials, so one backward pass settles every node.
        alive: dict[int, bool] = {}
        for t in reversed(self.arena.trials):
            alive[t.index] = self._expandable(t) or any(
                alive[c.index] for c in self.children.get(t.index, ()))
        at: Trial | None = None
        while True:
            if at is not None and self._expandable(at):
                return at
            here = at.index if at is not None else None
            kids = [c for c in self.children.get(here, ()) if alive[c.index]]
            if not kids:
                return None
            n = self.visits[here]
            at = max(kids, key=lambda c: (self._uct(c, n), -c.index))

    def _uct(self, node: Trial, parent_visits: int) -> float:
        n = max(1, self.visits[node.index])
        explore = math.sqrt(math.log(max(1, parent_visits)) / n)
        return self._value(node.index) + self.spec.exploration * explore

    def _value(self, index: int | None) -> float:
        """Mean normalised reward of the subtree under ``index``, in [0, 1]."""
        n = self.visits[index]
        if n == 0:
            return 0.0
        rewarded, top = self.rewarded[index], self.top[index]
        if self.hi > self.lo:
            spread = self.hi - self.lo
            return ((self.total[index] - rewarded * self.lo) / spread + top) / n
        return (rewarded + top) / n

    def _backpropagate(self, t: Trial) -> None:
        # A failed node, or a score of -inf, adds a visit with reward 0; +inf counts as 1.
        reward: float | None = None
        if viable(t):
            reward = t.score if t.score is not None else (1.0 if t.success else 0.0)
            if math.isfinite(reward):
                self.lo = min(self.lo, reward)
                self.hi = max(self.hi, reward)
        at: int | None = t.index
        while True:
            self.visits[at] += 1
            if reward == math.inf:
                self.top[at] += 1
            elif reward is not None and math.isfinite(reward):
                self.rewarded[at] += 1
                self.total[at] += reward
            if at is None:
                break
            at = self.arena.trials[at].parent
