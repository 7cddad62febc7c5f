"""``branchagent serve``: run the verified best-of server with uvicorn until SIGTERM, SIGHUP
or Ctrl-C."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import structlog

from .._log import get_logger

if TYPE_CHECKING:
    from ._app import ServeConfig

__all__ = ["add_arguments", "add_candidate_arguments", "config_from_args", "serve"]

def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``serve`` subcommand's own options (``-w``/``--backend`` are the common ones)."""
    p.add_argument("--upstream", required=True, metavar="URL",
                   help="base URL of the OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1")
    add_candidate_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    p.add_argument("--port", type=int, default=8100, help="port to bind (8100)")
    p.add_argument("--model", help="model to ask upstream for when a request names none "
                                   "(default: the first upstream lists)")
    p.add_argument("--upstream-timeout", type=float, default=120.0, metavar="S",
                   help="seconds to wait for upstream (120); then 504")
    p.add_argument("--shutdown-timeout", type=float, default=5.0, metavar="S",
                   help="on SIGTERM or SIGHUP, seconds in-flight requests get before they are "
                        "cancelled and their branches aborted (5)")


def add_candidate_arguments(p: argparse.ArgumentParser) -> None:
    """How candidates are applied, verified and ranked: shared by ``branchagent serve`` and
    the vLLM plugin (whose options are these, in ``$BRANCHAGENT_VLLM``)."""
    p.add_argument("--verify", metavar="CMD",
                   help="shell command run in each candidate's branch; exit 0 verifies "
                        "(default: applying is verifying)")
    p.add_argument("--apply", default="auto", metavar="MODE",
                   help="how a completion changes its branch: auto (a diff, else named code "
                        "blocks), diff, code (blocks that name files), code:PATH (those, or "
                        "one unnamed block to PATH), command (run the shell command it "
                        "returns) or file:PATH (its one code block, or its whole text when "
                        "it has none, becomes PATH); default auto")
    p.add_argument("--best-of", type=int, default=4, metavar="K",
                   help="candidates asked of upstream when a request gives no best_of (4)")
    p.add_argument("--max-best-of", type=int, default=16, metavar="K",
                   help="the most candidates one request may ask for; more is refused (16)")
    p.add_argument("--max-concurrent", type=int, default=4, metavar="N",
                   help="requests served at once; more wait in a queue (4)")
    p.add_argument("--score", default="mean_logprob",
                   help="logprob scorer that orders equally verified candidates "
                        "(mean_logprob, cumulative_logprob, gnmt_logprob)")
    p.add_argument("--verify-timeout", type=float, default=300.0, metavar="S",
                   help="seconds one verification may run (300); then it fails")
    p.add_argument("--no-isolate", action="store_true",
                   help="run verifications with the branch as cwd instead of in private "
                        "namespaces")
    p.add_argument("--report-dir", metavar="DIR",
                   help="write each request's lineage report (one HTML file: every "
                        "candidate, its verdict and diff) into DIR")


def config_from_args(args: argparse.Namespace, workspace: Path, backend: str) -> ServeConfig:
    from ._app import ServeConfig

    return ServeConfig(
        upstream=args.upstream, workspace=workspace, verify=args.verify, apply=args.apply,
        backend=backend, best_of=args.best_of, max_best_of=args.max_best_of,
        max_concurrent=args.max_concurrent,
        upstream_timeout=args.upstream_timeout, verify_timeout=args.verify_timeout,
        isolate=not args.no_isolate, score=args.score, model=args.model,
        report_dir=Path(args.report_dir) if getattr(args, "report_dir", None) else None,
    )


def _configure_logging(verbose: int, json_mode: bool) -> None:
    """Request lines (info) always; the library's own events only with -v (-vv: debug)."""
    library = {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)

    def level_filter(_logger: object, method: str, event: structlog.typing.EventDict
                     ) -> structlog.typing.EventDict:
        level = logging.getLevelName(method.upper())
        if isinstance(level, int) and event.get("event") != "serve_request" and level < library:
            raise structlog.DropEvent
        return event

    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json_mode
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[level_filter, structlog.processors.add_log_level,
                    structlog.processors.TimeStamper(fmt="iso"), renderer],
        logger_factory=lambda *_: _StderrLogger(),
        cache_logger_on_first_use=False,
    )


class _StderrLogger:
    """Prints each line on stderr; a failed write (EIO once a closed terminal hung up) is
    dropped, so a log line can never interrupt the shutdown that aborts the branches."""

    def msg(self, message: str) -> None:
        try:
            print(message, file=sys.stderr, flush=True)
        except (OSError, ValueError):
            pass

    debug = info = warning = warn = error = critical = exception = fatal = log = msg


def serve(args: argparse.Namespace, workspace: Path, backend: str) -> int:
    """Run until SIGTERM/SIGHUP/SIGINT; a clean stop by signal is reported as 128+signum."""
    import uvicorn

    from ._app import config_summary, create_app

    config = config_from_args(args, workspace, backend)
    _configure_logging(args.verbose, args.json)
    got: list[int] = []

    app = create_app(config)
    uv = uvicorn.Config(app, host=args.host, port=args.port, loop="asyncio", lifespan="on",
                        log_level="warning", access_log=False,
                        timeout_graceful_shutdown=args.shutdown_timeout)
    server = uvicorn.Server(uv)

    def stop(signum: int, frame: FrameType | None) -> None:
        got.append(signum)
        if not server.should_exit:
            server.handle_exit(signum, frame)

    # uvicorn handles SIGINT and SIGTERM itself while it runs and re-raises them when it is
    # done; `stop` receives that re-raise, so the process exits with a status instead of
    # dying. SIGHUP (the terminal closed) uvicorn leaves alone: `stop` starts the same
    # graceful shutdown for it (in-flight requests cancelled, branches aborted, processes
    # killed). A signal before the server runs stops it as soon as it has started.
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, stop)
    log = get_logger("branchagent.serve")
    log.warning("serve_starting", host=args.host, port=args.port, **config_summary(config))
    server.run()
    if not server.started:
        print("branchagent serve: the server did not start (see above)", file=sys.stderr)
        return 2
    log.warning("serve_stopped", signal=got[0] if got else None)
    return 128 + got[0] if got else 0
