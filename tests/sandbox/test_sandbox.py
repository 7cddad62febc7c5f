"""Branch.call (a Python callable in the branch's sandbox), pause/resume, and the
sandbox's hygiene: no file descriptor leaks, nothing left running after an abort or
a cancellation.

Processes are found by a unique token passed in their environment, which every
process of a run's tree inherits.
"""

from __future__ import annotations

import inspect
import os
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import cloudpickle  # type: ignore[import-untyped]
import pytest

import branchagent as ba
from branchagent import WorkspaceBranch
from branchagent._sandbox import _cgroup
from branchagent._sandbox._run import isolation_available

# The callables below travel to the child by value: this test module is not importable there.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.anyio

needs_isolation = pytest.mark.skipif(
    not isolation_available(),
    reason="needs private mount and PID namespaces (unshare --mount --pid): not permitted here",
)
ISOLATE = [pytest.param(True, marks=needs_isolation, id="isolated"),
           pytest.param(False, id="unisolated")]
TOKEN_VAR = "BRANCHAGENT_SANDBOX_TOKEN"
NO_CGROUPS = _cgroup.CgroupHost(None, frozenset(), False, {})


@asynccontextmanager
async def open_branch(repo: Path) -> AsyncIterator[WorkspaceBranch]:
    with anyio.fail_after(60):
        async with ba.open_workspace(repo, backend="copy") as ws:
            yield await ws.fork("callee")


def new_token() -> str:
    return f"sandbox-{uuid.uuid4().hex}"


def tree_pids(tok: str) -> list[int]:
    """Live (not zombie) processes whose environment holds ``tok``."""
    needle = tok.encode()
    out: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            if needle not in Path(f"/proc/{entry}/environ").read_bytes():
                continue
            state = Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if state not in ("Z", "X"):
            out.append(int(entry))
    return out


async def wait_pids(tok: str, *, present: bool, within: float = 5.0) -> list[int]:
    deadline = time.monotonic() + within
    while True:
        pids = tree_pids(tok)
        if bool(pids) == present or time.monotonic() > deadline:
            return pids
        await anyio.sleep(0.02)


def open_fds() -> list[str]:
    return sorted(os.listdir("/proc/self/fd"))


# -- callables sent to the child ---------------------------------------------------------------


class CandidateFailed(Exception):
    """A picklable exception of a type the child does not know by import."""


