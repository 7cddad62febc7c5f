"""The ``branchagent`` command tells the truth: ``commit`` names the branches it made void,
``status`` shows the real tree and no path that does not exist, and ``/`` is refused
with a message that says what to do. Real subprocesses, real workspaces."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from _support import requires_fuse, snapshot

SCRIPT = Path(sys.executable).with_name("branchagent")
CLI: list[str] = [os.fspath(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m",
                                                                "branchagent.cli"]

#: Branches forked so that creation order is not tree order: a child (``a-kid``) is made
#: after a later sibling of its parent (``b``), and ``b-kid`` last.
MAKE_TREE = textwrap.dedent("""
    import sys, anyio, branchagent as ba

    async def main() -> None:
        async with ba.open_workspace(sys.argv[1], backend=sys.argv[2],
                                     keep_branches=True) as ws:
            a = await ws.fork("a")
            (a.path / "a.txt").write_text("a\\n")
            b = await ws.fork("b")
            c = await ws.fork("c")
            kid = await a.fork("a-kid")
            (kid.path / "kid.txt").write_text("kid\\n")
            await b.fork("b-kid")
            if sys.argv[3] == "hold":
                print("ready", flush=True)
                sys.stdin.read()  # hold the workspace until the test closes stdin

    anyio.run(main)
""")

TREE = [("a", None, 0), ("a-kid", "a", 1), ("b", None, 0), ("b-kid", "b", 1), ("c", None, 0)]


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=cwd,
                          timeout=60, check=False, stdin=subprocess.DEVNULL)


def make_tree(repo: Path, backend: str) -> None:
    r = subprocess.run([sys.executable, "-c", MAKE_TREE, os.fspath(repo), backend, "keep"],
                       capture_output=True, text=True, check=False, timeout=60)
    assert r.returncode == 0, r.stderr


@pytest.fixture
def held(repo: Path) -> Iterator[Path]:
    """``repo`` with the tree of MAKE_TREE, held open by another process."""
    proc = subprocess.Popen([sys.executable, "-c", MAKE_TREE, os.fspath(repo), "copy", "hold"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # structlog's default prints its lines here too
            if line == "ready\n":
                break
        else:
            pytest.fail("the holder ended before it held the workspace")
        yield repo
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=60)
        if proc.stdout is not None:
            proc.stdout.close()


def check_text_tree(stdout: str) -> None:
    """Each indented branch line sits under its real parent: the nearest line above it
    indented one step less is the parent's."""
    lines = [line for line in stdout.splitlines()[1:] if line.startswith("  ")
             and not line.strip().startswith(("(", "no branches"))]
    got = []
    for line in lines:
        depth = (len(line) - len(line.lstrip(" "))) // 2 - 1
        got.append((line.split()[0], depth))
    assert got == [(name, depth) for name, _, depth in TREE], stdout
    stack: list[str] = []
    parent_of = {name: parent for name, parent, _ in TREE}
    for name, depth in got:
        del stack[depth:]
        assert (stack[-1] if stack else None) == parent_of[name], (name, stdout)
        stack.append(name)


def rows_of(doc: dict[str, Any]) -> list[tuple[str, str | None, int]]:
    return [(row["name"], row["parent"], row["depth"]) for row in doc["branches"]]


# -- commit ------------------------------------------------------------------------------


def test_commit_lists_the_branches_it_invalidated(repo: Path) -> None:
    make_tree(repo, "copy")
    r = cli("-w", os.fspath(repo), "--json", "commit", "b")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["committed"] == "b"
    # b's siblings, their branches, and b's own open branch: all void now, all named
    assert sorted(doc["invalidated"]) == ["a", "a-kid", "b-kid", "c"]
    status = json.loads(cli("-w", os.fspath(repo), "--json", "status").stdout)
    assert status["branches"] == []  # the JSON told the whole story


