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
    branchagent report TRACE.json -o report.html   the lineage report of a run (HTML)
    branchagent diff BRANCH | commit BRANCH | abort BRANCH | abort --all

Common options (before or after the command): ``-w/--workspace DIR`` (default:
the current directory), ``--backend NAME`` (default: the backend recorded in
the workspace's state directory, else the library default: ``fuse`` where it
can work, else ``copy``),
``--json`` (one JSON document on stdout; for strategies ``Outcome.to_json()``),
``-q/--quiet``, ``-v/--verbose``. Commands run in a branch take ``--timeout``,
``--max-parallel``, ``--memory``, ``--pids``, ``--cpu`` and ``--no-isolate``;
strategy commands take ``--report FILE`` (the run's lineage report, one
self-contained HTML page; ``report`` makes the same page from a ``--json`` trace).

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

The package, one module per job: :mod:`._args` parses the command line,
:mod:`._build` builds candidates and strategies from it, :mod:`._progress` is
the display (fed by the library's events), :mod:`._logs` the log sink,
:mod:`._status` lists branches, :mod:`._run` runs an invocation and
:mod:`._render` prints what it returned.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

import anyio

import branchagent as ba

from ..exceptions import BranchAgentError, UsageError
from ._args import parse
from ._logs import configure_logging
from ._progress import Progress
from ._render import emit_json, explain, print_human, tell, unwrap
from ._report import report, write_report
from ._run import EXIT_INTERRUPTED, EXIT_USAGE, HOUSEKEEPING, Run, doctor, invoke, serve

__all__ = ["UsageError", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``branchagent`` console script; returns the exit status."""
    args = parse(argv)
    if args.command == "serve":
        return serve(args)
    if args.command == "doctor":
        return doctor(args)
    if args.command == "report":
        return report(args)
    live = sys.stderr.isatty() and not args.quiet and args.command not in HOUSEKEEPING
    color = sys.stderr.isatty() and "NO_COLOR" not in os.environ
    progress = Progress(sys.stderr, live=live, enabled=not args.quiet, title=args.command,
                        color=color)
    configure_logging(progress, json_mode=args.json, verbose=args.verbose)
    run = Run(args, progress)
    try:
        code, doc = anyio.run(invoke, run)
    except KeyboardInterrupt:  # before the signal handler was installed, or after
        progress.close()
        tell("interrupted")
        return EXIT_INTERRUPTED
    except Exception as raw:
        exc = unwrap(raw)
        if run.signum is not None:
            tell(f"interrupted; while cleaning up: {type(exc).__name__}: {exc}")
            return 128 + run.signum
        if not isinstance(exc, BranchAgentError | OSError | ValueError):
            raise
        if args.json:
            print(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
        print(f"branchagent {args.command}: {explain(exc)}", file=sys.stderr)
        return EXIT_USAGE
    if run.signum is not None:
        done = "every branch aborted, every process killed"
        if progress.winner is not None:
            done = f"{progress.winner} was committed before the interrupt; every other {done}"
        tell(f"interrupted: {done}")
        return 128 + run.signum  # 130 for SIGINT (Ctrl-C), 143 for SIGTERM, 129 for SIGHUP
    if args.json:
        emit_json(doc)
    else:
        print_human(args.command, doc, progress.rows)
    path = getattr(args, "report", None)
    if path and isinstance(doc, ba.Outcome):
        try:
            write_report(doc, path)
        except OSError as exc:
            tell(f"branchagent {args.command}: the run is done (above) but its report could "
                 f"not be written to {path}: {exc}")
            return EXIT_USAGE
        if not args.quiet:
            tell(f"report: {path}")
    return code
