"""Branch.run(): isolation, timeouts that bound wall time, output caps, kills, honest limits."""

from __future__ import annotations

import os
import random
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest

import branchagent as ba
from _support import alive
from branchagent import WorkspaceBranch
from branchagent._sandbox import _spawn
from branchagent._sandbox._run import isolation_available

pytestmark = pytest.mark.anyio

needs_isolation = pytest.mark.skipif(
    not isolation_available(),
    reason="unshare cannot create private mount and PID namespaces here "
    "(user namespaces not permitted)",
)
ISOLATE = [pytest.param(True, marks=needs_isolation, id="isolated"),
           pytest.param(False, id="unisolated")]


@asynccontextmanager
async def open_branch(repo: Path, backend_name: str) -> AsyncIterator[WorkspaceBranch]:
    async with ba.open_workspace(repo, backend=backend_name) as ws:
        yield await ws.fork("runner")


def token() -> str:
    """A sleep duration no other process on the machine uses: how we find our processes."""
    return f"30.{random.randrange(10**8, 10**9)}"


def live_pids(tok: str) -> list[int]:
    """Pids of live (not zombie) processes whose command line holds ``tok``."""
    out: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            status = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if tok.encode() in cmdline and status.rpartition(")")[2].split()[0] != "Z":
            out.append(int(entry))
    return out


def realpath(path: Path) -> str:
    return os.path.realpath(path)


async def wait_for_pids(tok: str, *, present: bool, within: float = 5.0) -> list[int]:
    deadline = time.monotonic() + within
    while True:
        pids = live_pids(tok)
        if bool(pids) == present or time.monotonic() > deadline:
            return pids
        await anyio.sleep(0.02)


# -- isolation ---------------------------------------------------------------------------


@needs_isolation
async def test_isolated_run_sees_the_branch_at_the_workspace_path(
    repo: Path, backend_name: str
) -> None:
    async with open_branch(repo, backend_name) as b:
        ws_path = b.workspace.path
        (b.path / "README.md").write_text("# branch\n")
        script = (f'pwd; cat README.md; cat "{ws_path}/README.md"; '
                  f'echo absolute > "{ws_path}/abs.txt"')
        r = await b.run(["sh", "-c", script])
        assert r.ok, r
        assert r.isolated
        assert r.stdout.splitlines() == [str(ws_path), "# branch", "# branch"]
        # The write through the workspace's absolute path landed in the branch ...
        assert (b.path / "abs.txt").read_text() == "absolute\n"
        # ... not in the base, which is untouched.
        assert not (repo / "abs.txt").exists()
        assert (repo / "README.md").read_text() == "# demo\n"
        changes = {c.path: c.kind for c in await b.changes()}
        assert changes == {"README.md": ba.ChangeKind.MODIFIED, "abs.txt": ba.ChangeKind.ADDED}


async def test_unisolated_run_has_the_branch_as_cwd(repo: Path, backend_name: str) -> None:
    async with open_branch(repo, backend_name) as b:
        r = await b.run(["sh", "-c", "pwd; cat README.md; echo rel > rel.txt"], isolate=False)
        assert r.ok, r
        assert not r.isolated
        assert r.stdout.splitlines() == [realpath(b.path), "# demo"]
        assert (b.path / "rel.txt").read_text() == "rel\n"
        assert not (repo / "rel.txt").exists()


async def test_isolation_unavailable_is_said_not_silent(
    repo: Path, backend_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_spawn, "isolation_available", lambda *a, **k: False)
    async with open_branch(repo, backend_name) as b:
        with pytest.raises(ba.IsolationUnavailable, match="isolate=False") as info:
            await b.run(["true"])
        assert isinstance(info.value, ba.SandboxError)
        r = await b.run(["true"], isolate=False)
        assert r.ok
        assert not r.isolated


@pytest.mark.parametrize("isolate", ISOLATE)
async def test_exit_codes_are_passed_through(
    repo: Path, backend_name: str, isolate: bool
) -> None:
    async with open_branch(repo, backend_name) as b:
        for code in (0, 1, 3, 125, 126, 127):
            r = await b.run(["sh", "-c", f"exit {code}"], isolate=isolate)
            assert r.returncode == code
            assert r.killed is None
            assert r.ok is (code == 0)
        r = await b.run(["sh", "-c", "echo out; echo err >&2; exit 2"], isolate=isolate)
        assert (r.returncode, r.stdout, r.stderr) == (2, "out\n", "err\n")
        assert r.argv == ("sh", "-c", "echo out; echo err >&2; exit 2")
        assert r.duration >= 0


# -- timeouts and kills ---------------------------------------------------------------------


