"""The progress display: what every branch of a run is doing, on stderr.

Driven by the library's events (:func:`branchagent.observe`, :class:`branchagent.Event`):
the workspace's ``branch_*`` events and the strategies' ``candidate_*`` and
``winner_committed``; never by log lines.
"""

from __future__ import annotations

import os
import threading
import time
from typing import TextIO

import anyio
import attrs

from .._events import Event
from ..strategy._report import state_of

__all__ = ["Progress", "Row", "fmt_score", "state_of"]

_TICK_S = 0.1

_RUNNING = ("forked", "running", "expanding")
_COLORS = {
    "running": "33", "expanding": "36", "forked": "33", "ok": "32", "committed": "1;32",
    "failed": "31", "error": "31", "timeout": "35", "cancelled": "2", "aborted": "2",
    "invalidated": "2",
}


@attrs.define
class Row:
    """One branch of the run, as the display shows it."""

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


def fmt_score(score: float | None) -> str:
    return "-" if score is None else f"{score:.4g}"


class Progress:
    """What every branch of the run is doing, shown on stderr.

    Fed by the library's events through :meth:`feed` (``with
    ba.observe(progress.feed)``), and by the CLI's own candidates
    (:meth:`started`, :meth:`ran`). With ``live`` it redraws a table in place
    with ANSI escapes (stderr is a terminal); otherwise it prints one plain
    line per start, finish and commit. Thread-safe: events may come from
    worker threads.
    """

    def __init__(self, stream: TextIO, *, live: bool, enabled: bool = True,
                 title: str = "", color: bool = False) -> None:
        self.stream = stream
        self.live = live and enabled
        self.enabled = enabled
        self.title = title
        self.color = color
        self.rows: dict[str, Row] = {}
        self.winner: str | None = None
        #: Label of a top-level branch no candidate of ours names (a strategy's own task);
        #: such branches are announced when forked.
        self.default_label = ""
        self.t0 = time.monotonic()
        self._lock = threading.RLock()
        self._drawn = 0
        self._closed = False

    # -- inputs --------------------------------------------------------------------

    def feed(self, event: Event) -> None:
        """Take one library event (an observer for :func:`branchagent.observe`)."""
        kind, branch = event.kind, event.branch
        if branch is None:
            return
        now = time.monotonic()
        with self._lock:
            row = self.rows.get(branch)
            if kind == "branch_forked":
                row = self.rows[branch] = Row(branch, event.depth or 0, now)
                if self.default_label and row.depth == 0:
                    row.label = self.default_label
                    row.state = "running"
                    self._plain(row, "start    ")
            elif row is None:
                return
            elif kind == "candidate_finished":
                data = event.data
                if row.state in _RUNNING:
                    error = data.get("error")
                    row.state = state_of(bool(data.get("success")),
                                         error if isinstance(error, str) else None)
                    if row.state == "error" and isinstance(error, str) and not row.note:
                        row.note = error.splitlines()[0][:80] if error else ""
                    row.ended = now
                score = data.get("score")
                if isinstance(score, int | float):
                    row.score = float(score)
                self._plain(row, f"{row.state:<9}")
            elif kind in ("winner_committed", "branch_committed"):
                first = row.state != "committed"
                row.state = "committed"
                row.ended = row.ended or now
                # The run's winner: the node a strategy names, else what reached the base.
                if kind == "winner_committed" or row.depth == 0:
                    self.winner = branch
                if first:
                    self._plain(row, "committed")
            elif kind in ("branch_aborted", "branch_invalidated") and row.state in _RUNNING:
                row.state = "aborted" if kind == "branch_aborted" else "invalidated"
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
                row = self.rows[branch] = Row(branch, 0, time.monotonic())
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

    def running(self) -> list[Row]:
        with self._lock:
            return [r for r in self.rows.values() if r.state in _RUNNING]

    # -- output --------------------------------------------------------------------

    def _paint(self, state: str) -> str:
        text = f"{state:<11}"
        if not self.color:
            return text
        return f"\x1b[{_COLORS.get(state, '0')}m{text}\x1b[0m"

    def _row_text(self, row: Row, now: float) -> str:
        score = f"score {fmt_score(row.score)}" if row.score is not None else ""
        parts = [f"{'  ' * (row.depth + 1)}{row.name}", self._paint(row.state),
                 f"{row.elapsed(now):7.2f}s", f"{score:<12}", f"{row.note:<12}", row.label]
        return "  ".join(parts).rstrip()

    def _plain(self, row: Row, what: str) -> None:
        if self.live or not self.enabled:
            return
        now = time.monotonic()
        bits = [f"[{now - self.t0:7.2f}s]", what, row.name]
        if what.strip() != "start":
            bits.append(f"{row.elapsed(now):.2f}s")
            if row.score is not None:
                bits.append(f"score {fmt_score(row.score)}")
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
            out.append(f"winner: {w.name}  score {fmt_score(w.score)}  {w.label}".rstrip())
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

    def close(self, *, erase: bool = False) -> None:
        """Final redraw (``erase``: remove the live table instead, for a summary that shows
        the same rows); later calls print nothing more in place."""
        with self._lock:
            if erase and self.live and not self._closed:
                if self._drawn:
                    self._write(self._erase())
                self._drawn = 0
            else:
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