def test_commit_text_names_the_invalidated_siblings(repo: Path) -> None:
    make_tree(repo, "copy")
    before = snapshot(repo)
    r = cli("-w", os.fspath(repo), "commit", "a-kid")  # into a: no sibling, nothing void
    assert r.returncode == 0, r.stderr
    assert "invalidated" not in r.stdout
    assert snapshot(repo) == before
    r = cli("-w", os.fspath(repo), "commit", "c")
    assert r.returncode == 0, r.stderr
    assert "committed c into the base" in r.stdout
    assert "invalidated 3 other branch(es)" in r.stdout
    named = r.stdout.split("(first commit wins): ", 1)[1].strip().split(", ")
    assert sorted(named) == ["a", "b", "b-kid"]


def test_a_conflicting_commit_invalidates_nothing(repo: Path) -> None:
    make_tree(repo, "copy")
    r = cli("-w", os.fspath(repo), "commit", "a-kid")
    assert r.returncode == 0, r.stderr
    (repo / "a.txt").write_text("the base wrote it first\n")
    r = cli("-w", os.fspath(repo), "--json", "commit", "a")
    assert r.returncode == 1, r.stderr
    doc = json.loads(r.stdout)
    assert doc["committed"] is None
    assert doc["invalidated"] == []
    names = {row["name"] for row in json.loads(
        cli("-w", os.fspath(repo), "--json", "status").stdout)["branches"]}
    assert names == {"a", "b", "b-kid", "c"}


# -- status ------------------------------------------------------------------------------


def test_status_shows_children_under_their_real_parent(repo: Path) -> None:
    make_tree(repo, "copy")
    doc = json.loads(cli("-w", os.fspath(repo), "--json", "status").stdout)
    assert rows_of(doc) == TREE
    check_text_tree(cli("-w", os.fspath(repo), "status").stdout)


def test_status_of_a_held_workspace_shows_the_real_tree(held: Path) -> None:
    r = cli("-w", os.fspath(held), "--json", "status")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["in_use"] is True
    assert rows_of(doc) == TREE
    assert doc["mounted"] is None  # another process holds it: not known from here
    human = cli("-w", os.fspath(held), "status")
    assert "in use by another branchagent process" in human.stdout
    check_text_tree(human.stdout)


def test_status_shows_copy_paths_that_exist(repo: Path) -> None:
    make_tree(repo, "copy")
    doc = json.loads(cli("-w", os.fspath(repo), "--json", "status").stdout)
    assert doc["mounted"] is True
    for row in doc["branches"]:
        assert row["mounted"] is True
        assert Path(row["path"]).is_dir(), row  # the copy backend's trees stay on disk
    assert (Path(doc["branches"][0]["path"]) / "a.txt").read_text() == "a\n"


@requires_fuse
def test_status_hides_mount_paths_while_nobody_has_the_workspace_open(repo: Path) -> None:
    make_tree(repo, "fuse")
    r = cli("-w", os.fspath(repo), "--json", "status")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["backend"] == "fuse"
    assert rows_of(doc) == TREE
    assert doc["mounted"] is False
    for row in doc["branches"]:
        assert row["path"] is None, row
        assert row["mounted"] is False
    human = cli("-w", os.fspath(repo), "status")
    assert "(not mounted: no process has the workspace open" in human.stdout
    assert "/fuse/mnt/" not in human.stdout  # no path that does not exist
    check_text_tree(human.stdout)


# -- the filesystem root -----------------------------------------------------------------


@pytest.mark.parametrize("command", [["status"], ["run", "--", "true"], ["abort", "--all"]])
def test_running_from_the_root_says_what_to_do(command: list[str]) -> None:
    existed = os.path.lexists("/..branchagent")
    r = cli("--backend", "copy", *command, cwd=Path("/"))
    assert r.returncode == 2, r.stdout + r.stderr
    assert "cannot make the whole filesystem a workspace" in r.stderr
    assert "cd into a project directory" in r.stderr
    assert "must not be inside" not in r.stderr
    assert os.path.lexists("/..branchagent") == existed
