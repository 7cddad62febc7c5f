"""Hostile candidates: whatever a candidate does, the base survives, the machine stays
responsive, and nothing it started outlives its run or its branch.

Every case runs real processes against the copy backend (the disk-limit case against
the FUSE backend, the one that can enforce it) and checks three things:

- the base workspace is byte-identical afterwards (paths, types, bytes, modes,
  mtimes, symlink targets: :func:`snapshot`);
- the test ends in bounded time (``anyio.fail_after``) and, where the candidate
  is a CPU or fork hog, the agent's event loop and a normal candidate run beside
  it stay on time;
- no process of the branch is alive afterwards: each run gets a unique token in
  its environment, which every process of its tree inherits, and ``/proc`` is
  searched for it (:func:`tree_pids`).

Where the machine lacks a facility (a cgroup controller, namespaces), the case
skips with a reason that names it, and a test of the fallback runs instead: the
fallback tests emulate a host without cgroups by replacing the detected host.
"""

from __future__ import annotations

import errno
import os
import resource
import socket
import stat
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import anyio
import attrs
import pytest

import branchagent as ba
from _support import requires_fuse
from branchagent._sandbox import _cgroup
from branchagent._sandbox._run import isolation_available

pytestmark = pytest.mark.anyio

needs_isolation = pytest.mark.skipif(
    not isolation_available(),
    reason="needs private mount and PID namespaces (unshare --mount --pid): not permitted here",
)
needs_netns = pytest.mark.skipif(
    not isolation_available(network=False),
    reason="needs network namespaces (unshare --net): not permitted here",
)
# Cases that move gigabytes or burn CPU for seconds: the agent's event loop does not
# change what they show, so they run once, on asyncio.
ONE_LOOP = pytest.mark.parametrize("anyio_backend", ["asyncio"])

TOKEN_VAR = "BRANCHAGENT_HOSTILE_TOKEN"
NO_CGROUPS = _cgroup.CgroupHost(None, frozenset(), False, {})


# -- helpers ---------------------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """Everything about a tree that a candidate could change, keyed by relative path."""
    out: dict[str, tuple[object, ...]] = {}
    st = os.lstat(root)
    out["."] = ("dir", st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            meta = (st.st_mode, st.st_uid, st.st_gid)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("symlink", *meta, os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", *meta, st.st_mtime_ns)
            elif stat.S_ISREG(st.st_mode):
                out[rel] = ("file", *meta, st.st_mtime_ns, Path(path).read_bytes())
            else:
                out[rel] = ("other", *meta)
    return out


def new_token() -> str:
    return f"hostile-{uuid.uuid4().hex}"


def _state(pid: str) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]


def tree_pids(tok: str) -> list[int]:
    """Live (not zombie) processes whose environment or command line holds ``tok``."""
    needle = tok.encode()
    out: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            found = (needle in Path(f"/proc/{entry}/environ").read_bytes()
                     or needle in Path(f"/proc/{entry}/cmdline").read_bytes())
            if found and _state(entry) not in ("Z", "X"):
                out.append(int(entry))
        except OSError:
            continue
    return out


async def wait_pids(tok: str, *, present: bool, within: float = 5.0) -> list[int]:
    """Poll until processes with ``tok`` exist (``present``) or are all gone."""
    deadline = time.monotonic() + within
    while True:
        pids = tree_pids(tok)
        if bool(pids) == present or time.monotonic() > deadline:
            return pids
        await anyio.sleep(0.02)


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of ``pids`` (those still there), from /proc/<pid>/stat."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / os.sysconf("SC_CLK_TCK")


def run_cgroups() -> list[Path]:
    """Per-run cgroups left under this process's branchagent cgroups (should be none)."""
    h = _cgroup.detect()
    parents = [*([h.v2] if h.v2 is not None else []), *h.v1.values()]
    return [d for p in parents if p.is_dir() for d in p.iterdir() if d.name.startswith("run-")]


def has_cgroup(controller: str) -> bool:
    h = _cgroup.host()
    return controller in h.v2_controllers or controller in h.v1


def require_cgroup(controller: str) -> None:
    if not has_cgroup(controller):
        pytest.skip(
            f"no cgroup {controller} controller here (neither cgroup v2 {controller}.max nor "
            f"v1 {controller}): {_cgroup.host().describe()}; the fallback test covers this host"
        )


def require_any_cgroup() -> None:
    if _cgroup.host().kind == "none":
        pytest.skip("no usable cgroup (v2 or v1) here: the tree is killed by the PID "
                    "namespace and process group instead; the fallback test covers this host")


def claims(r: ba.RunResult, name: str) -> bool:
    """Whether ``r`` says ``name`` was enforced; it must say one thing or the other."""
    enforced = any(e == name or e.startswith(name + ":") for e in r.enforced)
    assert enforced != (name in r.not_enforced), (name, r.enforced, r.not_enforced)
    return enforced


@asynccontextmanager
async def hostile(
    repo: Path, *, within: float = 60.0, added: frozenset[str] = frozenset()
) -> AsyncIterator[ba.Workspace]:
    """A copy-backend workspace on ``repo``; on exit the base must be exactly as before.

    ``added`` names top-level paths a test commits on purpose (compared separately).
    """
    before = snapshot(repo)
    with anyio.fail_after(within):
        async with ba.open_workspace(repo, backend="copy") as ws:
            yield ws
    after = snapshot(repo)
    if added:
        after = {p: v for p, v in after.items()
                 if p.split("/")[0] not in added and p != "."}
        before = {p: v for p, v in before.items() if p != "."}
    assert after == before, "the base workspace changed"
    assert run_cgroups() == [], "a run's cgroup was left behind"


@contextmanager
def listener() -> Iterator[int]:
    """A TCP listener on 127.0.0.1 in the agent's network namespace; yields its port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield s.getsockname()[1]


def py(code: str, tok: str) -> list[str]:
    """argv running ``code`` with the token as its first argument."""
    return [sys.executable, "-c", code, tok]


# -- the filesystem: the base and the siblings are out of reach ---------------------------------


@needs_isolation
async def test_writes_through_the_workspace_path_land_in_the_branch(repo: Path) -> None:
    tok = new_token()
    async with hostile(repo) as ws:
        b = await ws.fork()
        w = ws.path
        script = (
            f'set -e; for f in $(find "{w}" -type f); do echo pwned > "$f"; done; '
            f'chmod 000 "{w}/run.sh"; rm "{w}/link"; ln -s /etc/passwd "{w}/link"; '
            f'rm -r "{w}/src"; mkdir "{w}/src"; echo new > "{w}/src/new.py"; '
            f'ln -s "{w}/README.md" "{w}/abs-link"; echo through > "{w}/abs-link"; '
            f'touch -d 2001-01-01 "{w}" "{w}/empty"; echo done'
        )
        r = await b.run(["sh", "-c", script], env={TOKEN_VAR: tok})
        assert r.ok, r.stderr
        assert r.isolated
        # Every write landed in the branch ...
        assert (b.path / "README.md").read_text() == "through\n"
        assert (b.path / "src" / "new.py").read_text() == "new\n"
        assert os.readlink(b.path / "link") == "/etc/passwd"
        assert stat.S_IMODE(os.lstat(b.path / "run.sh").st_mode) == 0
        await b.abort()
        assert tree_pids(tok) == []
    # ... and hostile() checked that the base did not change.


@needs_isolation
async def test_rm_rf_of_the_workspace_and_the_state_dir(repo: Path) -> None:
    tok = new_token()
    async with hostile(repo, added=frozenset({"committed.txt"})) as ws:
        async with ws.branch() as first:  # a commit, so that the journal exists
            (first.path / "committed.txt").write_text("kept\n")
        victim = await ws.fork("victim")
        sibling = await ws.fork("sibling")
        (sibling.path / "work.txt").write_text("sibling's work\n")
        sib_before = snapshot(sibling.path)
        state = ws.state_dir
        state_before = sorted(p.name for p in state.iterdir())
        assert {"branches.json", "journal", "copy"} <= set(state_before)
        script = (
            f'rm -rf "{ws.path}"; rm -rf "{ws.path}"/* "{ws.path}"/.[!.]*; '
            f'rm -rf "{state}"/* "{state}"/.[!.]*; rm -rf "{state}"; '
            f'rm -rf "{sibling.path}" "{state}/journal" "{state}/copy"; '
            f'ls -A "{ws.path}" "{state}"; exit 0'
        )
        r = await victim.run(["sh", "-c", script], env={TOKEN_VAR: tok})
        assert r.ok, r.stderr
        # The rm reached the victim's own branch (it is what it sees at the workspace path) ...
        assert list(victim.path.iterdir()) == []
        # ... and nothing else: not the sibling, not the state dir (hidden under a tmpfs).
        assert snapshot(sibling.path) == sib_before
        assert sorted(p.name for p in state.iterdir()) == state_before
        assert (state / "branches.json").is_file()
        assert (state / "journal").is_dir()
        assert (repo / "committed.txt").read_text() == "kept\n"
        assert sibling.state is ba.BranchState.OPEN
        assert {c.path for c in await sibling.changes()} == {"work.txt"}
        assert (await sibling.run(["cat", "work.txt"])).stdout == "sibling's work\n"
        await victim.abort()
        await sibling.abort()
        assert tree_pids(tok) == []


@needs_isolation
async def test_writes_into_a_sibling_through_its_real_path_do_not_reach_it(repo: Path) -> None:
    tok = new_token()
    async with hostile(repo) as ws:
        b = await ws.fork("attacker")
        sibling = await ws.fork("sibling")
        nested = await sibling.fork("nested")
        before = {x.name: snapshot(x.path) for x in (sibling, nested)}
        s, n = sibling.path, nested.path
        script = (
            f'echo pwned > "{s}/README.md"; echo pwned > "{s}/new.txt"; rm -f "{s}/run.sh"; '
            f'echo pwned > "{n}/README.md"; cp -r /etc/hostname "{n}/"; '
            f'ls "{s}" >/dev/null 2>&1 && echo visible || echo hidden; '
            # Re-creating the path inside the hiding tmpfs succeeds, but stays there.
            f'mkdir -p "{s}" && echo pwned > "{s}/README.md"; exit 0'
        )
        r = await b.run(["sh", "-c", script], env={TOKEN_VAR: tok})
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith("hidden")
        assert {x.name: snapshot(x.path) for x in (sibling, nested)} == before
        await ws.get("sibling").abort()
        await b.abort()
        assert tree_pids(tok) == []


# -- processes: fork bombs, memory and CPU hogs --------------------------------------------------

BOMB = """
import os, time
while True:
    try:
        os.fork()
    except OSError:
        time.sleep(0.05)
"""

NORMAL = "import sys; print(sum(range(100000)))"


async def normal_candidate(ws: ba.Workspace) -> float:
    """Run a small test command in a fresh branch; its wall time."""
    b = await ws.fork()
    started = time.monotonic()
    r = await b.run([sys.executable, "-c", NORMAL], limits=ba.Limits(timeout=30))
    elapsed = time.monotonic() - started
    assert r.ok, r
    assert r.stdout == f"{sum(range(100000))}\n"
    await b.abort()
    return elapsed


@needs_isolation
@ONE_LOOP
async def test_fork_bomb_is_bounded_by_pids(repo: Path) -> None:
    require_cgroup("pids")
    tok = new_token()
    async with hostile(repo) as ws:
        b = await ws.fork()
        results: list[ba.RunResult] = []
        peak = 0
        lags: list[float] = []

        async def bomb() -> None:
            results.append(await b.run(py(BOMB, tok), env={TOKEN_VAR: tok},
                                       limits=ba.Limits(pids=64, timeout=3)))

        async with anyio.create_task_group() as tg:
            tg.start_soon(bomb)
            assert await wait_pids(tok, present=True), "the bomb never started"
            await anyio.sleep(0.5)
            normal = await normal_candidate(ws)  # the machine still runs other work
            while not results:
                peak = max(peak, len(tree_pids(tok)))
                t = time.monotonic()
                await anyio.sleep(0.05)
                lags.append(time.monotonic() - t - 0.05)
        (r,) = results
        assert r.killed == "timeout"
        assert claims(r, "pids")
        assert "pids" in r.limits_hit
        assert 10 <= peak <= 64, peak  # it forked, up to the limit and no further
        assert normal < 15, normal
        assert max(lags) < 1.5, max(lags)
        assert await wait_pids(tok, present=False, within=2) == []


@needs_isolation
@pytest.mark.parametrize("isolate", [True, False], ids=["isolated", "unisolated"])
async def test_memory_hog_is_killed_by_its_cgroup(repo: Path, isolate: bool) -> None:
    require_cgroup("memory")
    tok = new_token()
    async with hostile(repo) as ws:
        b = await ws.fork()
        hog = "x = bytearray(1 << 30); print('allocated')"
        r = await b.run(py(hog, tok), isolate=isolate, env={TOKEN_VAR: tok},
                        limits=ba.Limits(memory="64M", timeout=30))
        assert r.killed == "memory", r
        assert "memory" in r.limits_hit
        assert any(e.startswith("memory:cgroup") for e in r.enforced), r.enforced
        assert "allocated" not in r.stdout
        assert not r.ok
        # The branch is still usable, and a process within the limit runs.
        r = await b.run([sys.executable, "-c", "print(len(bytearray(1 << 20)))"],
                        isolate=isolate, limits=ba.Limits(memory="64M"))
        assert r.ok, r.stderr
        await b.abort()
        assert tree_pids(tok) == []


SPINNERS = """
import os
for _ in range(7):
    if os.fork() == 0:
        break
while True:
    pass
"""

MEASURED = """
import time
cpu, wall = time.process_time(), time.monotonic()
n = 0
while time.process_time() - cpu < 0.4:
    n += 1
print(time.process_time() - cpu, time.monotonic() - wall)
"""


@needs_isolation
@ONE_LOOP
async def test_cpu_spinner_is_held_to_its_share(repo: Path) -> None:
    require_cgroup("cpu")
    tok = new_token()
    async with hostile(repo) as ws:
        spinner = await ws.fork()
        # An aborted run's result carries no limit report: ask with a short run.
        assert claims(await spinner.run(["true"], limits=ba.Limits(cpu=0.2)), "cpu")
        results: list[ba.RunResult] = []

        async def spin() -> None:
            # Eight busy processes in one cgroup limited to 0.2 CPU in all.
            results.append(await spinner.run(py(SPINNERS, tok), env={TOKEN_VAR: tok},
                                             limits=ba.Limits(cpu=0.2, timeout=30)))

        async with anyio.create_task_group() as tg:
            tg.start_soon(spin)
            for _ in range(250):
                if len(tree_pids(tok)) >= 8:
                    break
                await anyio.sleep(0.02)
            await anyio.sleep(0.3)
            pids = tree_pids(tok)
            cpu0, t0 = cpu_seconds(pids), time.monotonic()
            # A normal candidate beside it gets a full CPU. (With autogroup scheduling it
            # would even uncapped, since every run is its own session: the share measured
            # below is what shows the limit.)
            other = await ws.fork()
            r = await other.run([sys.executable, "-c", MEASURED], limits=ba.Limits(timeout=30))
            assert r.ok, r.stderr
            cpu_used, wall = map(float, r.stdout.split())
            await anyio.sleep(max(0.0, 1.5 - (time.monotonic() - t0)))
            share = (cpu_seconds(pids) - cpu0) / (time.monotonic() - t0)
            await spinner.abort()
        (s,) = results
        assert s.killed == "aborted"
        # Uncapped, eight spinners on this machine would take every core.
        assert share < 0.45, f"the spinner used {share:.2f} CPU against a limit of 0.2"
        assert wall < 3 * cpu_used + 0.5, (cpu_used, wall)
        assert await wait_pids(tok, present=False, within=2) == []


# -- processes that try to outlive the branch -----------------------------------------------------

DAEMON = """
import os, sys, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:  # the daemon: new session, parent gone, stdio closed
        for fd in (0, 1, 2):
            os.close(fd)
        open("daemon-up", "w").close()
        time.sleep(3600)
    os._exit(0)
os.wait()
for _ in range(500):  # leave only once the daemon is surely up
    if os.path.exists("daemon-up"):
        break
    time.sleep(0.01)
print("parent left", flush=True)
if sys.argv[2] == "stay":
    time.sleep(3600)
"""


@pytest.mark.parametrize(
    "isolate", [pytest.param(True, marks=needs_isolation, id="isolated"),
                pytest.param(False, id="unisolated")])
@pytest.mark.parametrize("end", ["run-ends", "abort"])
async def test_setsid_double_fork_daemon_is_gone(repo: Path, isolate: bool, end: str) -> None:
    if not isolate:
        require_any_cgroup()  # without a cgroup, only the PID namespace catches a setsid
    tok = new_token()
    async with hostile(repo) as ws:
        b = await ws.fork()
        argv = [*py(DAEMON, tok), "stay" if end == "abort" else "leave"]
        if end == "run-ends":
            r = await b.run(argv, isolate=isolate, env={TOKEN_VAR: tok},
                            limits=ba.Limits(timeout=20))
            assert r.ok, r
            assert r.stdout == "parent left\n"
            assert (b.path / "daemon-up").exists(), "the daemon never started"
        else:
            results: list[ba.RunResult] = []

            async def run() -> None:
                results.append(await b.run(argv, isolate=isolate, env={TOKEN_VAR: tok}))

            async with anyio.create_task_group() as tg:
                tg.start_soon(run)
                for _ in range(500):
                    if (b.path / "daemon-up").exists():
                        break
                    await anyio.sleep(0.01)
                assert (b.path / "daemon-up").exists(), "the daemon never started"
                await b.abort()
            assert results[0].killed == "aborted"
        assert await wait_pids(tok, present=False, within=2) == []
        await b.abort()


IGNORES_TERM = """
import os, signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGHUP, signal.SIG_IGN)
os.fork()
time.sleep(3600)
"""


@pytest.mark.parametrize(
    "isolate", [pytest.param(True, marks=needs_isolation, id="isolated"),
                pytest.param(False, id="unisolated")])
async def test_sigterm_ignorer_is_killed_on_timeout(repo: Path, isolate: bool) -> None:
    tok = new_token()
    async with hostile(repo) as ws:
        b = await ws.fork()
        started = time.monotonic()
        r = await b.run(py(IGNORES_TERM, tok), isolate=isolate, env={TOKEN_VAR: tok},
                        limits=ba.Limits(timeout=0.5))
        elapsed = time.monotonic() - started
        assert r.killed == "timeout"
        assert 0.5 <= elapsed < 2.0, elapsed
        assert await wait_pids(tok, present=False, within=1) == []
        await b.abort()


MIDDLE_KILLED = """
import os, signal, time
middle = os.fork()
if middle == 0:
    if os.fork() == 0:  # the grandchild kills its parent and lives on, orphaned
        os.kill(os.getppid(), signal.SIGKILL)
        time.sleep(3600)
    time.sleep(3600)
os.waitpid(middle, 0)
print("middle killed", flush=True)
"""

MAIN_KILLED = """
import os, signal, time
if os.fork() == 0:  # the child kills the run's own process and lives on, orphaned
    os.kill(os.getppid(), signal.SIGKILL)
    time.sleep(3600)
time.sleep(3600)
"""


@pytest.mark.parametrize(
    ("isolate", "code"),
    [pytest.param(True, MIDDLE_KILLED, marks=needs_isolation, id="isolated-middle"),
     pytest.param(False, MIDDLE_KILLED, id="unisolated-middle"),
     # Isolated, the run's process is PID 1 of its namespace: its children cannot kill it.
     pytest.param(False, MAIN_KILLED, id="unisolated-main")])
async def test_child_that_kills_its_parent_leaves_no_orphan(
    repo: Path, isolate: bool, code: str
) -> None:
    tok = new_token()
    async with hostile(repo) as ws:
        b = await ws.fork()
        started = time.monotonic()
        r = await b.run(py(code, tok), isolate=isolate, env={TOKEN_VAR: tok},
                        limits=ba.Limits(timeout=20))
        assert time.monotonic() - started < 10
        assert r.killed is None
        if code is MIDDLE_KILLED:
            assert (r.returncode, r.stdout) == (0, "middle killed\n"), r
        else:
            assert r.returncode == -9
        assert await wait_pids(tok, present=False, within=2) == []
        await b.abort()


# -- output and disk ------------------------------------------------------------------------------


@needs_isolation
@ONE_LOOP
async def test_a_gigabyte_of_output_is_capped(repo: Path) -> None:
    tok = new_token()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    async with hostile(repo) as ws:
        b = await ws.fork()
        started = time.monotonic()
        r = await b.run(["sh", "-c", "head -c 1G /dev/zero; echo end >&2"],
                        env={TOKEN_VAR: tok}, limits=ba.Limits(timeout=60))
        elapsed = time.monotonic() - started
        assert r.ok, r.stderr
        assert len(r.stdout) == ba.Limits().output
        assert r.stdout_truncated
        assert r.stderr == "end\n"
        assert elapsed < 15, elapsed  # ~2-4 s here: streamed to a file, never a pipe
        await b.abort()
        assert tree_pids(tok) == []
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - peak_before
    assert grown < 256 << 20, f"the agent's peak memory grew by {grown >> 20} MiB"


@needs_isolation
@ONE_LOOP
async def test_a_10g_sparse_file_is_aborted_fast(repo: Path) -> None:
    tok = new_token()
    async with hostile(repo) as ws:
        b = await ws.fork()
        r = await b.run(["truncate", "-s", "10G", "huge.img"], env={TOKEN_VAR: tok})
        assert r.ok, r.stderr
        st = os.stat(b.path / "huge.img")
        assert (st.st_size, st.st_blocks) == (10 << 30, 0)
        started = time.monotonic()
        await b.abort()
        assert time.monotonic() - started < 3.0
        assert not (b.path / "huge.img").exists()
        assert tree_pids(tok) == []


@needs_isolation
@ONE_LOOP
async def test_a_sparse_file_is_committed_by_rename_not_copied(repo: Path) -> None:
    # 256 MiB, not 10 GiB: a commit hashes every changed file, so it reads the whole
    # apparent size (44 s for 10 GiB here). It moves the file: the base stays sparse.
    async with hostile(repo, added=frozenset({"huge.img"})) as ws:
        b = await ws.fork()
        r = await b.run(["truncate", "-s", "256M", "huge.img"])
        assert r.ok, r.stderr
        started = time.monotonic()
        await b.commit()
        assert time.monotonic() - started < 20
        st = os.stat(repo / "huge.img")
        assert (st.st_size, st.st_blocks) == (256 << 20, 0)


def _disk_used(path: Path) -> int:
    """Bytes really allocated under ``path`` (st_blocks), as ``du`` counts them."""
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


REAL_DATA_WRITER = """
import os, sys
n = 0
with open("junk-%d.bin" % os.getpid(), "wb", buffering=0) as f:
    try:
        while n < (256 << 20):
            n += f.write(os.urandom(1 << 20))
    except OSError as exc:
        print(n, exc.errno)
        sys.exit(0)
