"""The log sink: library log lines at the level asked for, printed through the progress
display (above its live table) on stderr. Logs are for people; the display itself reads
events (see :mod:`._progress`)."""

from __future__ import annotations

import logging

import structlog

from ._progress import Progress

__all__ = ["configure_logging"]


class _SinkLogger:
    """A structlog logger that prints rendered lines through the progress display."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress

    def msg(self, message: str) -> None:
        self._progress.message(message)

    debug = info = warning = warn = error = critical = exception = fatal = log = msg


def configure_logging(progress: Progress, *, json_mode: bool, verbose: int) -> None:
    """Library log lines at the shown level (warning; -v info; -vv debug) go to stderr."""
    shown = {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer(default=str) if json_mode
        else structlog.dev.ConsoleRenderer(colors=progress.color)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(shown),
        logger_factory=lambda *_: _SinkLogger(progress),
        cache_logger_on_first_use=False,
    )
