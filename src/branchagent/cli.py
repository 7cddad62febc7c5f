"""The ``branchagent`` command: strategies over shell commands, and branch housekeeping.

::

    branchagent run        -- CMD...          run CMD in a branch; commit it on exit 0
    branchagent speculate  -c CMD -c CMD ...  first success commits, the others are killed
    branchagent best-of-n  -n N -- CMD...     N attempts; the best-scoring success commits
    branchagent reflexion  --retries N [--critique CMD] -- CMD...
    branchagent tree       --expand CMD -c ROOT ...   tree search over generated commands
    branchagent beam       --expand CMD -c ROOT ...   beam search over generated commands
    branchagent serve --upstream URL --verify CMD   verified best_of (OpenAI-compatible)
    branchagent status                        the workspace's branches (crash-left too)
    branchagent doctor                        what this host offers and what a run enforces
    branchagent diff BRANCH | commit BRANCH | abort BRANCH | abort --all

Common options (before or after the command): ``-w/--workspace DIR`` (default:
the current directory), ``--backend NAME`` (default: the backend recorded in
the workspace's state directory, else the library default: ``fuse`` where it
can work, else ``copy``),
``--json`` (one JSON document on stdout; for strategies ``Outcome.to_json()``),
``-q/--quiet``, ``-v/--verbose``. Commands run in a branch take ``--timeout``,
``--max-parallel``, ``--memory``, ``--pids``, ``--cpu`` and ``--no-isolate``.

Commands given with ``-c`` (and the lines an ``--expand`` command prints) are
shell strings run with ``sh -c``; a command after ``--`` is an argv. A
command reports a score by writing a number to the file named by
``$BRANCHAGENT_SCORE_FILE`` or to file descriptor 3 (higher is better).
``best-of-n`` attempts get ``$BRANCHAGENT_ATTEMPT`` (0 to N-1); ``reflexion``
attempts after the first get ``$BRANCHAGENT_FEEDBACK``; ``--expand`` and the
commands it generates get ``$BRANCHAGENT_DEPTH``.

Progress goes to stderr: a live table redrawn in place when stderr is a
terminal, plain lines otherwise. Ctrl-C (or SIGTERM, or SIGHUP when the
terminal closes) aborts every branch of the run, kills every process it
started, says what was running and exits 130 (143, 129).
Branches another, crashed run left behind are kept (``status`` lists them);
note that a commit into the base invalidates them, as any sibling commit does.

Exit status: 0 committed (or done), 1 nothing committed, 2 usage or
environment error (the message says what to do), 130 interrupted (Ctrl-C;
143 for SIGTERM, 129 for SIGHUP). ``doctor`` exits 0 whatever the host lacks
(it informs; scripts read ``fuse_ok``, ``isolation_ok`` or a check's ``ok``
from ``--json``), 2 only for a bad ``-w``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO

import anyio
import attrs
import structlog

import branchagent as ba

from . import _workspace
from .exceptions import (
    BackendError,
    BranchAgentError,
    BranchError,
    ConflictError,
    IsolationUnavailable,
    StrategyError,
    StrategyNotFound,
    WorkspaceLocked,
)

__all__ = ["main"]

EXIT_OK, EXIT_NOTHING, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
#: Signals that abort the run cleanly; the exit status is 128 + the signal's number.
#: SIGHUP: the terminal closed; the run must not die half-way and leave processes behind.
INTERRUPTS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

#: Environment variables the CLI gives to the commands it runs.
ATTEMPT_ENV = "BRANCHAGENT_ATTEMPT"
FEEDBACK_ENV = "BRANCHAGENT_FEEDBACK"
DEPTH_ENV = "BRANCHAGENT_DEPTH"

#: CLI command -> entry-point name of the strategy it drives.
STRATEGY_OF = {
    "speculate": "speculate",
    "best-of-n": "best_of_n",
    "reflexion": "reflexion",
    "tree": "tree_search",
    "beam": "beam",
}

_TICK_S = 0.1


class UsageError(Exception):
    """A usage or environment problem: exit 2 with a message that says what to do."""


# -- progress -----------------------------------------------------------------------------

_RUNNING = ("forked", "running", "expanding")
_COLORS = {
    "running": "33", "expanding": "36", "forked": "33", "ok": "32", "committed": "1;32",
    "failed": "31", "error": "31", "timeout": "35", "cancelled": "2", "aborted": "2",
    "invalidated": "2",
}


@attrs.define
class _Row:
    name: str
    depth: int
    started: float
    state: str = "forked"
    ended: float | None = None
    score: float | None = None
    label: str = ""
    note: str = ""

    def elapsed(self, now: float) -> float:
        return (self.ended if self.ended is not None else now) - self.started


def _state_of(success: bool, error: str | None) -> str:
    if success:
        return "ok"
    if error is None:
        return "failed"
    if error.startswith("Cancelled"):
        return "cancelled"
    if error.startswith("TimeoutError"):
        return "timeout"
    return "error"


def _fmt_score(score: float | None) -> str:
    return "-" if score is None else f"{score:.4g}"


class Progress:
    """What every branch of the run is doing, shown on stderr.

    Fed by the library's structlog events (``branch_forked``,
    ``candidate_finished``, ``winner_committed``, ``branch_aborted``, ...)
    through :func:`_configure_logging`, and by the CLI's own candidates
    (``started``, ``ran``). With ``live`` it redraws a table in place with
    ANSI escapes (stderr is a terminal); otherwise it prints one plain line
    per start, finish and commit. Thread-safe: structlog may be called from
    worker threads.
    """

    def __init__(self, stream: TextIO, *, live: bool, enabled: bool = True,
                 title: str = "", color: bool = False) -> None:
        self.stream = stream
        self.live = live and enabled
        self.enabled = enabled
        self.title = title
        self.color = color
        self.rows: dict[str, _Row] = {}
        self.winner: str | None = None
        #: Label of a top-level branch no candidate of ours names (a strategy's own task);
        #: such branches are announced when forked.
        self.default_label = ""
        self.t0 = time.monotonic()
        self._lock = threading.RLock()
        self._drawn = 0
        self._closed = False

    # -- inputs --------------------------------------------------------------------

    def feed(self, event: Mapping[str, Any]) -> None:
        """Take one library log event (a structlog event dict)."""
        name = event.get("event")
        branch = event.get("branch")
        if not isinstance(branch, str):
            return
        now = time.monotonic()
        with self._lock:
            row = self.rows.get(branch)
            if name == "branch_forked":
                depth = event.get("depth")
                row = self.rows[branch] = _Row(branch, depth if isinstance(depth, int) else 0, now)
                if self.default_label and row.depth == 0:
                    row.label = self.default_label
                    row.state = "running"
                    self._plain(row, "start    ")
            elif row is None:
                return
            elif name == "candidate_finished":
                if row.state in _RUNNING:
                    error = event.get("error")
                    row.state = _state_of(bool(event.get("success")),
                                          error if isinstance(error, str) else None)
                    if row.state == "error" and isinstance(error, str) and not row.note:
                        row.note = error.splitlines()[0][:80] if error else ""
                    row.ended = now
                score = event.get("score")
                if isinstance(score, int | float):
                    row.score = float(score)
                self._plain(row, f"{row.state:<9}")
            elif name in ("winner_committed", "branch_committed"):
                first = row.state != "committed"
                row.state = "committed"
                row.ended = row.ended or now
                # The run's winner: the node a strategy names, else what reached the base.
                if name == "winner_committed" or row.depth == 0:
                    self.winner = branch
                if first:
                    self._plain(row, "committed")
            elif name in ("branch_aborted", "branch_invalidated") and row.state in _RUNNING:
                row.state = "aborted" if name == "branch_aborted" else "invalidated"
                row.ended = now
                self._plain(row, f"{row.state:<9}")
            else:
                return
            self.redraw()

    def started(self, branch: str, label: str) -> None:
        """A candidate of ours started running ``label`` in ``branch``."""
        with self._lock:
            row = self.rows.get(branch)
            if row is None:
                row = self.rows[branch] = _Row(branch, 0, time.monotonic())
            row.state = "running"
            row.label = label
            self._plain(row, "start    ")
            self.redraw()

    def expanding(self, branch: str, label: str) -> None:
        """``branch`` is a scratch fork where ``--expand`` runs (shown until :meth:`forget`)."""
        with self._lock:
            row = self.rows.get(branch)
            if row is not None:
                row.state = "expanding"
                row.label = label
            self.redraw()

    def forget(self, branch: str) -> None:
        """Drop ``branch``'s row (a scratch branch that is no candidate)."""
        with self._lock:
            self.rows.pop(branch, None)
            self.redraw()

    def ran(self, branch: str, returncode: object, killed: object) -> None:
        """A command of ours ended in ``branch`` (the verdict follows as an event)."""
        with self._lock:
            row = self.rows.get(branch)
            if row is not None and (killed or returncode != 0):
                row.note = f"killed: {killed}" if killed else f"exit {returncode}"

    def running(self) -> list[_Row]:
        with self._lock:
            return [r for r in self.rows.values() if r.state in _RUNNING]

    # -- output --------------------------------------------------------------------

    def _paint(self, state: str) -> str:
        text = f"{state:<11}"
        if not self.color:
            return text
        return f"\x1b[{_COLORS.get(state, '0')}m{text}\x1b[0m"

    def _row_text(self, row: _Row, now: float) -> str:
        score = f"score {_fmt_score(row.score)}" if row.score is not None else ""
        parts = [f"{'  ' * (row.depth + 1)}{row.name}", self._paint(row.state),
                 f"{row.elapsed(now):7.2f}s", f"{score:<12}", f"{row.note:<12}", row.label]
        return "  ".join(parts).rstrip()

    def _plain(self, row: _Row, what: str) -> None:
        if self.live or not self.enabled:
            return
        now = time.monotonic()
        bits = [f"[{now - self.t0:7.2f}s]", what, row.name]
        if what.strip() != "start":
            bits.append(f"{row.elapsed(now):.2f}s")
            if row.score is not None:
                bits.append(f"score {_fmt_score(row.score)}")
            if row.note:
                bits.append(row.note)
        if row.label:
            bits.append(f"| {row.label}")
        self._write(" ".join(bits) + "\n")

    def _lines(self) -> list[str]:
        now = time.monotonic()
        try:
            cols, lines = os.get_terminal_size(self.stream.fileno())
        except (OSError, ValueError, AttributeError):
            cols, lines = 80, 24
        cols = cols or 80
        lines = lines or 24
        counts: dict[str, int] = {}
        for r in self.rows.values():
            counts[r.state] = counts.get(r.state, 0) + 1
        summary = ", ".join(f"{n} {s}" for s, n in counts.items())
        head = f"branchagent {self.title}  {now - self.t0:.1f}s  {summary}".rstrip()
        body = [self._row_text(r, now) for r in self.rows.values()]
        room = max(3, lines - 3)
        if len(body) > room:
            body = [f"  ... {len(body) - room + 1} more branches", *body[-(room - 1):]]
        out = [head, *body]
        if self.winner is not None:
            w = self.rows[self.winner]
            out.append(f"winner: {w.name}  score {_fmt_score(w.score)}  {w.label}".rstrip())
        # Never wrap: a wrapped line would throw the cursor arithmetic off.
        return [_clip(line, cols - 1) for line in out]

    def redraw(self) -> None:
        """Draw the table again in place (live mode only)."""
        if not self.live:
            return
        with self._lock:
            if self._closed:
                return
            lines = self._lines()
            self._write(self._erase() + "".join(line + "\n" for line in lines))
            self._drawn = len(lines)

    def _erase(self) -> str:
        return f"\x1b[{self._drawn}A\r\x1b[J" if self._drawn else "\r\x1b[J"

    def message(self, text: str) -> None:
        """Print ``text`` (a log line, a notice) above the live table."""
        with self._lock:
            if self.live and not self._closed:
                self._write(self._erase() + text.rstrip("\n") + "\n")
                self._drawn = 0
                self.redraw()
            else:
                self._write(text.rstrip("\n") + "\n")

    def close(self) -> None:
        """Final redraw; later calls print nothing more in place."""
        with self._lock:
            self.redraw()
            self._closed = True

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # stderr gone (closed pipe): progress is best effort
            pass

    async def tick(self) -> None:
        """Keep the elapsed times moving (live mode); runs until cancelled."""
        while True:
            self.redraw()
            await anyio.sleep(_TICK_S)


