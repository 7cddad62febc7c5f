"""Unified diffs: parse them, and apply them to text, the way ``patch`` would, in Python.

Models write diffs that are almost right: hunk line counts that do not add
up, line numbers that are off, trailing whitespace that differs. So the
parser does not trust the counts in ``@@`` headers (a hunk is the run of
``' '``/``'-'``/``'+'`` lines after its header), and a hunk is placed where
its context and removed lines are found, nearest to the line its header
names; exact matches first, then matches that ignore trailing whitespace.
A hunk found nowhere is an :class:`~branchagent.llm.ApplyError` naming it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import attrs

from ._errors import ApplyError

__all__ = ["FilePatch", "Hunk", "apply_hunks", "looks_like_diff", "parse_unified_diff"]

_HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")
_NULL = "/dev/null"


@attrs.frozen
class Hunk:
    """One ``@@`` hunk: ``lines`` are ``(tag, text)`` with tag ``' '``, ``'-'`` or ``'+'``.

    ``text`` includes its line ending (``"\\n"``) unless the diff said
    ``\\ No newline at end of file``. ``old_start`` is 1-based and ``old_count``
    the header's count of old lines (both ``None`` when the header carries no
    numbers); the parser keeps them as hints only.
    """

    header: str
    old_start: int | None
    lines: tuple[tuple[str, str], ...]
    old_count: int | None = None

    @property
    def old(self) -> list[str]:
        """The lines the hunk expects to find (context and removed)."""
        return [text for tag, text in self.lines if tag != "+"]

    @property
    def new(self) -> list[str]:
        """The lines the hunk leaves in their place (context and added)."""
        return [text for tag, text in self.lines if tag != "-"]


@attrs.frozen
class FilePatch:
    """The hunks for one file (``old_path`` is ``None`` for a new file, ``new_path`` if deleted)."""

    old_path: str | None
    new_path: str | None
    hunks: tuple[Hunk, ...]

    @property
    def path(self) -> str:
        """The path the patch is about (the new one, or the old one for a deletion)."""
        path = self.new_path if self.new_path is not None else self.old_path
        assert path is not None
        return path


def looks_like_diff(text: str) -> bool:
    """Whether ``text`` holds a unified diff (a ``---``/``+++`` header pair then a hunk)."""
    lines = text.splitlines()
    for i, line in enumerate(lines[:-2]):
        if (line.startswith("--- ") and lines[i + 1].startswith("+++ ")
                and lines[i + 2].startswith("@@")):
            return True
    return False


def _header_path(raw: str) -> str | None:
    path = raw.split("\t", 1)[0].strip()  # "--- a/x.py\t2024-01-01 ..." (timestamps)
    if len(path) >= 2 and path[0] == path[-1] == '"':
        path = path[1:-1]
    return None if path == _NULL else path


def _strip_prefixes(old: str | None, new: str | None) -> tuple[str | None, str | None]:
    """Drop git's ``a/`` and ``b/`` prefixes (``patch -p1``) when the diff uses them."""
    old_ok = old is None or old.startswith("a/")
    new_ok = new is None or new.startswith("b/")
    if old_ok and new_ok and (old is not None or new is not None):
        return (old[2:] if old is not None else None, new[2:] if new is not None else None)
    return old, new


