"""Helpers shared by the tests (imported as ``_support``; not a test module)."""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

import branchagent as ba
from branchagent._backends.fuse._backend import check_available

__all__ = [
    "check_tree",
    "last_step",
    "lineage",
    "make_repo",
    "processes_with",
    "requires_fuse",
    "sleep_token",
    "snapshot",
    "step",
    "tree_state",
    "workspace",
]


def _fuse_missing() -> str | None:
    """Why the FUSE backend cannot work here, naming what is missing; None when it can."""
    try:
        check_available()
    except ba.BackendUnavailable as exc:
        return f"the FUSE backend is unavailable here: {exc}"
    return None


_FUSE_MISSING = _fuse_missing()
#: Skips a test, or a module (in ``pytestmark``), where the FUSE backend cannot work; the
#: reason says what is missing (pyfuse3, /dev/fuse or access to it, fusermount3).
requires_fuse = pytest.mark.skipif(_FUSE_MISSING is not None, reason=str(_FUSE_MISSING))

#: (type, mode, content digest or symlink target) per relative path.
Tree = dict[str, tuple[str, int, str]]


def tree_state(root: Path) -> Tree:
    """Everything a user could observe of ``root``: types, modes, contents, link targets."""
    out: Tree = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("symlink", 0, os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", mode, "")
            elif stat.S_ISREG(st.st_mode):
                out[rel] = ("file", mode, hashlib.sha256(Path(p).read_bytes()).hexdigest())
            else:
                out[rel] = ("other", mode, "")
        dirnames[:] = [n for n in dirnames if not os.path.islink(os.path.join(dirpath, n))]
    return out


@asynccontextmanager
async def workspace(repo: Path) -> AsyncIterator[ba.Workspace]:
    async with ba.open_workspace(repo, backend="copy") as ws:
        yield ws
        assert ws.branches() == [], "a strategy left a branch open"


def snapshot(root: Path) -> dict[str, bytes | str]:
    """Every entry under ``root``: file bytes, symlink targets, directories."""
    out: dict[str, bytes | str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            p = Path(dirpath, name)
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                out[rel] = "-> " + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = p.read_bytes()
    return out


def alive(pid: int) -> bool:
    """Whether ``pid`` is a process that has not ended (a zombie has ended). The process
    may go between opening its /proc entry and reading it (ProcessLookupError): gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def processes_with(token: str) -> list[int]:
    """Live (non-zombie) pids whose command line contains ``token``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if token.encode() in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def sleep_token() -> str:
    """A ``sleep`` argument no other process on the machine has."""
    return f"30.{secrets.randbelow(10**6):06d}"


def step(name: str, score: float | None = None, ok: bool = True) -> Callable[[ba.Branch], Any]:
    """A candidate that appends ``/name`` to path.txt (as its branch sees it) and adds n_name."""

    async def candidate(b: ba.Branch) -> Any:
        path = b.path / "path.txt"
        seen = path.read_text() if path.exists() else ""
        path.write_text(f"{seen}/{name}")
        (b.path / f"n_{name}").write_text(name)
        return ba.Verdict(ok, score)

    return candidate


def last_step(b: ba.Branch) -> str:
    path = b.path / "path.txt"
    return path.read_text().rsplit("/", 1)[-1] if path.exists() else ""


def lineage(outcome: ba.Outcome, index: int) -> list[ba.Result]:
    """The result at ``index`` and its ancestors, root first."""
    chain = [outcome.results[index]]
    while chain[-1].parent is not None:
        parent = chain[-1].parent
        assert parent is not None
        chain.append(outcome.results[parent])
    return chain[::-1]


def check_tree(outcome: ba.Outcome) -> None:
    """The results form a tree: unique indices in order, parents first, depths consistent."""
    assert [r.index for r in outcome.results] == list(range(len(outcome.results)))
    for r in outcome.results:
        if r.parent is None:
            assert r.depth == 0
        else:
            assert r.parent < r.index
            assert r.depth == outcome.results[r.parent].depth + 1


def make_repo(root: Path) -> Path:
    repo = root / "repo"
    (repo / "src").mkdir(parents=True)
    (repo / "README.md").write_text("# demo\n")
    (repo / "src" / "mod.py").write_text("x = 1\n")
    return repo