def _clip(line: str, width: int) -> str:
    """``line`` cut to ``width`` visible characters (ANSI colour codes do not count)."""
    out: list[str] = []
    seen = 0
    i = 0
    while i < len(line):
        if line.startswith("\x1b[", i):
            end = line.find("m", i)
            if end != -1:
                out.append(line[i:end + 1])
                i = end + 1
                continue
        if seen >= width:
            break
        out.append(line[i])
        seen += 1
        i += 1
    text = "".join(out)
    return text + "\x1b[0m" if "\x1b[" in text else text


# -- logging --------------------------------------------------------------------------------


class _SinkLogger:
    """A structlog logger that prints rendered lines through the progress display."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress

    def msg(self, message: str) -> None:
        self._progress.message(message)

    debug = info = warning = warn = error = critical = exception = fatal = log = msg


_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "warn": logging.WARNING, "error": logging.ERROR, "critical": logging.CRITICAL,
           "exception": logging.ERROR, "fatal": logging.CRITICAL}


def _configure_logging(progress: Progress, *, json_mode: bool, verbose: int) -> None:
    """Library events feed ``progress``; those at the shown level are printed on stderr too."""
    shown = {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)

    def tap(_logger: object, method: str, event: structlog.typing.EventDict
            ) -> structlog.typing.EventDict:
        progress.feed(event)
        if _LEVELS.get(method, logging.INFO) < shown:
            raise structlog.DropEvent
        return event

    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer(default=str) if json_mode
        else structlog.dev.ConsoleRenderer(colors=progress.color)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            tap,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(min(shown, logging.INFO)),
        logger_factory=lambda *_: _SinkLogger(progress),
        cache_logger_on_first_use=False,
    )


# -- argument parsing -------------------------------------------------------------------------

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
                   help="copy, fuse, overlay or a plugin (default: the backend recorded in the "
                        "workspace's state directory, else fuse)")
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


def _cmd_argument(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    p.add_argument("cmd", nargs=argparse.REMAINDER,
                   help="-- CMD ARGS... (an argv, not a shell string)"
                        + ("" if required else "; optional"))


def _parser() -> argparse.ArgumentParser:
    common, limits = _common_options(), _run_options()
    p = argparse.ArgumentParser(
        prog="branchagent", parents=[common],
        description="Fork a workspace into branches, try candidates, commit the winner.",
        epilog="Exit status: 0 committed or done, 1 nothing committed, 2 usage or environment "
               "error, 130 interrupted (143 on SIGTERM, 129 on SIGHUP).",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_text: str, *, run: bool = False) -> argparse.ArgumentParser:
        parents = [common, limits] if run else [common]
        return sub.add_parser(name, parents=parents, help=help_text, description=help_text)

    sp = add("run", "run CMD in a new branch; commit it when CMD exits 0", run=True)
    _cmd_argument(sp)

    sp = add("speculate", "run every -c command at once; the first to succeed commits and "
                          "every other is killed", run=True)
    sp.add_argument("-c", dest="commands", action="append", metavar="CMD", required=True,
                    help="a candidate shell command (repeat)")
    _parallel_option(sp)

    sp = add("best-of-n", "run CMD N times (each gets $BRANCHAGENT_ATTEMPT); the highest-"
                          "scoring success commits", run=True)
    sp.add_argument("-n", type=int, required=True, metavar="N", help="number of attempts")
    sp.add_argument("--evaluate", metavar="CMD",
                    help="shell command run in each successful attempt's branch; its exit "
                         "status and score replace the attempt's")
    _parallel_option(sp)
    _cmd_argument(sp)

    sp = add("reflexion", "run CMD; while it fails, retry with feedback in "
                          "$BRANCHAGENT_FEEDBACK; commit the first success", run=True)
    sp.add_argument("--retries", type=int, required=True, metavar="N",
                    help="retries after the first attempt (N+1 attempts at most)")
    sp.add_argument("--critique", metavar="CMD",
                    help="shell command run in a failed attempt's branch; what it prints is "
                         "the feedback (default: the failed attempt's own output)")
    _cmd_argument(sp)

    for name, what in (("tree", "tree search"), ("beam", "beam search")):
        sp = add(name, f"{what}: --expand prints one child shell command per line in a "
                       "node's branch; candidates are run, scored and expanded", run=True)
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
    from .serve._main import add_arguments as _serve_arguments
    _serve_arguments(sp)

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


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = _parser()
    args = parser.parse_args(argv)
    for key, value in _DEFAULTS.items():
        if not hasattr(args, key):
            setattr(args, key, value)
    cmd = list(getattr(args, "cmd", None) or [])
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    args.cmd = cmd

    def fail(msg: str) -> NoReturn:
        parser.error(f"{args.command}: {msg}")

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
    if args.command == "abort" and bool(args.branch) == bool(args.all):
        fail("name one BRANCH, or give --all")
    return args


# -- building candidates and strategies --------------------------------------------------------


def _limits(args: argparse.Namespace) -> ba.Limits | None:
    if args.memory is None and args.pids is None and args.cpu is None:
        return None
    try:
        return ba.Limits(memory=args.memory, pids=args.pids, cpu=args.cpu)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{exc}") from exc


def _shell(cmd: str, args: argparse.Namespace, env: Mapping[str, str] | None = None
           ) -> ba.Command:
    return ba.Command(["sh", "-c", cmd], limits=_limits(args), isolate=not args.no_isolate,
                      env=env)


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


def _label_argv(argv: Sequence[str]) -> str:
    return shlex.join(argv)


def _expander(args: argparse.Namespace, progress: Progress
              ) -> Callable[[ba.Branch, int], Any]:
    """``expand(branch, depth)``: run ``--expand`` in the node's branch, one child per line."""
    limits = _limits(args)

    async def expand(branch: ba.Branch, depth: int) -> list[ba.Candidate]:
        progress.expanding(branch.name, f"--expand (depth {depth})")
        try:
            r = await branch.run(["sh", "-c", args.expand], limits=limits,
                                 isolate=not args.no_isolate, env={DEPTH_ENV: str(depth)})
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


