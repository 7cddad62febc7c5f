"""Argument parsing: the ``branchagent`` command line into an :class:`argparse.Namespace`.

Common options are taken before or after the command; :func:`parse` fills in
their defaults, strips a leading ``--`` from the command and refuses values
out of range (argparse's own usage error, exit 2).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any, NoReturn

__all__ = ["parse", "parser"]

_DEFAULTS: dict[str, Any] = {
    "workspace": ".", "backend": None, "json": False, "verbose": 0, "quiet": False,
}


def _common_options() -> argparse.ArgumentParser:
    """Options taken before or after the command (defaults filled in after parsing)."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("common options")
    s = argparse.SUPPRESS
    g.add_argument("-w", "--workspace", metavar="DIR", default=s,
                   help="the workspace directory (default: the current directory)")
    g.add_argument("--backend", metavar="NAME", default=s,
                   help="copy, fuse or a plugin's registered name (default: the backend "
                        "recorded in the workspace's state directory, else fuse where it works, "
                        "else copy)")
    g.add_argument("--json", action="store_true", default=s,
                   help="print one JSON document on stdout (progress and logs stay on stderr)")
    g.add_argument("-q", "--quiet", action="store_true", default=s,
                   help="no progress display on stderr")
    g.add_argument("-v", "--verbose", action="count", default=s,
                   help="print library logs on stderr (-vv: debug)")
    return p


def _run_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("limits")
    g.add_argument("--timeout", type=float, metavar="S",
                   help="wall-clock bound in seconds (the whole run; `run`: the command)")
    g.add_argument("--memory", metavar="SIZE", help="memory limit per command, e.g. 512M")
    g.add_argument("--pids", type=int, metavar="N", help="process limit per command")
    g.add_argument("--cpu", type=float, metavar="CPUS", help="CPU limit per command, e.g. 1.5")
    g.add_argument("--no-isolate", action="store_true",
                   help="run commands with the branch as cwd instead of in private namespaces "
                        "that show the branch at the workspace path")
    return p


def _parallel_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-parallel", type=int, metavar="N",
                   help="at most N candidates run at once")


def _report_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--report", metavar="FILE",
                   help="also write the run's lineage report to FILE: one self-contained "
                        "HTML page (tree, timeline, diffs); see `branchagent report`")