class Unpicklable(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()  # cannot be pickled


def describe(branch: object, size: int) -> tuple[str, str, int, bytes]:
    b: ba.Branch = branch  # type: ignore[assignment]
    payload = (b"0123456789abcdef" * (size // 16 + 1))[:size]
    return b.name, str(b.path), b.depth if hasattr(b, "depth") else -1, payload


async def adescribe(branch: object, x: int) -> tuple[str, str, str, int]:
    import sniffio

    await anyio.sleep(0.01)
    b: ba.Branch = branch  # type: ignore[assignment]
    return b.name, str(b.path), sniffio.current_async_library(), x * 2


def fail(_branch: object, kind: str) -> None:
    if kind == "value":
        raise ValueError("boom 42")
    if kind == "custom":
        raise CandidateFailed("candidate failed", 7)
    raise Unpicklable("holds a lock")


def return_a_lock(_branch: object) -> object:
    return threading.Lock()


def hog(_branch: object) -> int:
    x = bytearray(1 << 30)
    return len(x)


def sleep_forever(_branch: object, with_child: bool) -> None:
    import subprocess

    if with_child:
        subprocess.Popen(["sleep", "3600"])  # a grandchild: must die with the call
    time.sleep(3600)


# -- values and exceptions ----------------------------------------------------------------------


def assert_names_the_frame(tb: str, source: str) -> None:
    """``tb`` shows ``fail``'s frame by its real file and line, then that line's source.

    Not the exact text around it: Python 3.13 dropped the ``^^^`` marks under a
    whole-line call, and cloudpickle 3.1.3 renamed code sent by value "<dynamic-code>"
    (Branch.call keeps the name).
    """
    lines, first = inspect.getsourcelines(fail)
    lineno = first + next(i for i, line in enumerate(lines) if source in line)
    frame = f'  File "{fail.__code__.co_filename}", line {lineno}, in fail\n    {source}\n'
    assert frame in tb, f"no frame {frame!r} in the traceback:\n{tb}"


@pytest.mark.parametrize("isolate", ISOLATE)
async def test_call_returns_a_10mb_value(repo: Path, isolate: bool) -> None:
    async with open_branch(repo) as b:
        size = 10 << 20
        name, path, depth, payload = await b.call(describe, size, isolate=isolate)
        assert (name, depth) == ("callee", 0)
        assert path == str(b.workspace.path if isolate else b.path)
        assert len(payload) == size
        assert payload == (b"0123456789abcdef" * (size // 16 + 1))[:size]


@pytest.mark.parametrize("isolate", ISOLATE)
async def test_async_callables_run_on_the_callers_event_loop_kind(
    repo: Path, isolate: bool, anyio_backend: str
) -> None:
    async with open_branch(repo) as b:
        name, path, library, doubled = await b.call(adescribe, 21, isolate=isolate)
        assert (name, library, doubled) == ("callee", anyio_backend, 42)
        assert path == str(b.workspace.path if isolate else b.path)


@pytest.mark.parametrize("isolate", ISOLATE)
async def test_call_reraises_the_original_exception_with_its_traceback(
    repo: Path, isolate: bool
) -> None:
    async with open_branch(repo) as b:
        with pytest.raises(ValueError, match="boom 42") as info:
            await b.call(fail, "value", isolate=isolate)
        notes = "\n".join(getattr(info.value, "__notes__", []))
        assert "raised in an isolated process" in notes
        # The child's traceback: the candidate's own frame, with its file and source line
        # (`fail` travels by value), ending with the exception.
        assert_names_the_frame(notes, 'raise ValueError("boom 42")')
        assert notes.rstrip().endswith("\nValueError: boom 42")
        with pytest.raises(CandidateFailed) as custom:
            await b.call(fail, "custom", isolate=isolate)
        assert type(custom.value) is CandidateFailed
        assert custom.value.args == ("candidate failed", 7)
        assert b.state is ba.BranchState.OPEN


@pytest.mark.parametrize("isolate", ISOLATE)
async def test_unpicklable_exception_or_value_is_a_remote_error(
    repo: Path, isolate: bool
) -> None:
    async with open_branch(repo) as b:
        with pytest.raises(ba.RemoteError) as info:
            await b.call(fail, "unpicklable", isolate=isolate)
        assert isinstance(info.value, ba.SandboxError)
        assert info.value.type_name.endswith(".Unpicklable")
        assert "holds a lock" in str(info.value)
        tb = info.value.traceback
        assert_names_the_frame(tb, 'raise Unpicklable("holds a lock")')
        assert tb.rstrip().endswith(f"\n{Unpicklable.__module__}.Unpicklable: holds a lock")
        with pytest.raises(ba.RemoteError) as value:
            await b.call(return_a_lock, isolate=isolate)
        assert value.value.type_name == "TypeError"
        assert "cannot be pickled" in str(value.value)


@pytest.mark.parametrize("isolate", ISOLATE)
async def test_call_killed_by_its_memory_limit_raises_process_killed(
    repo: Path, isolate: bool
) -> None:
    h = _cgroup.host()
    if "memory" not in h.v2_controllers and "memory" not in h.v1:
        pytest.skip(f"no cgroup memory controller here (v2 memory.max or v1 memory): "
                    f"{h.describe()}; the rlimit fallback test covers this host")
    async with open_branch(repo) as b:
        with pytest.raises(ba.ProcessKilled) as info:
            await b.call(hog, isolate=isolate, limits=ba.Limits(memory="64M"))
        assert isinstance(info.value, ChildProcessError)
        assert getattr(info.value.result, "killed", None) == "memory"
        assert "memory" in str(info.value)


async def test_call_under_the_rlimit_fallback_gets_memory_error(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_cgroup, "_host", NO_CGROUPS)
    async with open_branch(repo) as b:
        with pytest.raises(MemoryError):
            await b.call(hog, isolate=False, limits=ba.Limits(memory="256M"))


# -- hygiene: descriptors, aborts, cancellation ---------------------------------------------------


async def test_no_file_descriptor_leaks_across_1000_runs(repo: Path) -> None:
    async with open_branch(repo) as b:
        limits = ba.Limits(memory="256M", pids=64, cpu=1.0, timeout=30)
        isolated = isolation_available()
        for i in range(8):  # warm up: lazily opened descriptors (thread pool, /dev/null)
            await b.run(["true"], isolate=isolated and i % 2 == 0, limits=limits)
        await b.call(describe, 10, isolate=False)
        before = open_fds()
        limiter = anyio.CapacityLimiter(8)
        failures: list[ba.RunResult] = []

        async def one(i: int) -> None:
            async with limiter:
                r = await b.run(["sh", "-c", "exit 0"], isolate=isolated and i % 2 == 0,
                                limits=limits if i % 3 else None, stdin=b"x" if i % 5 else None)
                if not r.ok:
                    failures.append(r)

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for i in range(1000):
                    tg.start_soon(one, i)
            for _ in range(5):
                await b.call(describe, 10, isolate=isolated)
        assert failures == []
        assert open_fds() == before


@pytest.mark.parametrize("isolate", ISOLATE)
async def test_aborting_during_a_call_raises_branch_closed_and_kills_it(
    repo: Path, isolate: bool
) -> None:
    tok = new_token()
    async with open_branch(repo) as b:
        raised: list[BaseException] = []

        async def call() -> None:
            try:
                await b.call(sleep_forever, True, isolate=isolate, env={TOKEN_VAR: tok})
            except ba.BranchClosed as exc:
                raised.append(exc)

        started = time.monotonic()
        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            assert await wait_pids(tok, present=True), "the call never started"
            await anyio.sleep(0.3)  # let it spawn its grandchild
            await b.abort()
        assert len(raised) == 1
        assert "aborted" in str(raised[0])
        assert time.monotonic() - started < 10
        assert await wait_pids(tok, present=False, within=2) == []


@pytest.mark.parametrize("isolate", ISOLATE)
async def test_cancelling_the_caller_kills_the_call_tree(repo: Path, isolate: bool) -> None:
    tok = new_token()
    async with open_branch(repo) as b:
        finished: list[object] = []

        async def call() -> None:
            finished.append(await b.call(sleep_forever, True, isolate=isolate,
                                         env={TOKEN_VAR: tok}))

        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            assert await wait_pids(tok, present=True), "the call never started"
            await anyio.sleep(0.3)
            tg.cancel_scope.cancel()
        assert finished == []
        assert await wait_pids(tok, present=False, within=2) == []
        # The branch is unharmed and calls again.
        assert b.state is ba.BranchState.OPEN
        assert (await b.call(describe, 3, isolate=isolate))[3] == b"012"


# -- pause and resume -----------------------------------------------------------------------------

COUNTER = ('i=0; while :; do i=$((i+1)); echo $i > counter.tmp; mv counter.tmp counter; '
           'sleep 0.01; done')


def read_counter(path: Path) -> int:
    try:
        return int(path.read_text() or 0)
    except (OSError, ValueError):
        return 0


async def check_pause_resume(b: WorkspaceBranch, isolate: bool) -> None:
    tok = new_token()
    counter = b.path / "counter"
    results: list[ba.RunResult] = []

    async def run() -> None:
        results.append(await b.run(["sh", "-c", COUNTER], isolate=isolate,
                                   env={TOKEN_VAR: tok}))

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        for _ in range(500):
            if read_counter(counter) >= 3:
                break
            await anyio.sleep(0.01)
        assert read_counter(counter) >= 3, "the counter never started"
        await b.pause()
        await anyio.sleep(0.1)  # a write in flight at the freeze may still land
        frozen = read_counter(counter)
        await anyio.sleep(0.5)
        assert read_counter(counter) == frozen, "the counter advanced while paused"
        await b.resume()
        for _ in range(300):
            if read_counter(counter) > frozen + 3:
                break
            await anyio.sleep(0.01)
        assert read_counter(counter) > frozen + 3, "the counter did not advance after resume"
        await b.pause()  # aborting a paused branch still ends everything
        await b.abort()
    assert results[0].killed == "aborted"
    assert await wait_pids(tok, present=False, within=2) == []


@pytest.mark.parametrize("isolate", ISOLATE)
async def test_pause_freezes_and_resume_thaws(repo: Path, isolate: bool) -> None:
    async with open_branch(repo) as b:
        await b.pause()  # nothing running: harmless
        await b.resume()
        await check_pause_resume(b, isolate)
        with pytest.raises(ba.BranchClosed):
            await b.pause()


@pytest.mark.parametrize("isolate", ISOLATE)
async def test_pause_without_cgroups_stops_the_process_group(
    repo: Path, isolate: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_cgroup, "_host", NO_CGROUPS)
    async with open_branch(repo) as b:
        await check_pause_resume(b, isolate)