def _build_strategy(args: argparse.Namespace, progress: Progress) -> ba.Strategy:
    cls = _load_strategy(args.command)
    command = args.command
    common = {"timeout": args.timeout, "max_parallel": getattr(args, "max_parallel", None)}
    if command == "speculate":
        cands = [_Tracked(_shell(c, args), c, progress) for c in args.commands]
        return _construct(cls, command, [cands], common)
    if command == "best-of-n":
        label = _label_argv(args.cmd)
        cands = [
            _Tracked(ba.Command(args.cmd, limits=_limits(args), isolate=not args.no_isolate,
                                env={ATTEMPT_ENV: str(i)}), f"#{i} {label}", progress)
            for i in range(args.n)
        ]
        evaluate = _shell(args.evaluate, args) if args.evaluate else None
        return _construct(cls, command, [cands], {**common, "evaluate": evaluate})
    if command == "reflexion":
        # A Command task: Reflexion itself puts the feedback in $BRANCHAGENT_FEEDBACK.
        progress.default_label = _label_argv(args.cmd)
        task = ba.Command(args.cmd, limits=_limits(args), isolate=not args.no_isolate)
        critique = _shell(args.critique, args) if args.critique else None
        return _construct(cls, command, [task], {
            "timeout": args.timeout, "max_attempts": args.retries + 1, "critique": critique,
        })
    # tree, beam
    root_env = {DEPTH_ENV: "0"}
    roots: list[ba.Candidate] = [_Tracked(_shell(c, args, root_env), c, progress)
                                 for c in args.commands]
    if args.cmd:
        root = ba.Command(args.cmd, limits=_limits(args), isolate=not args.no_isolate,
                          env=root_env)
        roots.append(_Tracked(root, _label_argv(args.cmd), progress))
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


