"""The ``branchagent`` command.

    branchagent [-w DIR] [--backend NAME] [--json] status
    branchagent [-w DIR] diff BRANCH
    branchagent [-w DIR] commit BRANCH
    branchagent [-w DIR] abort BRANCH
    branchagent [-w DIR] run [--timeout S] [--memory M] [--pids N] [--cpu C]
                             [--no-isolate] -- CMD...

``status``, ``diff``, ``commit`` and ``abort`` work on branches that survive
in the workspace's state directory (for example those a crashed agent left).
``run`` forks a branch, runs CMD in it, and commits it when CMD exits 0.

Exit status: 0 done (committed), 1 nothing committed, 2 usage or environment error.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import structlog

from . import _workspace
from ._limits import Limits
from .exceptions import BranchAgentError

__all__ = ["main"]

EXIT_OK, EXIT_NOTHING, EXIT_USAGE = 0, 1, 2


def _configure_logging(json_mode: bool, verbose: bool) -> None:
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.processors.JSONRenderer() if json_mode
            else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.DEBUG if verbose else logging.WARNING
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
    )


def _recorded_backend(workspace: Path) -> str | None:
    meta = _workspace.default_state_dir(workspace.resolve()) / "branches.json"
    try:
        value = json.loads(meta.read_text()).get("backend")
    except (OSError, ValueError):
        return None
    return value if isinstance(value, str) else None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="branchagent",
        description="Fork a workspace into branches, try candidates, commit the winner.",
    )
    p.add_argument("-w", "--workspace", default=".", help="workspace directory (default: .)")
    p.add_argument("--backend", default=None,
                   help="backend name (default: the one recorded in the state dir, else fuse)")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress on stderr")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("status", help="list the workspace's open branches")
    for name in ("diff", "commit", "abort"):
        sp = sub.add_parser(name, help=f"{name} a surviving branch")
        sp.add_argument("branch")
    rp = sub.add_parser("run", help="run CMD in a new branch; commit it if CMD exits 0")
    rp.add_argument("--timeout", type=float, default=None)
    rp.add_argument("--memory", default=None)
    rp.add_argument("--pids", type=int, default=None)
    rp.add_argument("--cpu", type=float, default=None)
    rp.add_argument("--no-isolate", action="store_true")
    rp.add_argument("cmd", nargs=argparse.REMAINDER)
    return p


async def _main(args: argparse.Namespace) -> tuple[int, Any]:
    ws_path = Path(args.workspace)
    backend = args.backend or _recorded_backend(ws_path) or "fuse"
    keep = args.command != "run"
    async with _workspace.open_workspace(ws_path, backend=backend, keep_branches=keep) as ws:
        if args.command == "status":
            rows = [
                {"name": b.name, "parent": b.parent.name if b.parent else None,
                 "depth": b.depth, "path": str(b.path),
                 "changes": len(await b.changes())}
                for b in ws.branches()
            ]
            return EXIT_OK, {"workspace": str(ws.path), "backend": ws.backend.name,
                             "branches": rows}
        if args.command == "diff":
            return EXIT_OK, await ws.get(args.branch).diff()
        if args.command == "commit":
            b = ws.get(args.branch)
            changes = await b.changes()
            await b.commit()
            return EXIT_OK, {"committed": b.name, "changes": [c.path for c in changes]}
        if args.command == "abort":
            await ws.get(args.branch).abort()
            return EXIT_OK, {"aborted": args.branch}
        cmd = list(args.cmd)
        if cmd and cmd[0] == "--":
            cmd = cmd[1:]
        if not cmd:
            raise SystemExit("branchagent run: give a command after --")
        limits = Limits(memory=args.memory, pids=args.pids, cpu=args.cpu, timeout=args.timeout)
        b = await ws.fork()
        r = await b.run(cmd, limits=limits, isolate=not args.no_isolate)
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


def _print_human(command: str, doc: Any) -> None:
    if isinstance(doc, str):
        sys.stdout.write(doc)
        return
    if command == "status":
        print(f"workspace {doc['workspace']} (backend {doc['backend']})")
        if not doc["branches"]:
            print("  no open branches")
        for row in doc["branches"]:
            indent = "  " * (row["depth"] + 1)
            print(f"{indent}{row['name']}  ({row['changes']} changes)  {row['path']}")
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``branchagent`` console script."""
    args = _parser().parse_args(argv)
    _configure_logging(args.json, args.verbose)
    try:
        code, doc = anyio.run(_main, args)
    except KeyboardInterrupt:
        print("interrupted: every branch aborted", file=sys.stderr)
        return 130
    except (BranchAgentError, OSError, ValueError) as exc:
        msg = f"branchagent: {exc}"
        if args.json:
            print(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
        print(msg, file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(json.dumps(doc, default=str))
    else:
        _print_human(args.command, doc)
    return code


if __name__ == "__main__":
    sys.exit(main())
