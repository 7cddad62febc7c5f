"""Printing results: the human rendering of each command's document (``--json``: the
document itself, one JSON value on stdout), and error messages that say what to do."""

from __future__ import annotations

import json
import shlex
import sys
import time
from collections.abc import Mapping
from typing import Any

import branchagent as ba

from ..exceptions import (
    BackendError,
    BranchError,
    IsolationUnavailable,
    UsageError,
    WorkspaceLocked,
)
from ..strategy._report import children_of, verdict_of, winner_path
from ._progress import Row, fmt_score, state_of

__all__ = ["emit_json", "explain", "print_human", "tell", "unwrap"]


def unwrap(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def explain(exc: BaseException) -> str:
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


def _print_outcome(outcome: ba.Outcome, rows: Mapping[str, Row]) -> None:
    head = f"{outcome.strategy}: "
    w = outcome.winner
    if w is not None:
        score = f", score {fmt_score(w.score)}" if w.score is not None else ""
        head += (f"committed candidate {w.index} (branch {w.branch}{score}, "
                 f"{len(w.changes)} changed paths)")
    elif outcome.timed_out:
        head += "nothing committed: the timeout expired"
    else:
        head += "nothing committed: no candidate succeeded"
    print(f"{head} in {outcome.duration:.2f} s")
    by_index = {r.index: r for r in outcome.results}
    kids = children_of([{"index": r.index, "parent": r.parent} for r in outcome.results])
    on_path = set(winner_path(outcome.to_dict())) if w is not None else set()

    def show(index: int, level: int) -> None:
        r = by_index[index]
        row = rows.get(r.branch or "")
        state = state_of(r.success, r.error)
        if index in on_path or (row is not None and row.state == "committed"):
            state = "committed"  # the winner, or a node on its path (tree, beam)
        # A failed node says what failed (the candidate's exit, the evaluation, ...).
        note = "" if r.success else verdict_of({"success": r.success, "error": r.error,
                                               "info": r.info})
        score = f"score {fmt_score(r.score)}" if r.score is not None else ""
        argv = r.info.get("argv")
        label = row.label if row is not None else ""
        if not label and isinstance(argv, list):
            label = shlex.join(str(a) for a in argv)
        tail = f"{note}  | {label}" if note and label else note or label
        line = f"  {'  ' * level}#{r.index:<3} {state:<10} {r.duration:7.2f}s  {score:<12} {tail}"
        print(line.rstrip())
        for child in kids.get(index, []):
            show(child, level + 1)

    for root in kids.get(None, []):
        show(root, 0)


def print_human(command: str, doc: Any, rows: Mapping[str, Row]) -> None:
    if isinstance(doc, ba.Outcome):
        _print_outcome(doc, rows)
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
        elif doc.get("mounted") is False:
            print("  (not mounted: no process has the workspace open; branch paths exist "
                  "while one does)")
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
            if doc.get("invalidated"):
                print(f"invalidated {len(doc['invalidated'])} other branch(es), void now "
                      f"(first commit wins): {', '.join(doc['invalidated'])}")
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


def emit_json(doc: Any) -> None:
    if isinstance(doc, ba.Outcome):
        print(doc.to_json())
    else:
        print(json.dumps(doc, default=str))


def tell(text: str) -> None:
    """``text`` on stderr, if stderr is still there (after SIGHUP the terminal is gone:
    a write fails with EIO, and that must not turn a clean exit into a traceback)."""
    try:
        print(text, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass
