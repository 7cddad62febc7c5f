"""Building candidates and strategies from the command line's arguments.

Commands given with ``-c`` (and the lines an ``--expand`` command prints) are
shell strings run with ``sh -c``; a command after ``--`` is an argv. Every
command the CLI runs gets the same options (:func:`run_options`): the limits
and ``isolate`` the arguments ask for.
"""

from __future__ import annotations

import argparse
import inspect
import shlex
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs

import branchagent as ba

from ..exceptions import StrategyError, StrategyNotFound, UsageError
from ..strategy import ATTEMPT_ENV
from ._progress import Progress

__all__ = ["DEPTH_ENV", "STRATEGY_OF", "build_strategy", "label", "run_options"]

#: The environment variable giving ``--expand`` and the commands it generates their depth.
#: (``best-of-n``'s ``$BRANCHAGENT_ATTEMPT`` is the strategy kit's :data:`ATTEMPT_ENV`;
#: ``reflexion``'s ``$BRANCHAGENT_FEEDBACK`` is set by the strategy itself.)
DEPTH_ENV = "BRANCHAGENT_DEPTH"

#: CLI command -> entry-point name of the strategy it drives.
STRATEGY_OF = {
    "speculate": "speculate",
    "best-of-n": "best_of_n",
    "reflexion": "reflexion",
    "tree": "tree_search",
    "beam": "beam",
}


def limits(args: argparse.Namespace) -> ba.Limits | None:
    """``--memory``, ``--pids``, ``--cpu`` as :class:`~branchagent.Limits` (None: none given)."""
    if args.memory is None and args.pids is None and args.cpu is None:
        return None
    try:
        return ba.Limits(memory=args.memory, pids=args.pids, cpu=args.cpu)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{exc}") from exc


def run_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of every command the CLI runs: ``limits`` and ``isolate``."""
    return {"limits": limits(args), "isolate": not args.no_isolate}


def _command(argv: Sequence[str], args: argparse.Namespace,
             env: Mapping[str, str] | None = None) -> ba.Command:
    return ba.Command(argv, env=env, **run_options(args))


def _shell(cmd: str, args: argparse.Namespace, env: Mapping[str, str] | None = None
           ) -> ba.Command:
    return _command(["sh", "-c", cmd], args, env)


def label(argv: Sequence[str]) -> str:
    """How the display names an argv."""
    return shlex.join(argv)


@attrs.frozen
class _Tracked:
    """A :class:`~branchagent.Command` candidate that reports to the progress display."""

    command: ba.Command
    label: str
    progress: Progress = attrs.field(repr=False)

    async def __call__(self, branch: ba.Branch) -> ba.Verdict:
        self.progress.started(branch.name, self.label)
        verdict = await ba.run_candidate(self.command, branch)
        self.progress.ran(branch.name, verdict.info.get("returncode"), verdict.info.get("killed"))
        return verdict


def _expander(args: argparse.Namespace, progress: Progress
              ) -> Callable[[ba.Branch, int], Any]:
    """``expand(branch, depth)``: run ``--expand`` in the node's branch, one child per line."""
    options = run_options(args)

    async def expand(branch: ba.Branch, depth: int) -> list[ba.Candidate]:
        progress.expanding(branch.name, f"--expand (depth {depth})")
        try:
            r = await branch.run(["sh", "-c", args.expand], env={DEPTH_ENV: str(depth)},
                                 **options)
        finally:
            progress.forget(branch.name)
        if not r.ok:
            why = f"was killed ({r.killed})" if r.killed else f"exited {r.returncode}"
            tail = r.stderr.strip()[-500:]
            raise StrategyError(f"--expand {why} in branch {branch.name!r}"
                                + (f": {tail}" if tail else ""))
        children: list[ba.Candidate] = []
        for line in r.stdout.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                cmd = _shell(line, args, {DEPTH_ENV: str(depth + 1)})
                children.append(_Tracked(cmd, line, progress))
        return children

    return expand


def _load_strategy(command: str) -> type[ba.Strategy]:
    name = STRATEGY_OF[command]
    try:
        return ba.get_strategy(name)
    except StrategyNotFound as exc:
        raise UsageError(
            f"`branchagent {command}` needs the {name!r} strategy, which is not installed "
            f"here ({exc}). Install a branchagent that ships it (e.g. `pip install -e .` in "
            "a checkout) or a plugin registering it in the `branchagent.strategies` group."
        ) from exc
    except StrategyError as exc:
        raise UsageError(f"`branchagent {command}`: {exc}") from exc


def _construct(cls: type[ba.Strategy], command: str, positional: Sequence[Any],
               options: Mapping[str, Any]) -> ba.Strategy:
    """``cls(*positional, **options)``; options the class does not take are a usage error."""
    params = inspect.signature(cls).parameters
    open_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    given = {k: v for k, v in options.items() if v is not None}
    for key in given:
        if key not in params and not open_kw:
            flag = "--" + key.replace("_", "-")
            raise UsageError(f"`branchagent {command}` does not take {flag}: {cls.__name__} "
                             f"has no {key!r} parameter")
    try:
        return cls(*positional, **given)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"`branchagent {command}`: {exc}") from exc


def build_strategy(args: argparse.Namespace, progress: Progress) -> ba.Strategy:
    """The strategy ``args.command`` drives, its candidates reporting to ``progress``."""
    cls = _load_strategy(args.command)
    command = args.command
    common = {"timeout": args.timeout, "max_parallel": getattr(args, "max_parallel", None)}
    if command == "speculate":
        cands = [_Tracked(_shell(c, args), c, progress) for c in args.commands]
        return _construct(cls, command, [cands], common)
    if command == "best-of-n":
        text = label(args.cmd)
        cands = [_Tracked(_command(args.cmd, args, {ATTEMPT_ENV: str(i)}), f"#{i} {text}",
                          progress)
                 for i in range(args.n)]
        evaluate = _shell(args.evaluate, args) if args.evaluate else None
        return _construct(cls, command, [cands], {**common, "evaluate": evaluate})
    if command == "reflexion":
        # A Command task: Reflexion itself puts the feedback in $BRANCHAGENT_FEEDBACK.
        progress.default_label = label(args.cmd)
        critique = _shell(args.critique, args) if args.critique else None
        return _construct(cls, command, [_command(args.cmd, args)], {
            "timeout": args.timeout, "max_attempts": args.retries + 1, "critique": critique,
        })
    # tree, beam
    root_env = {DEPTH_ENV: "0"}
    roots: list[ba.Candidate] = [_Tracked(_shell(c, args, root_env), c, progress)
                                 for c in args.commands]
    if args.cmd:
        roots.append(_Tracked(_command(args.cmd, args, root_env), label(args.cmd), progress))
    options: dict[str, Any] = {
        **common, "expand": _expander(args, progress), "max_depth": args.max_depth,
        "evaluate": _shell(args.evaluate, args) if args.evaluate else None,
    }
    if command == "tree":
        options.update(budget=args.budget, policy=args.policy, exploration=args.exploration,
                       stop_on_success=args.stop_on_success)
    else:
        options.update(beam_width=args.beam_width)
    return _construct(cls, command, [roots], options)