print(n, 0)
"""


@needs_isolation
@ONE_LOOP
@requires_fuse
async def test_real_data_writer_is_bounded_by_a_disk_quota(repo: Path) -> None:
    """Incompressible data, written as fast as it goes: the branch stops at its limit
    with EDQUOT, the disk under the state directory holds no more than that, and the
    base, a sibling and the workspace's limit on other branches are untouched."""
    assert "disk" in attrs.fields_dict(ba.Limits)
    tok = new_token()
    before = snapshot(repo)
    limit = 8 << 20
    state = repo.parent / "state"
    with anyio.fail_after(120):
        async with ba.open_workspace(repo, state_dir=state, disk_limit=limit) as ws:
            b = await ws.fork()
            sibling = await ws.fork()
            (sibling.path / "keep.txt").write_text("kept\n")
            r = await b.run(py(REAL_DATA_WRITER, tok), env={TOKEN_VAR: tok},
                            limits=ba.Limits(timeout=60))
            assert r.returncode == 0, r.stderr
            written, err = map(int, r.stdout.split())
            assert err == errno.EDQUOT, r.stdout
            assert written == limit  # cut short at the limit exactly, then refused
            assert (await b.usage()).bytes == limit
            assert _disk_used(state / "fuse" / "layers") < limit + (1 << 20)
            # Two writers at once share the one limit: nothing more fits.
            r2 = await b.run(["sh", "-c", f"{sys.executable} -c '{REAL_DATA_WRITER}' & "
                              f"{sys.executable} -c '{REAL_DATA_WRITER}'; wait"],
                             env={TOKEN_VAR: tok}, limits=ba.Limits(timeout=60))
            assert r2.stdout.split() == ["0", str(errno.EDQUOT)] * 2, r2
            assert (await b.usage()).bytes == limit
            assert await wait_pids(tok, present=False) == []
            assert (sibling.path / "keep.txt").read_text() == "kept\n"
            assert (await sibling.usage()).bytes == len("kept\n")
            await b.abort()
            assert _disk_used(state / "fuse" / "layers") < 1 << 20
    assert snapshot(repo) == before, "the base workspace changed"