# -- running ------------------------------------------------------------------------------------


def _recorded_backend(workspace: Path) -> str | None:
    meta = _workspace.default_state_dir(workspace) / "branches.json"
    try:
        value = json.loads(meta.read_text()).get("backend")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def _workspace_path(args: argparse.Namespace) -> Path:
    path = Path(os.path.realpath(args.workspace))
    if not path.is_dir():
        raise UsageError(f"workspace {path} is not a directory; give one with -w DIR")
    return path


@attrs.define
class _Run:
    """The state one invocation shares between its work and its signal watcher."""

    args: argparse.Namespace
    progress: Progress
    signum: int | None = None


async def _housekeeping(run: _Run, ws: ba.Workspace) -> tuple[int, Any]:
    args = run.args
    if args.command == "status":
        return EXIT_OK, await _status_doc(ws)
    if args.command == "abort" and args.all:
        names = [b.name for b in ws.branches()]
        for b in reversed(ws.branches()):
            await b.abort()
        return EXIT_OK, {"aborted": names}
    b = ws.get(args.branch)
    if args.command == "diff":
        return EXIT_OK, {"branch": b.name, "diff": await b.diff()}
    if args.command == "abort":
        gone = [x.name for x in _descendants(b)]
        await b.abort()
        return EXIT_OK, {"aborted": [b.name, *gone]}
    parent = b.parent.name if b.parent is not None else None
    changes = [c.path for c in await b.changes()]
    try:
        await b.commit()
    except ConflictError as exc:
        return EXIT_NOTHING, {"committed": None, "branch": b.name, "into": parent,
                              "error": f"ConflictError: {exc}"}
    return EXIT_OK, {"committed": b.name, "into": parent, "changes": changes}


