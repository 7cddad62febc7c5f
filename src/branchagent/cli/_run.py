"""Running one invocation: the work of each command inside its workspace, the signals
that interrupt it, ``serve`` and ``doctor``.

Ctrl-C (or SIGTERM, or SIGHUP when the terminal closes) aborts every branch of
the run, kills every process it started, says what was running and exits
128 + the signal's number. Branches another, crashed run left behind are kept.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import attrs

import branchagent as ba

from .. import _workspace
from .._extras import missing_modules
from ..exceptions import ConflictError, IsolationUnavailable, UsageError, WorkspaceLocked
from ._build import STRATEGY_OF, build_strategy, label, run_options
from ._logs import configure_logging
from ._progress import Progress
from ._status import (
    recorded_backend,
    status_closed,
    status_doc,
    status_empty,
    status_unlocked,
)

__all__ = [
    "EXIT_INTERRUPTED",
    "EXIT_NOTHING",
    "EXIT_OK",
    "EXIT_USAGE",
    "HOUSEKEEPING",
    "Run",
    "doctor",
    "invoke",
    "serve",
]

EXIT_OK, EXIT_NOTHING, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
#: Signals that abort the run cleanly; the exit status is 128 + the signal's number.
#: SIGHUP: the terminal closed; the run must not die half-way and leave processes behind.
INTERRUPTS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

#: Commands on the branches a workspace already has (no progress display).
HOUSEKEEPING = ("status", "diff", "commit", "abort")


def workspace_path(args: argparse.Namespace) -> Path:
    path = Path(os.path.realpath(args.workspace))
    if not path.is_dir():
        raise UsageError(f"workspace {path} is not a directory; give one with -w DIR")
    if path == path.parent:
        given = "-w /" if args.workspace not in (None, ".") else "the current directory"
        raise UsageError(f"the workspace would be {path} ({given}): branchagent cannot make "
                         "the whole filesystem a workspace; cd into a project directory, or "
                         "give one with -w DIR")
    return path


@attrs.define
class Run:
    """The state one invocation shares between its work and its signal watcher."""

    args: argparse.Namespace
    progress: Progress
    signum: int | None = None


async def _housekeeping(run: Run, ws: ba.Workspace) -> tuple[int, Any]:
    args = run.args
    if args.command == "status":
        return EXIT_OK, await status_doc(ws)
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
    before = [x for x in ws.branches() if x is not b and x.state is ba.BranchState.OPEN]
    try:
        await b.commit()
    except ConflictError as exc:
        return EXIT_NOTHING, {"committed": None, "branch": b.name, "into": parent,
                              "error": f"ConflictError: {exc}", "invalidated": []}
    # First commit wins: the branch's open siblings (and their branches), and its own
    # branches, are void now; say which, so that nobody goes looking for them.
    invalidated = [x.name for x in before if x.state is ba.BranchState.INVALIDATED]
    return EXIT_OK, {"committed": b.name, "into": parent, "changes": changes,
                     "invalidated": invalidated}


def _descendants(b: ba.WorkspaceBranch) -> list[ba.WorkspaceBranch]:
    out: list[ba.WorkspaceBranch] = []
    for child in b.children:
        out += [child, *_descendants(child)]
    return out


async def _strategy_run(run: Run, ws: ba.Workspace, strategy: ba.Strategy) -> tuple[int, Any]:
    outcome = await strategy.run(ws)
    errors = [r.error or "" for r in outcome.results]
    if errors and all(e.startswith(IsolationUnavailable.__name__) for e in errors):
        raise IsolationUnavailable(errors[0].partition(": ")[2])
    return (EXIT_OK if outcome.committed else EXIT_NOTHING), outcome


async def _single_run(run: Run, ws: ba.Workspace) -> tuple[int, Any]:
    args = run.args
    options = run_options(args)
    limits = options["limits"] or ba.Limits()
    if args.timeout is not None:
        limits = attrs.evolve(limits, timeout=args.timeout)
    options["limits"] = limits
    b = await ws.fork()
    run.progress.started(b.name, label(args.cmd))
    r = await b.run(args.cmd, **options)
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


async def _work(run: Run) -> tuple[int, Any]:
    args = run.args
    path = await anyio.to_thread.run_sync(workspace_path, args)
    housekeeping = args.command in HOUSEKEEPING
    sdir = _workspace.default_state_dir(path)
    if housekeeping and not await anyio.to_thread.run_sync(sdir.exists):
        if args.command == "status":
            return EXIT_OK, status_empty(path)
        raise UsageError(f"no branch named {args.branch!r}: {path} has no branchagent state "
                         f"({sdir} does not exist)")
    # Built before the workspace opens: a missing strategy or a bad option costs nothing.
    strategy = build_strategy(args, run.progress) if args.command in STRATEGY_OF else None
    backend = args.backend or await anyio.to_thread.run_sync(recorded_backend, path)
    opened = False
    try:
        # keep_branches: what an earlier (crashed) run left stays for `status`; what this
        # run forks is aborted below, on every path.
        async with ba.open_workspace(path, backend=backend, keep_branches=True) as ws:
            opened = True
            if housekeeping:
                result = await _housekeeping(run, ws)
            else:
                return await _in_workspace(run, ws, strategy)
    except WorkspaceLocked:
        if args.command == "status" and not opened:
            return EXIT_OK, await anyio.to_thread.run_sync(status_unlocked, path)
        raise
    if args.command == "status":
        # The workspace is closed again: a path that went with it (a FUSE mount) is not shown.
        return result[0], await anyio.to_thread.run_sync(status_closed, result[1])
    return result


async def _in_workspace(run: Run, ws: ba.Workspace, strategy: ba.Strategy | None
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


async def _watch_signals(run: Run, signals: Any, work: anyio.CancelScope) -> None:
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


async def invoke(run: Run) -> tuple[int, Any]:
    """Do ``run.args.command`` until it is done or a signal interrupts it (``run.signum``);
    the library's events feed ``run.progress`` meanwhile."""
    result: tuple[int, Any] | BaseException = (EXIT_INTERRUPTED, None)
    with anyio.open_signal_receiver(*INTERRUPTS) as signals:
        async with anyio.create_task_group() as tg:
            work = anyio.CancelScope()
            tg.start_soon(_watch_signals, run, signals, work)
            if run.progress.live:
                tg.start_soon(run.progress.tick)
            with work, ba.observe(run.progress.feed):
                try:
                    result = await _work(run)
                except Exception as exc:
                    result = exc
            tg.cancel_scope.cancel()
    # The summary printed next shows every row again: the live table goes, not twice.
    run.progress.close(erase=not run.args.json and isinstance(result, tuple)
                       and isinstance(result[1], ba.Outcome))
    if isinstance(result, BaseException):
        raise result
    return result


