"""Crash safety of a commit into the base on the FUSE backend, with real SIGKILLs.

An agent process (this module, run with ``python -c``) opens a workspace with
``backend="fuse"``, forks a branch, makes some fifty changes through the
branch's path (adds, edits, deletions, a new directory with a subdirectory
and an empty one, a removed directory, a directory turned into a file and
back, symlinks, modes) and commits it. The filesystem process is SIGKILLed
at a chosen journal step (a fault hook ``kill:<n>``, injected by starting the
server through ``tests/_fuse_fault.py``), or the agent
is SIGKILLed while the commit is under way. The workspace is then reopened
(recovery runs) and the base must be exactly the tree before the commit or
exactly the tree after it: before when the kill came before ``done`` was
written, after from ``done`` on; a rolled-back branch is listed again with
its changes and still commits, a committed one never comes back; nothing
stays mounted. This is the quick CI subset; ``bench/bench_fuse_crash.py``
runs hundreds of randomized trials.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import pytest
import structlog

import branchagent as ba
from _fuse_fault import FAULT_ENV, fault_server
from _support import Tree, alive, requires_fuse, tree_state
from branchagent._backends.fuse._backend import FuseBackend, is_mounted

HERE = Path(__file__).resolve().parent
#: Exit statuses of the agent.
COMMITTED, FAILED_CLOSED, FAILED_EXITED = 0, 3, 4


pytestmark = [pytest.mark.anyio, requires_fuse]


@pytest.fixture
def anyio_backend() -> str:
    """Crash tests drive subprocesses; one event loop is enough."""
    return "asyncio"


# -- the trees -------------------------------------------------------------------------------------


def build_base(root: Path) -> None:
    rnd = random.Random(1)
    for k in range(3):
        for j in range(20):
            p = root / "src" / f"pkg{k}" / ("sub/" if j % 4 == 0 else "") / f"mod{j}.py"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(rnd.randbytes(rnd.randint(20, 3000)))
    for j in range(6):
        p = root / "old" / ("a/b" if j % 2 else "") / f"legacy{j}.txt"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(f"legacy {j}\n")
    (root / "dir2file").mkdir()
    (root / "dir2file" / "x.txt").write_text("x\n")
    (root / "file2dir").write_text("I was a file\n")
    (root / "README.md").write_text("# crash\n")
    (root / "run.sh").write_text("#!/bin/sh\n")
    (root / "link").symlink_to("README.md")
    (root / "src" / "pkg1").chmod(0o750)


def mutate(b: Path) -> None:
    """About fifty changes of every kind, made through the branch's path."""
    rnd = random.Random(2)
    for j in range(10):  # a new directory, a subdirectory, an empty one
        p = b / "new" / ("deep" if j % 2 else "") / f"n{j}.txt"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(rnd.randbytes(rnd.randint(1, 2000)))
    (b / "new" / "empty").mkdir()
    for k in range(3):
        for j in range(1, 20, 4):  # edits
            (b / "src" / f"pkg{k}" / f"mod{j}.py").write_bytes(rnd.randbytes(100 + j))
        for j in range(2, 20, 8):  # deletions
            (b / "src" / f"pkg{k}" / f"mod{j}.py").unlink()
        (b / "src" / f"pkg{k}" / "sub" / "mod4.py").write_text("edited in sub\n")
        for j in range(3):  # additions beside existing files
            (b / "src" / f"pkg{k}" / f"added{j}.py").write_text(f"added {k} {j}\n")
    shutil.rmtree(b / "old")  # a removed directory (a nested one inside)
    shutil.rmtree(b / "dir2file")
    (b / "dir2file").write_text("now a file\n")
    (b / "file2dir").unlink()
    (b / "file2dir").mkdir()
    (b / "file2dir" / "inner.txt").write_text("now inside a directory\n")
    (b / "run.sh").chmod(0o755)
    (b / "src" / "pkg1").chmod(0o755)
    (b / "link").unlink()
    (b / "link").symlink_to("run.sh")
    (b / "new_link").symlink_to("src/pkg0/mod0.py")