# -- network --------------------------------------------------------------------------------------

CONNECT = """
import socket, sys
socket.create_connection(("127.0.0.1", int(sys.argv[2])), timeout=5).close()
print("connected")
"""


@needs_netns
async def test_network_false_gives_an_empty_network_namespace(repo: Path) -> None:
    tok = new_token()
    async with hostile(repo) as ws:
        b = await ws.fork()
        with listener() as port:
            argv = [*py(CONNECT, tok), str(port)]
            r = await b.run(argv, env={TOKEN_VAR: tok}, limits=ba.Limits(network=False))
            assert r.returncode != 0
            assert "connected" not in r.stdout
            assert "Error" in r.stderr  # ConnectionRefused / Network is unreachable
            assert "network:netns" in r.enforced
            r = await b.run(argv, env={TOKEN_VAR: tok}, limits=ba.Limits(network=True))
            assert r.ok, r.stderr
            assert r.stdout == "connected\n"
            # Unisolated, there is no namespace: said, never claimed.
            r = await b.run(argv, isolate=False, env={TOKEN_VAR: tok},
                            limits=ba.Limits(network=False))
            assert r.stdout == "connected\n"
            assert not claims(r, "network")
        await b.abort()
        assert tree_pids(tok) == []


# -- hosts without cgroups: the fallbacks, and what they say --------------------------------------