@pytest.mark.parametrize("isolate", ISOLATE)
async def test_timeout_kills_the_whole_tree(repo: Path, backend_name: str, isolate: bool) -> None:
    tok = token()
    # A child in the background and a grandchild under a second shell, all sleeping 30 s.
    script = f'sleep {tok} & sh -c "sleep {tok}; :" & sleep {tok}; wait'
    deadline = 0.6
    async with open_branch(repo, backend_name) as b:
        started = time.monotonic()
        r = await b.run(["sh", "-c", script], isolate=isolate, limits=ba.Limits(timeout=deadline))
        elapsed = time.monotonic() - started
        assert r.killed == "timeout"
        assert not r.ok
        assert r.returncode != 0
        assert "timeout" in r.enforced
        assert deadline <= elapsed < deadline + 2.0, elapsed
        assert await wait_for_pids(tok, present=False, within=2.0) == []


async def test_timeout_argument_overrides_limits(repo: Path, backend_name: str) -> None:
    async with open_branch(repo, backend_name) as b:
        started = time.monotonic()
        r = await b.run(["sleep", token()], isolate=False, limits=ba.Limits(timeout=60),
                        timeout=0.3)
        assert r.killed == "timeout"
        assert time.monotonic() - started < 2.3


async def test_without_pidfd_a_thread_waits_and_timeouts_still_kill(
    repo: Path, backend_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Linux before 5.3 has no pidfd: the run is then awaited in a worker thread, and a
    timeout still ends it (and its tree) on time."""

    def no_pidfd(pid: int, flags: int = 0) -> int:
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(os, "pidfd_open", no_pidfd)
    tok = token()
    async with open_branch(repo, backend_name) as b:
        ok = await b.run(["sh", "-c", "echo hi; exit 3"], isolate=False)
        assert (ok.returncode, ok.stdout) == (3, "hi\n")
        started = time.monotonic()
        r = await b.run(["sh", "-c", f"sleep {tok} & sleep {tok}; wait"], isolate=False,
                        timeout=0.4)
        assert r.killed == "timeout"
        assert time.monotonic() - started < 2.4
        assert await wait_for_pids(tok, present=False, within=2.0) == []


async def test_runs_do_not_use_the_event_loops_own_spawn(
    repo: Path, backend_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run starts with Popen (vfork), not the loop's spawn: uvloop's forks the caller,
    whose cost grows with its memory (a verifier start took 5-10x longer in vLLM's server)."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("Branch.run used anyio.open_process")

    async with open_branch(repo, backend_name) as b:  # the FUSE daemon may start with it
        monkeypatch.setattr(anyio, "open_process", refuse)
        r = await b.run(["sh", "-c", "echo $0", "x"], isolate=False)
        assert (r.returncode, r.stdout) == (0, "x\n")


@pytest.mark.parametrize("isolate", ISOLATE)
async def test_aborting_the_branch_kills_a_run_in_flight(
    repo: Path, backend_name: str, isolate: bool
) -> None:
    tok = token()
    async with open_branch(repo, backend_name) as b:
        results: list[ba.RunResult] = []

        async def run() -> None:
            results.append(await b.run(["sh", "-c", f"sleep {tok} & sleep {tok}; wait"],
                                       isolate=isolate))

        started = time.monotonic()
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            assert await wait_for_pids(tok, present=True), "the run never started"
            await b.abort()
        (r,) = results
        assert r.killed == "aborted"
        assert not r.ok
        assert time.monotonic() - started < 8
        assert b.state is ba.BranchState.ABORTED
        assert await wait_for_pids(tok, present=False, within=2.0) == []


@pytest.mark.parametrize("isolate", ISOLATE)
async def test_cancelling_the_caller_kills_the_process(
    repo: Path, backend_name: str, isolate: bool
) -> None:
    tok = token()
    async with open_branch(repo, backend_name) as b:
        finished: list[ba.RunResult] = []

        async def run() -> None:
            finished.append(await b.run(["sh", "-c", f"sleep {tok} & sleep {tok}; wait"],
                                        isolate=isolate))

        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            pids = await wait_for_pids(tok, present=True)
            assert pids, "the run never started"
            tg.cancel_scope.cancel()
        assert finished == []
        # The direct children are reaped before the cancellation completes.
        assert await wait_for_pids(tok, present=False, within=2.0) == []
        for _ in range(100):  # killed by SIGKILL: gone (or a zombie) within moments
            if not any(alive(pid) for pid in pids):
                break
            await anyio.sleep(0.02)
        assert [pid for pid in pids if alive(pid)] == []
        # The branch itself is unharmed.
        assert b.state is ba.BranchState.OPEN
        r = await b.run(["true"], isolate=isolate)
        assert r.ok


# -- I/O ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("isolate", ISOLATE)
async def test_huge_output_is_capped_not_blocking(
    repo: Path, backend_name: str, isolate: bool
) -> None:
    async with open_branch(repo, backend_name) as b:
        started = time.monotonic()
        r = await b.run(["sh", "-c", "head -c 50000000 /dev/zero; echo done >&2"],
                        isolate=isolate, limits=ba.Limits(output="1M"), timeout=30)
        assert time.monotonic() - started < 20
        assert r.ok, r.stderr
        assert len(r.stdout) == 1 << 20
        assert r.stdout_truncated
        assert r.stderr == "done\n"
        assert not r.stderr_truncated
        assert "output" in r.enforced


async def test_default_output_cap(repo: Path, backend_name: str) -> None:
    async with open_branch(repo, backend_name) as b:
        r = await b.run(["head", "-c", str(12 << 20), "/dev/zero"], isolate=False)
        assert r.ok
        assert len(r.stdout) == ba.Limits().output == 10 << 20
        assert r.stdout_truncated
        r = await b.run(["head", "-c", str(12 << 20), "/dev/zero"], isolate=False,
                        limits=ba.Limits(output=None))
        assert len(r.stdout) == 12 << 20
        assert not r.stdout_truncated


@pytest.mark.parametrize("isolate", ISOLATE)
async def test_stdin_is_passed(repo: Path, backend_name: str, isolate: bool) -> None:
    async with open_branch(repo, backend_name) as b:
        r = await b.run(["cat"], isolate=isolate, stdin=b"hello\nworld\n")
        assert r.stdout == "hello\nworld\n"
        big = os.urandom(300_000)
        r = await b.run(["wc", "-c"], isolate=isolate, stdin=big)
        assert r.stdout.strip() == "300000"
        r = await b.run(["cat"], isolate=isolate)  # no stdin: empty, never the test's
        assert r.stdout == ""


@pytest.mark.parametrize("isolate", ISOLATE)
async def test_env_is_added(repo: Path, backend_name: str, isolate: bool) -> None:
    async with open_branch(repo, backend_name) as b:
        r = await b.run(["sh", "-c", 'echo "$BA_TEST_VAR"; echo "$PATH"'], isolate=isolate,
                        env={"BA_TEST_VAR": "some value"})
        lines = r.stdout.splitlines()
        assert lines[0] == "some value"
        assert lines[1] == os.environ["PATH"]  # added to, not replacing, the environment


@pytest.mark.parametrize("isolate", ISOLATE)
async def test_missing_executable(repo: Path, backend_name: str, isolate: bool) -> None:
    async with open_branch(repo, backend_name) as b:
        with pytest.raises(ba.SandboxError, match="no-such-program-xyz"):
            await b.run(["no-such-program-xyz", "arg"], isolate=isolate)
        with pytest.raises(ba.SandboxError, match="no-such-program-xyz"):
            await b.run(["no-such-program-xyz"], isolate=isolate,
                        limits=ba.Limits(memory="1G"))
        with pytest.raises(ba.SandboxError):
            await b.run(["./missing.sh"], isolate=isolate)
        # A script that exists only in the branch runs (relative to the branch).
        (b.path / "here.sh").write_text("#!/bin/sh\necho here\n")
        (b.path / "here.sh").chmod(0o755)
        r = await b.run(["./here.sh"], isolate=isolate)
        assert r.stdout == "here\n"
        assert b.state is ba.BranchState.OPEN


async def test_bad_argv(repo: Path, backend_name: str) -> None:
    async with open_branch(repo, backend_name) as b:
        with pytest.raises(ValueError, match="non-empty sequence"):
            await b.run([], isolate=False)
        with pytest.raises(ValueError, match="non-empty sequence"):
            await b.run("ls -l", isolate=False)


# -- limits: enforced or said not to be -------------------------------------------------------


def _claimed(r: ba.RunResult, name: str) -> bool:
    enforced = any(e == name or e.startswith(name + ":") for e in r.enforced)
    not_enforced = name in r.not_enforced
    assert enforced != not_enforced, f"{name}: enforced={r.enforced} not={r.not_enforced}"
    return enforced


async def test_pids_cpu_network_are_enforced_or_reported(
    repo: Path, backend_name: str
) -> None:
    async with open_branch(repo, backend_name) as b:
        # 30 concurrent sleepers under a limit of 8 processes.
        forker = "for i in $(seq 30); do sleep 0.3 & done; wait"
        r = await b.run(["sh", "-c", forker], isolate=False,
                        limits=ba.Limits(pids=8, cpu=0.5, network=False), timeout=20)
        if _claimed(r, "pids"):
            assert r.returncode != 0 or r.stderr, "pids claimed enforced, yet 30 forks worked"
        _claimed(r, "cpu")
        _claimed(r, "network")
        r = await b.run(["true"], isolate=False)
        assert r.not_enforced == frozenset()


async def test_memory_limit_is_enforced(repo: Path, backend_name: str) -> None:
    async with open_branch(repo, backend_name) as b:
        hog = [sys.executable, "-c", "x = bytearray(1 << 30); print('allocated')"]
        r = await b.run(hog, isolate=False, limits=ba.Limits(memory="256M"), timeout=60)
        assert _claimed(r, "memory")
        assert not r.ok
        assert "allocated" not in r.stdout
        r = await b.run([sys.executable, "-c", "x = bytearray(1 << 20); print('small')"],
                        isolate=False, limits=ba.Limits(memory="256M"))
        assert r.ok, r.stderr
        assert r.stdout == "small\n"