def journal_steps(before: Tree, after: Tree) -> int:
    """Journal steps of the commit before -> after: intent, one per op, done, cleaned.

    One op per changed entry, except the insides of a directory removed or replaced
    whole (``_journal.build_plan``); the server's log confirms the count.
    """
    changed = [p for p in before.keys() | after.keys() if before.get(p) != after.get(p)]
    gone = tuple(p + "/" for p in changed
                 if before.get(p, ("",))[0] == "dir" and after.get(p, ("",))[0] != "dir")
    return len([p for p in changed if not p.startswith(gone)]) + 3


# -- the agent process -----------------------------------------------------------------------------


def agent(argv: list[str]) -> None:
    """The agent: fork, mutate through the branch's path, commit. See the module docstring."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
                        logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    sys.exit(anyio.run(_agent, Path(argv[0]), Path(argv[1]), argv[2]))


async def _agent(repo: Path, state: Path, on_error: str) -> int:
    backend = FuseBackend(server=fault_server(os.environ.get(FAULT_ENV)))
    async with ba.open_workspace(repo, backend=backend, state_dir=state,
                                 keep_branches=True) as ws:
        print("SERVER", ws.backend.server_pid, flush=True)  # type: ignore[attr-defined]
        b = await ws.fork("b")
        await anyio.to_thread.run_sync(mutate, b.path)
        print("COMMITTING", flush=True)
        try:
            await b.commit()
        except ba.BackendError as exc:
            print("FAILED", type(exc).__name__, flush=True)
            if on_error == "exit":  # die on the spot, closing nothing
                os._exit(FAILED_EXITED)
            return FAILED_CLOSED  # close the workspace normally (branches kept)
        print("COMMITTED", flush=True)
    return COMMITTED


#: The agent imports this module (sys.argv[1] is its folder) and the helpers one level up.
_RUN_AGENT = ("import os, sys; sys.path[:0] = [sys.argv[1], os.path.dirname(sys.argv[1])]; "
              "import test_fuse_crash; test_fuse_crash.agent(sys.argv[2:])")


class Case:
    """A workspace with the base built, the before- and after-trees known."""

    def __init__(self, base: Path) -> None:
        self.repo = base / "repo"
        self.state = base / "state"
        self.repo.mkdir(parents=True)
        build_base(self.repo)
        self.before = tree_state(self.repo)
        expected = base / "expected"
        shutil.copytree(self.repo, expected, symlinks=True)
        mutate(expected)
        self.after = tree_state(expected)
        shutil.rmtree(expected)
        self.steps = journal_steps(self.before, self.after)
        self.server_pid = 0

    @contextmanager
    def agent(self, fault: str | None, on_error: str = "close") -> Iterator[subprocess.Popen[str]]:
        """Start the agent; returns once it is about to call ``commit()``."""
        env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
        if fault is not None:
            env[FAULT_ENV] = fault
        with subprocess.Popen(
                [sys.executable, "-c", _RUN_AGENT, os.fspath(HERE), os.fspath(self.repo),
                 os.fspath(self.state), on_error],
                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True) as proc:
            try:
                assert proc.stdout is not None
                first = proc.stdout.readline().split()
                assert first[:1] == ["SERVER"], f"the agent did not start: {first}"
                self.server_pid = int(first[1])
                assert proc.stdout.readline().strip() == "COMMITTING"
                yield proc
            finally:
                if proc.poll() is None:
                    proc.kill()
                proc.wait(timeout=60)

    def server_killed_at(self) -> str:
        """The journal step the fault hook killed the filesystem process at (from its log)."""
        text = (self.state / "fuse" / "server.log").read_text(errors="replace")
        found = re.findall(r"fault hook: kill at journal step \d+ \((\S+)\)", text)
        return found[-1] if found else ""

    def journal(self) -> list[str]:
        d = self.state / "journal"
        return sorted(os.listdir(d)) if d.is_dir() else []


async def wait_gone(pid: int, timeout: float = 20) -> None:
    with anyio.fail_after(timeout):
        while alive(pid):  # noqa: ASYNC110 - another process: nothing to wait on
            await anyio.sleep(0.01)


async def check_reopened(case: Case, expect: str) -> None:
    """Reopen (recovery runs): the base is exactly the ``expect``-tree, the branch listed
    again with its changes (before) or gone (after); then nothing is left behind."""
    want = case.after if expect == "after" else case.before
    async with ba.open_workspace(case.repo, backend="fuse", state_dir=case.state) as ws:
        new_server = ws.backend.server_pid  # type: ignore[attr-defined]
        assert case.journal() == [], "recovery left a transaction"
        got = tree_state(case.repo)
        if got != want:
            other = "before" if expect == "after" else "after"
            other_tree = case.before if expect == "after" else case.after
            diff = sorted(p for p in got.keys() | want.keys() if got.get(p) != want.get(p))
            pytest.fail(f"the base is not the {expect}-tree"
                        + (f" but the {other}-tree" if got == other_tree else
                           f" ({len(diff)} paths differ: {diff[:6]})"))
        names = [b.name for b in ws.branches()]
        if expect == "after":
            assert names == [], "a committed branch came back"
        else:
            assert names == ["b"], "the rolled-back branch is not listed again"
            b = ws.get("b")
            assert tree_state(b.path) == case.after, "the branch lost changes"
            await b.commit()
            assert tree_state(case.repo) == case.after
    await wait_gone(new_server)
    assert not is_mounted(case.state / "fuse" / "mnt"), "a mount was left behind"
    for sub in ("branches", "layers"):
        assert os.listdir(case.state / "fuse" / sub) == [], f"storage left in {sub}"


# -- the filesystem process killed at a chosen journal step ----------------------------------------


def _step(where: str, steps: int) -> tuple[int, str]:
    """(n, the step's name) for a symbolic place in a commit of ``steps`` journal steps."""
    n = {"intent": 1, "first-op": 2, "middle-op": steps // 2, "last-op": steps - 2,
         "done": steps - 1, "cleaned": steps}[where]
    name = {1: "intent", steps - 1: "done", steps: "cleaned"}.get(n, f"op:{n - 2}")
    return n, name


@pytest.mark.parametrize(("where", "on_error", "expect"), [
    ("intent", "close", "before"),
    ("first-op", "exit", "before"),
    ("middle-op", "close", "before"),
    ("last-op", "exit", "before"),
    ("done", "close", "after"),
    ("cleaned", "exit", "after"),
])
async def test_server_killed_at_a_journal_step(
        tmp_path: Path, where: str, on_error: str, expect: str) -> None:
    """A kill before ``done`` is written rolls back; at or after ``done`` the commit stands.
    The agent sees the commit fail and then closes normally or dies on the spot."""
    case = Case(tmp_path)
    assert case.steps >= 40, case.steps
    n, name = _step(where, case.steps)
    with case.agent(f"kill:{n}", on_error) as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline().split() == ["FAILED", "BackendError"]
        assert proc.wait(timeout=60) == (FAILED_EXITED if on_error == "exit" else FAILED_CLOSED)
    await wait_gone(case.server_pid)
    assert case.server_killed_at() == name, f"expected a kill at step {n} ({name})"
    assert case.journal() != [] or name == "cleaned", "the crash left no transaction"
    await check_reopened(case, expect)


async def test_uninterrupted_commit_passes_every_step(tmp_path: Path) -> None:
    """The step count the other tests rely on: the last step is ``cleaned``, and the
    commit applies the after-tree."""
    case = Case(tmp_path)
    mark = tmp_path / "mark"
    with case.agent(f"mark:{case.steps}:{mark}") as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "COMMITTED"
        assert proc.wait(timeout=60) == COMMITTED
    assert mark.read_text() == "cleaned"
    assert tree_state(case.repo) == case.after


# -- the agent killed while its commit is under way ------------------------------------------------


async def test_agent_killed_mid_apply_the_commit_completes(tmp_path: Path) -> None:
    """The agent dies while the filesystem process is halfway through the journal: that
    process finishes the commit on its own before it goes, so the base is the after-tree."""
    case = Case(tmp_path)
    mark = tmp_path / "mark"
    n, _ = _step("middle-op", case.steps)
    with case.agent(f"mark:{n}:{mark}") as proc:
        with anyio.fail_after(30):
            while not mark.exists() and proc.poll() is None:  # noqa: ASYNC110
                await anyio.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    assert mark.read_text() == f"op:{n - 2}"
    # Reopen once the old filesystem process is gone: reopening while it still applies
    # the commit is test_reopen_waits_for_the_old_server_before_recovering.
    await wait_gone(case.server_pid)
    await check_reopened(case, "after")


async def test_agent_killed_while_the_server_is_stopped_after_intent(tmp_path: Path) -> None:
    """The agent dies while the filesystem process is held just after the intent is
    durable; let go, that process completes the commit and exits."""
    case = Case(tmp_path)
    go = tmp_path / "go"
    with case.agent(f"wait:1:{go}") as proc:
        reached = Path(f"{go}.reached")
        with anyio.fail_after(30):
            while not reached.exists():  # noqa: ASYNC110, ASYNC240 - another process
                await anyio.sleep(0.005)
        assert reached.read_text() == "intent"  # noqa: ASYNC240 - a tmp file, instant
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    assert alive(case.server_pid), "the filesystem process died with the agent mid-commit"
    assert tree_state(case.repo) == case.before, "the held commit changed the base"
    go.touch()
    await wait_gone(case.server_pid)
    assert tree_state(case.repo) == case.after
    await check_reopened(case, "after")


@pytest.mark.parametrize("seed", [1, 2])
async def test_agent_killed_at_a_random_time_in_commit(tmp_path: Path, seed: int) -> None:
    """A kill at a random instant after the agent calls ``commit()``: whichever side
    of the request it lands on, the base is exactly before (and the branch listed) or
    exactly after (and the branch gone)."""
    case = Case(tmp_path)
    with case.agent(None) as proc:
        await anyio.sleep(random.Random(seed).uniform(0, 0.03))
        proc.send_signal(signal.SIGKILL)
        rc = proc.wait(timeout=30)
        assert rc in (-signal.SIGKILL, COMMITTED)
    await wait_gone(case.server_pid)
    expect = "after" if tree_state(case.repo) == case.after else "before"
    await check_reopened(case, expect)


async def test_reopen_waits_for_the_old_server_before_recovering(tmp_path: Path) -> None:
    """Reopening at once after the agent died, while its filesystem process is still in
    the middle of the commit, must leave that commit alone until the process is gone:
    recovery of a transaction whose writer is alive corrupts the base."""
    case = Case(tmp_path)
    go = tmp_path / "go"
    n, name = _step("middle-op", case.steps)
    with case.agent(f"wait:{n}:{go}") as proc:
        reached = Path(f"{go}.reached")
        with anyio.fail_after(30):
            while not reached.exists():  # noqa: ASYNC110, ASYNC240 - another process
                await anyio.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    txn = case.journal()
    assert len(txn) == 1, txn
    failed: list[BaseException] = []

    async def reopen() -> None:  # to its end: cancelling an open half-way leaks its socket
        try:
            await check_reopened(case, "after")
        except (AssertionError, pytest.fail.Exception) as exc:
            failed.append(exc)

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(reopen)
            with anyio.move_on_after(5):  # the old process is held all along
                while case.journal() == txn:  # noqa: ASYNC110 - the reopen's thread acts
                    await anyio.sleep(0.01)
            seen, base = case.journal(), _which(case)
            go.touch()  # let the old process go on, whatever the reopen did meanwhile
    finally:
        go.touch()
        await wait_gone(case.server_pid)
    assert seen == txn, (
        f"recovery touched the transaction of a live filesystem process (held at {name}): "
        f"the base became {base}")
    if failed:
        raise failed[0]


def _which(case: Case) -> str:
    got = tree_state(case.repo)
    return "the before-tree" if got == case.before else (
        "the after-tree" if got == case.after else "neither tree")