def parse_unified_diff(text: str) -> list[FilePatch]:
    """The file patches in ``text`` (prose around the diff is ignored).

    Raises :class:`~branchagent.llm.ApplyError` when no ``---``/``+++`` header
    is followed by a hunk, or a header names no file.
    """
    lines = text.splitlines(keepends=True)
    patches: list[FilePatch] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if not (line.startswith("--- ") and i + 1 < len(lines)
                and lines[i + 1].startswith("+++ ")):
            i += 1
            continue
        old, new = _strip_prefixes(_header_path(line[4:].rstrip("\r\n")),
                                   _header_path(lines[i + 1][4:].rstrip("\r\n")))
        if old is None and new is None:
            raise ApplyError(f"the diff header at line {i + 1} names /dev/null twice")
        i += 2
        hunks: list[Hunk] = []
        while i < len(lines) and lines[i].startswith("@@"):
            header = lines[i].rstrip("\r\n")
            m = _HUNK.match(header)
            start = int(m.group(1)) if m else None
            count = (int(m.group(2)) if m.group(2) is not None else 1) if m else None
            i += 1
            body: list[tuple[str, str]] = []
            while i < len(lines):
                raw = lines[i]
                if raw.startswith("\\"):  # "\ No newline at end of file"
                    if body:
                        tag, last = body[-1]
                        body[-1] = (tag, last.rstrip("\r\n"))
                    i += 1
                    continue
                next_is_plus = i + 1 < len(lines) and lines[i + 1].startswith("+++ ")
                if raw.startswith("--- ") and next_is_plus:
                    break  # the next file
                if raw[:1] in (" ", "-", "+"):
                    body.append((raw[0], raw[1:] if raw[1:] else "\n"))
                elif raw in ("\n", "\r\n"):  # a blank context line whose space was lost
                    body.append((" ", raw))
                else:
                    break
                i += 1
            # Blank lines after the diff are not context: drop trailing blank context
            # lines beyond the header's count of old lines.
            while body and body[-1] == (" ", "\n") and (
                count is None or sum(tag != "+" for tag, _ in body) > count
            ):
                body.pop()
            hunks.append(Hunk(header=header, old_start=start, lines=tuple(body),
                              old_count=count))
        if not hunks:
            raise ApplyError(f"the diff for {new or old} has a header but no @@ hunk")
        patches.append(FilePatch(old_path=old, new_path=new, hunks=tuple(hunks)))
    if not patches:
        raise ApplyError("the text holds no unified diff (no '--- ' / '+++ ' header pair)")
    return patches


def _find(lines: Sequence[str], want: Sequence[str], hint: int, lo: int) -> int | None:
    """The start index of ``want`` in ``lines[lo:]`` nearest to ``hint``, or ``None``."""
    n, m = len(lines), len(want)
    if m == 0:
        return min(max(hint, lo), n)
    last = n - m
    if last < lo:
        return None
    hint = min(max(hint, lo), last)
    for strip in (False, True):
        cmp = [w.rstrip() for w in want] if strip else list(want)
        for distance in range(max(hint - lo, last - hint) + 1):
            for at in (hint - distance, hint + distance) if distance else (hint,):
                if lo <= at <= last:
                    window = lines[at:at + m]
                    if strip:
                        if all(a.rstrip() == b for a, b in zip(window, cmp, strict=True)):
                            return at
                    elif window == cmp:
                        return at
    return None


def apply_hunks(text: str, patch: FilePatch) -> str:
    """``text`` with the hunks of ``patch`` applied in order; ApplyError names one that fails."""
    lines = text.splitlines(keepends=True)
    offset = 0  # how far earlier hunks moved the lines below them
    floor = 0  # hunks apply in order: never before the end of the previous one
    for number, hunk in enumerate(patch.hunks, 1):
        old, new = hunk.old, hunk.new
        if hunk.old_start is None:
            hint = floor
        elif not old and hunk.old_count == 0:  # pure insertion: "-k,0" inserts after line k
            hint = hunk.old_start + offset
        else:
            hint = hunk.old_start - 1 + offset
        at = _find(lines, old, hint, floor)
        if at is None:
            first = old[0].rstrip("\r\n") if old else ""
            raise ApplyError(
                f"hunk {number} of {patch.path} ({hunk.header}) does not apply: its "
                f"{len(old)} context/removed line(s), starting {first!r}, are not in the file"
                + (f" at or after line {floor + 1}" if floor else "")
            )
        # A file that lacked a final newline gains one when a hunk appends after it.
        if at == len(lines) and lines and not lines[-1].endswith("\n") and new:
            lines[-1] += "\n"
        lines[at:at + len(old)] = new
        offset += len(new) - len(old)
        floor = at + len(new)
    return "".join(lines)