@pytest.mark.parametrize(
    "isolate", [pytest.param(True, marks=needs_isolation, id="isolated"),
                pytest.param(False, id="unisolated")])
async def test_without_cgroups_limits_are_reported_not_enforced(
    repo: Path, isolate: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_cgroup, "_host", NO_CGROUPS)
    async with hostile(repo) as ws:
        b = await ws.fork()
        r = await b.run(["true"], isolate=isolate, limits=ba.Limits(pids=64, cpu=0.2))
        assert r.ok
        assert not claims(r, "pids")
        assert not claims(r, "cpu")
        assert not any(e.split(":")[0] in ("pids", "cpu", "kill", "freeze") for e in r.enforced)
        assert r.limits_hit == frozenset()
        await b.abort()


@pytest.mark.parametrize(
    "isolate", [pytest.param(True, marks=needs_isolation, id="isolated"),
                pytest.param(False, id="unisolated")])
async def test_without_cgroups_memory_falls_back_to_rlimit(
    repo: Path, isolate: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_cgroup, "_host", NO_CGROUPS)
    tok = new_token()
    async with hostile(repo) as ws:
        b = await ws.fork()
        hog = "x = bytearray(1 << 30); print('allocated')"
        r = await b.run(py(hog, tok), isolate=isolate, env={TOKEN_VAR: tok},
                        limits=ba.Limits(memory="256M", timeout=30))
        assert "memory:rlimit-as" in r.enforced
        assert r.killed is None  # no OOM killer: the allocation fails instead
        assert not r.ok
        assert "MemoryError" in r.stderr
        assert "allocated" not in r.stdout
        await b.abort()
        assert tree_pids(tok) == []


