"""``branchagent report TRACE.json -o report.html`` and every strategy command's ``--report``:
the lineage report (:meth:`branchagent.Outcome.to_html`) as one self-contained HTML file."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import branchagent as ba

from ..strategy._report import load_trace, render_report

__all__ = ["check_report_path", "report", "write_report"]


def check_report_path(path: str) -> str | None:
    """Why ``path`` cannot take a report (``None``: it can); checked before a run starts."""
    target = Path(path)
    if target.is_dir():
        return f"--report {path} is a directory; give a file name, e.g. {target / 'report.html'}"
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        return f"--report {path}: directory {parent} does not exist; create it first"
    if not os.access(parent, os.W_OK):
        return f"--report {path}: directory {parent} is not writable; pick another place"
    return None


def _write(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_report(outcome: ba.Outcome, path: str) -> None:
    """Write ``outcome``'s report to ``path`` (whole or not at all)."""
    _write(path, outcome.to_html())


def report(args: argparse.Namespace) -> int:
    """``branchagent report``: 0 written, 2 the trace or the output path is unusable."""
    out = args.output or str(Path(args.trace).with_suffix(".html"))
    if Path(out).resolve() == Path(args.trace).resolve():
        print(f"branchagent report: -o {out} would overwrite the trace; give another -o",
              file=sys.stderr)
        return 2
    problem = check_report_path(out)
    if problem is not None:
        print(f"branchagent report: {problem.replace('--report', '-o')}", file=sys.stderr)
        return 2
    try:
        with open(args.trace, encoding="utf-8") as f:
            text = f.read()
        doc = load_trace(text, source=args.trace)
    except (OSError, UnicodeDecodeError) as exc:
        print(f"branchagent report: cannot read {args.trace}: {exc}\n  give the JSON file a "
              "strategy command wrote with --json (e.g. `branchagent tree ... --json > "
              "TRACE.json`)", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"branchagent report: {exc}", file=sys.stderr)
        return 2
    try:
        _write(out, render_report(doc))
    except OSError as exc:
        print(f"branchagent report: cannot write {out}: {exc}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(f"wrote {out} ({len(doc['results'])} candidates)", file=sys.stderr)
    return 0