def _descendants(b: ba.WorkspaceBranch) -> list[ba.WorkspaceBranch]:
    out: list[ba.WorkspaceBranch] = []
    for child in b.children:
        out += [child, *_descendants(child)]
    return out


async def _status_doc(ws: ba.Workspace) -> dict[str, Any]:
    rows = []
    for b in ws.branches():
        try:
            changes: int | None = len(await b.changes())
        except (BranchAgentError, OSError):
            changes = None
        rows.append({"name": b.name, "parent": b.parent.name if b.parent else None,
                     "depth": b.depth, "path": str(b.path), "created": b.created,
                     "changes": changes})
    return {"workspace": str(ws.path), "backend": ws.backend.name, "state_dir": str(ws.state_dir),
            "in_use": False, "branches": rows}


def _status_unlocked(path: Path) -> dict[str, Any]:
    """``status`` of a workspace another process holds: read its metadata, touch nothing."""
    sdir = _workspace.default_state_dir(path)
    try:
        raw = json.loads((sdir / "branches.json").read_text())
        entries: dict[str, dict[str, Any]] = raw.get("branches", {})
    except (OSError, ValueError, AttributeError):
        raw, entries = {}, {}
    if raw.get("branches_kept_by_backend"):  # the backend's own records are the current ones
        try:
            reader = getattr(ba.load_backend(str(raw.get("backend"))), "read_saved_branches", None)
        except BranchAgentError:
            reader = None
        if callable(reader):
            entries = reader(sdir)
    depth: dict[str, int] = {}

    def depth_of(name: str, seen: int = 0) -> int:
        parent = entries.get(name, {}).get("parent")
        if not isinstance(parent, str) or parent not in entries or seen > len(entries):
            return 0
        return depth_of(parent, seen + 1) + 1

    for name in entries:
        depth[name] = depth_of(name)
    rows = [{"name": n, "parent": m.get("parent"), "depth": depth[n], "path": None,
             "created": m.get("created"), "changes": None}
            for n, m in sorted(entries.items(), key=lambda kv: (depth[kv[0]], kv[0]))]
    return {"workspace": str(path), "backend": raw.get("backend"), "state_dir": str(sdir),
            "in_use": True, "branches": rows}


async def _strategy_run(run: _Run, ws: ba.Workspace, strategy: ba.Strategy) -> tuple[int, Any]:
    outcome = await strategy.run(ws)
    errors = [r.error or "" for r in outcome.results]
    if errors and all(e.startswith(IsolationUnavailable.__name__) for e in errors):
        raise IsolationUnavailable(errors[0].partition(": ")[2])
    return (EXIT_OK if outcome.committed else EXIT_NOTHING), outcome


async def _single_run(run: _Run, ws: ba.Workspace) -> tuple[int, Any]:
    args = run.args
    limits = _limits(args) or ba.Limits()
    if args.timeout is not None:
        limits = attrs.evolve(limits, timeout=args.timeout)
    b = await ws.fork()
    run.progress.started(b.name, _label_argv(args.cmd))
    r = await b.run(args.cmd, limits=limits, isolate=not args.no_isolate)
    run.progress.ran(b.name, r.returncode, r.killed)
    doc: dict[str, Any] = {
        "branch": b.name, "returncode": r.returncode, "killed": r.killed,
        "duration": r.duration, "stdout": r.stdout, "stderr": r.stderr,
    }
    if r.ok:
        doc["changes"] = [c.path for c in await b.changes()]
        await b.commit()
        doc["committed"] = True
        return EXIT_OK, doc
    await b.abort()
    doc["committed"] = False
    return EXIT_NOTHING, doc


async def _work(run: _Run) -> tuple[int, Any]:
    args = run.args
    path = await anyio.to_thread.run_sync(_workspace_path, args)
    housekeeping = args.command in ("status", "diff", "commit", "abort")
    sdir = _workspace.default_state_dir(path)
    if housekeeping and not await anyio.to_thread.run_sync(sdir.exists):
        if args.command == "status":
            return EXIT_OK, {"workspace": str(path), "backend": None, "state_dir": str(sdir),
                             "in_use": False, "branches": []}
        raise UsageError(f"no branch named {args.branch!r}: {path} has no branchagent state "
                         f"({sdir} does not exist)")
    # Built before the workspace opens: a missing strategy or a bad option costs nothing.
    strategy = _build_strategy(args, run.progress) if args.command in STRATEGY_OF else None
    backend = args.backend or await anyio.to_thread.run_sync(_recorded_backend, path)
    opened = False
    try:
        # keep_branches: what an earlier (crashed) run left stays for `status`; what this
        # run forks is aborted below, on every path.
        async with ba.open_workspace(path, backend=backend, keep_branches=True) as ws:
            opened = True
            if housekeeping:
                return await _housekeeping(run, ws)
            return await _in_workspace(run, ws, strategy)
    except WorkspaceLocked:
        if args.command == "status" and not opened:
            return EXIT_OK, await anyio.to_thread.run_sync(_status_unlocked, path)
        raise


async def _in_workspace(run: _Run, ws: ba.Workspace, strategy: ba.Strategy | None
                        ) -> tuple[int, Any]:
    left = {b.name for b in ws.branches()}
    if left:
        tops = sorted(b.name for b in ws.branches() if b.parent is None)
        run.progress.message(
            f"note: {len(left)} branch(es) left by an earlier run ({', '.join(sorted(left))}); "
            f"a commit into the base invalidates the top-level ones ({', '.join(tops)}). "
            "`branchagent status` lists them."
        )
    try:
        if strategy is None:
            return await _single_run(run, ws)
        return await _strategy_run(run, ws, strategy)
    finally:
        with anyio.CancelScope(shield=True):
            for b in reversed(ws.branches()):
                if b.name not in left:
                    await b.abort()