@needs_isolation
@pytest.mark.parametrize("code", [DAEMON, MIDDLE_KILLED], ids=["daemon", "middle-killed"])
async def test_without_cgroups_the_pid_namespace_still_ends_the_tree(
    repo: Path, code: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_cgroup, "_host", NO_CGROUPS)
    tok = new_token()
    async with hostile(repo) as ws:
        b = await ws.fork()
        r = await b.run([*py(code, tok), "leave"], env={TOKEN_VAR: tok},
                        limits=ba.Limits(timeout=20))
        assert r.ok, r
        assert not any(e.startswith("kill:") for e in r.enforced)
        assert await wait_pids(tok, present=False, within=2) == []
        await b.abort()


async def test_without_cgroups_the_process_group_ends_an_orphan(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_cgroup, "_host", NO_CGROUPS)
    tok = new_token()
    async with hostile(repo) as ws:
        b = await ws.fork()
        r = await b.run(py(MAIN_KILLED, tok), isolate=False, env={TOKEN_VAR: tok},
                        limits=ba.Limits(timeout=20))
        assert r.returncode == -9
        assert await wait_pids(tok, present=False, within=2) == []
        await b.abort()


# -- a candidate running as root: capabilities dropped, cgroup tree read-only ---------------------


@needs_isolation
@pytest.mark.skipif(os.geteuid() != 0, reason="the attack needs a candidate running as real root")
async def test_root_candidate_cannot_unmount_its_view(repo: Path) -> None:
    async with hostile(repo) as ws:
        b = await ws.fork()
        w = ws.path
        r = await b.run(["sh", "-c", f'umount -l "{ws.state_dir}"; s=$?; umount -l "{w}"; '
                                     f'echo "$s $?"; echo pwned > "{w}/README.md"'])
        assert "caps:dropped" in r.enforced
        codes = r.stdout.split()[:2]
        assert len(codes) == 2, r.stdout
        assert "0" not in codes, r.stdout  # neither umount succeeded
        assert (b.path / "README.md").read_text() == "pwned\n"  # the write hit the branch
        await b.abort()


@needs_isolation
@pytest.mark.skipif(os.geteuid() != 0, reason="the attack needs a candidate running as real root")
async def test_root_candidate_cannot_leave_its_cgroup(repo: Path) -> None:
    require_cgroup("pids")
    h = _cgroup.host()
    procs = [os.fspath(p.parent / "cgroup.procs")
             for p in [*([h.v2] if h.v2 is not None else []), *h.v1.values()]]
    async with hostile(repo) as ws:
        b = await ws.fork()
        escape = "".join(f'echo $$ > "{p}"; ' for p in procs)
        r = await b.run(["sh", "-c", f"{escape}cat /proc/self/cgroup"],
                        limits=ba.Limits(pids=64))
        await b.abort()
    lines = [ln for ln in r.stdout.splitlines() if ":pids:" in ln or ln.startswith("0::")]
    assert all("/run-" in ln for ln in lines), r.stdout