def serve(args: argparse.Namespace) -> int:
    """``branchagent serve``: runs until SIGTERM/SIGHUP/Ctrl-C (see :mod:`branchagent.serve`)."""
    missing = missing_modules("starlette", "uvicorn", "httpx")
    if missing:
        print(f"branchagent serve: needs the [serve] extra ({', '.join(missing)} not installed): "
              "pip install 'branchagent[serve]'", file=sys.stderr)
        return EXIT_USAGE
    from ..serve._main import serve as serve_until_stopped

    try:
        path = workspace_path(args)
        backend = args.backend or recorded_backend(path) or "copy"
        return serve_until_stopped(args, path, backend)
    except (UsageError, ValueError) as exc:
        print(f"branchagent serve: {exc}", file=sys.stderr)
        return EXIT_USAGE


def doctor(args: argparse.Namespace) -> int:
    """``branchagent doctor``: the report as a table (or JSON); 0 whatever is missing."""
    progress = Progress(sys.stderr, live=False, enabled=False)
    configure_logging(progress, json_mode=args.json, verbose=args.verbose)
    try:
        path = workspace_path(args)
    except UsageError as exc:
        print(f"branchagent doctor: {exc}", file=sys.stderr)
        return EXIT_USAGE
    report = anyio.run(ba.doctor, path)
    print(report.to_json() if args.json else report.render())
    return EXIT_OK