async def _watch_signals(run: _Run, signals: Any, work: anyio.CancelScope) -> None:
    async for signum in signals:
        if run.signum is not None:
            run.progress.message("still cleaning up: aborting branches, killing processes ...")
            continue
        run.signum = signum
        rows = run.progress.running()
        what = "; ".join(f"{r.name} ({r.elapsed(time.monotonic()):.1f}s"
                         + (f": {r.label})" if r.label else ")") for r in rows)
        name = signal.Signals(signum).name
        run.progress.message(
            f"{name}: aborting every branch and killing its processes"
            + (f"; was running: {what}" if rows else "")
        )
        work.cancel()


async def _main(run: _Run) -> tuple[int, Any]:
    result: tuple[int, Any] | BaseException = (EXIT_INTERRUPTED, None)
    with anyio.open_signal_receiver(*INTERRUPTS) as signals:
        async with anyio.create_task_group() as tg:
            work = anyio.CancelScope()
            tg.start_soon(_watch_signals, run, signals, work)
            if run.progress.live:
                tg.start_soon(run.progress.tick)
            with work:
                try:
                    result = await _work(run)
                except Exception as exc:
                    result = exc
            tg.cancel_scope.cancel()
    run.progress.close()
    if isinstance(result, BaseException):
        raise result
    return result


# -- output ----------------------------------------------------------------------------------


