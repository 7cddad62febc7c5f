"""Library logging: silent until the application asks.

Every module gets its logger from :func:`get_logger` instead of
``structlog.get_logger``. Each call on such a logger goes one of two ways,
chosen at the time of the call:

* the application (or a test, through ``structlog.testing.capture_logs``)
  configured structlog: the event goes through that configuration, exactly as
  ``get_logger(name)`` would send it;
* otherwise: the event goes to the stdlib :mod:`logging` logger of the same
  name (``branchagent`` or one below it), rendered as ``event key=value ...``.
  That logger has a :class:`logging.NullHandler`, so nothing is shown until the
  application configures :mod:`logging` (``logging.basicConfig(level=logging.INFO)``),
  as with httpx or anyio.

The library never calls ``structlog.configure()`` and never prints.
"""

from __future__ import annotations

import logging
from typing import Any

import structlog

__all__ = ["ROOT", "get_logger"]

ROOT = "branchagent"

logging.getLogger(ROOT).addHandler(logging.NullHandler())

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "exception": logging.ERROR,
    "critical": logging.CRITICAL,
}


def _render(event: dict[str, Any]) -> str:
    """``event key=value ...``: values with spaces, quotes or ``=`` are shown with repr()."""
    parts = [str(event.pop("event", ""))]
    for key, value in event.items():
        text = str(value)
        if not text or any(ch in text for ch in " \t\n\"'="):
            text = repr(value)
        parts.append(f"{key}={text}")
    return " ".join(parts)


class LibraryLogger:
    """A logger for one library module: see the module docstring for where events go."""

    __slots__ = ("_name", "_stdlib")

    def __init__(self, name: str) -> None:
        self._name = name
        self._stdlib = logging.getLogger(name)

    @property
    def name(self) -> str:
        return self._name

    def _emit(self, method: str, event: str, kw: dict[str, Any]) -> None:
        if structlog.is_configured():
            getattr(structlog.get_logger(self._name), method)(event, **kw)
            return
        level = _LEVELS[method]
        if not self._stdlib.isEnabledFor(level):
            return
        exc_info = kw.pop("exc_info", method == "exception")
        fields = dict(structlog.contextvars.get_contextvars())
        fields.update(kw)
        fields["event"] = event
        self._stdlib.log(level, "%s", _render(fields), exc_info=exc_info, stacklevel=3)

    def debug(self, event: str, **kw: Any) -> None:
        self._emit("debug", event, kw)

    def info(self, event: str, **kw: Any) -> None:
        self._emit("info", event, kw)

    def warning(self, event: str, **kw: Any) -> None:
        self._emit("warning", event, kw)

    warn = warning

    def error(self, event: str, **kw: Any) -> None:
        self._emit("error", event, kw)

    def exception(self, event: str, **kw: Any) -> None:
        self._emit("exception", event, kw)

    def critical(self, event: str, **kw: Any) -> None:
        self._emit("critical", event, kw)


def get_logger(name: str = ROOT) -> LibraryLogger:
    """The logger for *name* (``branchagent`` or a name below it)."""
    if name != ROOT and not name.startswith(ROOT + "."):
        raise ValueError(f"logger name {name!r} is outside the library: use {ROOT!r} "
                         f"or a name that starts with {ROOT + '.'!r}")
    return LibraryLogger(name)
