"""Inode numbers in a FUSE branch: a file the branch has not changed shows the base file's
inode number, so tools that remember inode numbers (git's index) see the files they knew;
every file of a branch has its own number, and the names of one hard-linked file share one.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import anyio
import pytest

import branchagent as ba
from _support import requires_fuse
from branchagent._backends.fuse import _fs

pytestmark = [pytest.mark.anyio, requires_fuse]

_GIT_ENV = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid",
            "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid",
            "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_CONFIG_NOSYSTEM": "1"}


def _inodes(root: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            out[str(p.relative_to(root))] = p.lstat().st_ino
    return out


def test_the_pyfuse3_entry_layout_is_understood() -> None:
    # The number stat() shows is written next to the node id; a layout we do not recognise
    # would turn the feature off (and the tests below would fail), never write elsewhere.
    assert _fs._ATTR_INO is not None


async def test_unchanged_files_show_the_base_inode_and_every_file_its_own(repo: Path) -> None:
    (repo / "src" / "hard").hardlink_to(repo / "src" / "pkg" / "mod.py")
    base = _inodes(repo)
    async with ba.open_workspace(repo, backend="fuse", state_dir=repo.parent / "state") as ws:
        b = await ws.fork()
        assert _inodes(b.path) == base
        (b.path / "README.md").write_text("changed\n")
        (b.path / "new.txt").write_text("new\n")
        (b.path / "new2").hardlink_to(b.path / "new.txt")
        (b.path / "run.sh").unlink()
        seen = _inodes(b.path)
        assert seen["README.md"] != base["README.md"]
        assert seen["new.txt"] == seen["new2"]
        assert seen["src/hard"] == seen["src/pkg/mod.py"]
        files = {k: v for k, v in seen.items() if k not in ("new2", "src/hard")}
        assert len(set(files.values())) == len(files), seen
        # A child branch sees its parent's files under the same numbers.
        c = await b.fork()
        assert _inodes(c.path) == seen
        await c.abort()
        await b.abort()


def _committed(repo: Path) -> None:
    # Files written in the same second as the index are "racily clean" to git, which then
    # hashes them and rewrites its index anywhere; a repository a user works in is older.
    for p in [repo, *repo.rglob("*")]:
        os.utime(p, (1_700_000_000, 1_700_000_000), follow_symlinks=False)
    subprocess.run("git init -q && git add -A && git commit -qm init", shell=True, cwd=repo,
                   env=_GIT_ENV, check=True)
    subprocess.run(["git", "status", "--porcelain"], cwd=repo, env=_GIT_ENV, check=True)


async def test_git_status_in_a_fresh_branch_rewrites_nothing(repo: Path) -> None:
    _committed(repo)
    async with ba.open_workspace(repo, backend="fuse", state_dir=repo.parent / "state") as ws:
        b = await ws.fork()
        out = await anyio.run_process(["git", "status", "--porcelain"], cwd=b.path,
                                      env=_GIT_ENV)
        assert out.stdout == b""
        # git rewrites its index when a file's recorded inode (or times) differ from what
        # lstat() shows, after hashing the file again; nothing was different.
        assert [c.path for c in await b.changes()] == []
        await b.abort()