def _unwrap(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _explain(exc: BaseException) -> str:
    """A message for ``exc`` that says what to do about it."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, UsageError):
        return text
    if isinstance(exc, BackendError):
        known = ", ".join(ba.available_backends()) or "none"
        return (f"{text}\n  the backends installed here: {known}; pass one with --backend, "
                "e.g. `--backend copy` (portable, works anywhere)")
    if isinstance(exc, WorkspaceLocked):
        return (f"{text}\n  another branchagent process is using this workspace; wait for it "
                "to finish (`branchagent status` lists its branches)")
    if isinstance(exc, IsolationUnavailable):
        return f"{text}\n  pass --no-isolate to run the commands unisolated (cwd = the branch)"
    if isinstance(exc, BranchError) and isinstance(exc, LookupError | ValueError):
        return f"{text}\n  `branchagent status` lists the branches of this workspace"
    if isinstance(exc, FileNotFoundError | NotADirectoryError):
        return f"{text}\n  give the workspace directory with -w DIR"
    return text


def _print_outcome(outcome: ba.Outcome, rows: Mapping[str, _Row]) -> None:
    head = f"{outcome.strategy}: "
    w = outcome.winner
    if w is not None:
        score = f", score {_fmt_score(w.score)}" if w.score is not None else ""
        head += (f"committed candidate {w.index} (branch {w.branch}{score}, "
                 f"{len(w.changes)} changed paths)")
    elif outcome.timed_out:
        head += "nothing committed: the timeout expired"
    else:
        head += "nothing committed: no candidate succeeded"
    print(f"{head} in {outcome.duration:.2f} s")
    for r in outcome.results:
        row = rows.get(r.branch or "")
        state = _state_of(r.success, r.error)
        if (w is not None and r.index == w.index) or (row is not None
                                                       and row.state == "committed"):
            state = "committed"  # the winner, or a node on its path (tree, beam)
        info = r.info
        note = ""
        if r.error and state == "error":
            note = r.error.splitlines()[0][:100]
        elif info.get("killed"):
            note = f"killed: {info['killed']}"
        elif "returncode" in info and state == "failed":
            note = f"exit {info['returncode']}"
        score = f"score {_fmt_score(r.score)}" if r.score is not None else ""
        argv = info.get("argv")
        label = row.label if row is not None else ""
        if not label and isinstance(argv, list):
            label = shlex.join(str(a) for a in argv)
        depth = r.to_dict().get("depth") or 0
        indent = "  " * depth if isinstance(depth, int) else ""
        line = (f"  {indent}#{r.index:<3} {state:<10} {r.duration:7.2f}s  {score:<12} "
                f"{note:<14} {label}")
        print(line.rstrip())


def _print_human(command: str, doc: Any, progress: Progress) -> None:
    if isinstance(doc, ba.Outcome):
        _print_outcome(doc, progress.rows)
        return
    if command == "status":
        where = f"workspace {doc['workspace']}"
        if doc["backend"]:
            where += f" (backend {doc['backend']})"
        if doc["in_use"]:
            where += " — in use by another branchagent process (read-only listing)"
        print(where)
        if not doc["branches"]:
            print("  no branches")
        for row in doc["branches"]:
            indent = "  " * (row["depth"] + 1)
            changes = "?" if row["changes"] is None else row["changes"]
            age = ""
            if isinstance(row["created"], int | float):
                when = time.localtime(row["created"])
                age = f", created {time.strftime('%Y-%m-%d %H:%M:%S', when)}"
            print(f"{indent}{row['name']}  ({changes} changes{age})  {row['path'] or ''}".rstrip())
        return
    if command == "diff":
        sys.stdout.write(doc["diff"])
        return
    if command == "commit":
        into = repr(doc["into"]) if doc["into"] else "the base"
        if doc["committed"] is None:
            print(f"nothing committed: {doc['branch']} conflicts with {into}: {doc['error']}")
        else:
            print(f"committed {doc['committed']} into {into}: {len(doc['changes'])} changed paths")
        return
    if command == "abort":
        print(f"aborted {', '.join(doc['aborted']) or 'nothing'}")
        return
    if command == "run":
        sys.stdout.write(doc["stdout"])
        sys.stderr.write(doc["stderr"])
        verdict = "committed" if doc["committed"] else "aborted"
        why = f", killed: {doc['killed']}" if doc["killed"] else ""
        print(f"branch {doc['branch']}: exit {doc['returncode']}{why}, {verdict}",
              file=sys.stderr)
        return
    print(json.dumps(doc))


def _emit_json(doc: Any) -> None:
    if isinstance(doc, ba.Outcome):
        print(doc.to_json())
    else:
        print(json.dumps(doc, default=str))


def _serve(args: argparse.Namespace) -> int:
    """``branchagent serve``: runs until SIGTERM/SIGHUP/Ctrl-C (see :mod:`branchagent.serve`)."""
    try:
        from .serve._main import serve
    except ImportError as exc:
        print(f"branchagent serve: {exc}\n  install the server's dependencies: "
              "pip install 'branchagent[serve]'", file=sys.stderr)
        return EXIT_USAGE
    try:
        path = _workspace_path(args)
        backend = args.backend or _recorded_backend(path) or "copy"
        return serve(args, path, backend)
    except (UsageError, ValueError) as exc:
        print(f"branchagent serve: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _tell(text: str) -> None:
    """``text`` on stderr, if stderr is still there (after SIGHUP the terminal is gone:
    a write fails with EIO, and that must not turn a clean exit into a traceback)."""
    try:
        print(text, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def _doctor(args: argparse.Namespace) -> int:
    """``branchagent doctor``: the report as a table (or JSON); 0 whatever is missing."""
    progress = Progress(sys.stderr, live=False, enabled=False)
    _configure_logging(progress, json_mode=args.json, verbose=args.verbose)
    try:
        path = _workspace_path(args)
    except UsageError as exc:
        print(f"branchagent doctor: {exc}", file=sys.stderr)
        return EXIT_USAGE
    report = anyio.run(ba.doctor, path)
    print(report.to_json() if args.json else report.render())
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``branchagent`` console script; returns the exit status."""
    args = _parse(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "doctor":
        return _doctor(args)
    live = sys.stderr.isatty() and not args.quiet and args.command not in (
        "status", "diff", "commit", "abort")
    color = sys.stderr.isatty() and "NO_COLOR" not in os.environ
    progress = Progress(sys.stderr, live=live, enabled=not args.quiet, title=args.command,
                        color=color)
    _configure_logging(progress, json_mode=args.json, verbose=args.verbose)
    run = _Run(args, progress)
    try:
        code, doc = anyio.run(_main, run)
    except KeyboardInterrupt:  # before the signal handler was installed, or after
        progress.close()
        _tell("interrupted")
        return EXIT_INTERRUPTED
    except Exception as raw:
        exc = _unwrap(raw)
        if run.signum is not None:
            _tell(f"interrupted; while cleaning up: {type(exc).__name__}: {exc}")
            return 128 + run.signum
        if not isinstance(exc, UsageError | BranchAgentError | OSError | ValueError):
            raise
        if args.json:
            print(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
        print(f"branchagent {args.command}: {_explain(exc)}", file=sys.stderr)
        return EXIT_USAGE
    if run.signum is not None:
        done = "every branch aborted, every process killed"
        if progress.winner is not None:
            done = f"{progress.winner} was committed before the interrupt; every other {done}"
        _tell(f"interrupted: {done}")
        return 128 + run.signum  # 130 for SIGINT (Ctrl-C), 143 for SIGTERM, 129 for SIGHUP
    if args.json:
        _emit_json(doc)
    else:
        _print_human(args.command, doc, progress)
    return code


if __name__ == "__main__":
    sys.exit(main())