def _cmd_argument(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    p.add_argument("cmd", nargs=argparse.REMAINDER,
                   help="-- CMD ARGS... (an argv, not a shell string)"
                        + ("" if required else "; optional"))


def _version() -> str:
    from .. import __version__

    return __version__


def parser() -> argparse.ArgumentParser:
    common, limits = _common_options(), _run_options()
    p = argparse.ArgumentParser(
        prog="branchagent", parents=[common],
        description="Fork a workspace into branches, try candidates, commit the winner.",
        epilog="Exit status: 0 committed or done, 1 nothing committed, 2 usage or environment "
               "error, 130 interrupted (143 on SIGTERM, 129 on SIGHUP).",
    )
    p.add_argument("--version", action="version", version=f"branchagent {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_text: str, *, run: bool = False) -> argparse.ArgumentParser:
        parents = [common, limits] if run else [common]
        return sub.add_parser(name, parents=parents, help=help_text, description=help_text)

    sp = add("run", "run CMD in a new branch; commit it when CMD exits 0", run=True)
    _cmd_argument(sp)

    sp = add("speculate", "run every -c command at once; the first to succeed commits and "
                          "every other is killed", run=True)
    _report_option(sp)
    sp.add_argument("-c", dest="commands", action="append", metavar="CMD", required=True,
                    help="a candidate shell command (repeat)")
    _parallel_option(sp)

    sp = add("best-of-n", "run CMD N times (each gets $BRANCHAGENT_ATTEMPT); the highest-"
                          "scoring success commits", run=True)
    _report_option(sp)
    sp.add_argument("-n", type=int, required=True, metavar="N", help="number of attempts")
    sp.add_argument("--evaluate", metavar="CMD",
                    help="shell command run in each successful attempt's branch; its exit "
                         "status and score replace the attempt's")
    _parallel_option(sp)
    _cmd_argument(sp)

    sp = add("reflexion", "run CMD; while it fails, retry with feedback in "
                          "$BRANCHAGENT_FEEDBACK; commit the first success", run=True)
    _report_option(sp)
    sp.add_argument("--retries", type=int, required=True, metavar="N",
                    help="retries after the first attempt (N+1 attempts at most)")
    sp.add_argument("--critique", metavar="CMD",
                    help="shell command run in a failed attempt's branch; what it prints is "
                         "the feedback (default: the failed attempt's own output)")
    _cmd_argument(sp)

    for name, what in (("tree", "tree search"), ("beam", "beam search")):
        sp = add(name, f"{what}: --expand prints one child shell command per line in a "
                       "node's branch; candidates are run, scored and expanded", run=True)
        _report_option(sp)
        sp.add_argument("--expand", metavar="CMD", required=True,
                        help="shell command run in a node's branch; each stdout line "
                             "(blank and # lines skipped) is a child command")
        sp.add_argument("-c", dest="commands", action="append", metavar="CMD", default=[],
                        help="a root candidate shell command (repeat); or give one after --")
        sp.add_argument("--evaluate", metavar="CMD",
                        help="shell command that scores a node in its branch")
        sp.add_argument("--max-depth", type=int, metavar="D",
                        help="deepest level to expand (the roots are depth 0)")
        if name == "tree":
            sp.add_argument("--budget", type=int, metavar="N", help="most nodes to run")
            sp.add_argument("--policy", metavar="NAME",
                            help="node selection: best-first (default) or mcts")
            sp.add_argument("--exploration", type=float, metavar="C",
                            help="MCTS exploration constant")
            sp.add_argument("--stop-on-success", action="store_const", const=True,
                            help="stop at the first verified node")
        else:
            sp.add_argument("--beam-width", type=int, metavar="K", help="branches kept per level")
        _parallel_option(sp)
        _cmd_argument(sp, required=False)

    sp = add("serve", "an OpenAI-compatible server in front of an upstream one (vLLM): "
                      "best_of candidates, each verified in its own branch (see "
                      "branchagent.serve)")
    from ..serve._main import add_arguments as _serve_arguments
    _serve_arguments(sp)

    sp = add("report", "turn a strategy run's JSON trace (--json, Outcome.to_json()) into one "
                       "self-contained HTML page: the tree of branches, a timeline, diffs")
    sp.add_argument("trace", metavar="TRACE.json", help="the trace (a strategy's --json)")
    sp.add_argument("-o", "--output", metavar="FILE",
                    help="the HTML file to write (default: TRACE with .html)")

    add("status", "list the workspace's branches (those a crashed run left too)")
    add("doctor", "what this host offers (FUSE, namespaces, cgroups, reflinks on -w's "
                  "filesystem, ...), what a run will enforce and how, and the fix for each "
                  "missing piece; exits 0 whatever is missing")
    for name, verb in (("diff", "show the unified diff of"), ("commit", "commit"),
                       ("abort", "abort")):
        sp = add(name, f"{verb} a branch left in the workspace")
        if name == "abort":
            sp.add_argument("branch", nargs="?")
            sp.add_argument("--all", action="store_true", help="abort every branch")
        else:
            sp.add_argument("branch")
    return p


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = parser()
    args = p.parse_args(argv)
    for key, value in _DEFAULTS.items():
        if not hasattr(args, key):
            setattr(args, key, value)
    cmd = list(getattr(args, "cmd", None) or [])
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    args.cmd = cmd

    def fail(msg: str) -> NoReturn:
        p.error(f"{args.command}: {msg}")

    if args.command in ("run", "best-of-n", "reflexion") and not cmd:
        fail("give the command after --, e.g. `branchagent run -- pytest -q`")
    if args.command in ("tree", "beam") and not (cmd or args.commands):
        fail("give at least one root command with -c CMD (or after --)")
    for opt in ("n", "retries", "max_parallel", "pids", "budget", "max_depth", "beam_width"):
        value = getattr(args, opt, None)
        least = 0 if opt in ("retries", "max_depth") else 1
        if value is not None and value < least:
            fail(f"--{opt.replace('_', '-')} must be at least {least}, got {value}")
    for opt in ("timeout", "cpu"):
        value = getattr(args, opt, None)
        if value is not None and not value > 0:
            fail(f"--{opt} must be a positive number, got {value}")
    if args.backend is not None:
        from .._backends import available_backends

        known = available_backends()
        if args.backend not in known:
            p.error(f"--backend {args.backend}: no such backend; the registered ones are "
                    f"{', '.join(known)}; --backend copy works anywhere (a plugin registers "
                    "more under the 'branchagent.backends' entry-point group)")
    if args.command == "abort" and bool(args.branch) == bool(args.all):
        fail("name one BRANCH, or give --all")
    if getattr(args, "report", None):
        from ._report import check_report_path

        problem = check_report_path(args.report)
        if problem is not None:
            fail(problem)
    return args
