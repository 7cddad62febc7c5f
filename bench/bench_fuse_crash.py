"""Crash benchmark of the FUSE backend: SIGKILL mid-commit, reopen, exactly before or after.

    .venv/bin/python bench/bench_fuse_crash.py [--trials 200] [--seed 0] [--dir DIR]
                                              [--json out.json] [--settle] [--keep]

Each trial builds a fresh workspace (about 150 to 250 files: nested
directories, executables, symlinks) and a random change set of 50 to 200
files: files added (some in a new directory with a subdirectory and an empty
one), edited, deleted, made executable; a whole directory removed; a file
turned into a directory and a directory into a file; symlinks added and
retargeted. The *agent* is a separate process (this script run with
``--agent``) that opens the workspace with ``backend="fuse"``, forks a
branch, makes the changes through the branch's path and commits it into the
base. Half the trials SIGKILL the filesystem process, half the agent:

- server kills: a fault hook ``kill:<n>`` (the agent starts the server through the
  test-only launcher ``tests/_fuse_fault.py``, which installs it) makes the server SIGKILL
  itself at the n-th journal step (``intent``, ``op:0`` ... ``op:k``,
  ``done``, ``cleaned``); n is uniform over all steps, or (one trial in five)
  one of the boundary steps (intent, first op, last op, done, cleaned). The
  step really reached is read back from the server's log, so the expected
  outcome is known: before ``done`` the base must be exactly the before-tree,
  at ``done`` or later exactly the after-tree.
- agent kills: either the server marks the n-th journal step
  (``mark:<n>:<file>``) and the agent is killed as soon as the mark shows
  (plus 0-2 ms), or the agent is killed at a uniform random time in a window
  starting when it says it is about to call ``commit()`` (the window is 1.5x
  the commit time of an uninterrupted calibration run).

Right after the agent process is gone (as a supervisor restarting it would;
``--settle`` first waits for the old filesystem process to exit), the
workspace is reopened in this process, which runs the journal's recovery.
Each trial then checks (any failure is a *violation*, printed with the trial's
directory, and the exit status is 1):

- the base tree (path, type, mode, SHA-256 of the bytes, symlink target) is
  exactly the before-tree or exactly the after-tree, and, for server kills,
  the one the step says; no transaction is left in the journal;
- before: the branch is listed again, its view is exactly the after-tree, and
  committing it now makes the base exactly the after-tree; after: no branch
  is listed (a committed branch never comes back);
- the branch's view, as the agent saw it before committing, was the after-tree;
- after the reopened workspace is closed, nothing is mounted on its mount
  point, the old and new filesystem processes are gone, and no branch or
  layer storage is left behind.

The output is a Markdown table: trials, before/after counts and violations
per kill kind, and the time per trial (median and p95: agent start, changes,
commit, kill, reopen and checks), plus the machine's facts.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import random
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import attrs
import structlog

if __package__ in (None, ""):  # run as a script: make ``bench._util`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._util import Stats, machine_facts, machine_line, remove_tree, stats

import branchagent as ba
from branchagent._backends.fuse._backend import FuseBackend, is_mounted

#: (type, mode, SHA-256 of the content or the symlink target) per relative path.
Manifest = dict[str, tuple[str, int, str]]
#: One change: ["write", path, seed, size] | ["unlink", path] | ["rmtree", path]
#: | ["mkdir", path] | ["chmod", path, mode] | ["symlink", path, target].
Action = list[Any]

#: How this script hands the agent its fault hook (the agent injects it into the server).
FAULT_ENV = "BRANCHAGENT_FUSE_FAULT"
#: The test-only server launcher that installs a fault hook, then runs the server.
FAULT_LAUNCHER = Path(__file__).resolve().parent.parent / "tests" / "_fuse_fault.py"
BRANCH = "b"
#: Exit statuses of the agent.
AGENT_COMMITTED, AGENT_FAILED_CLOSED, AGENT_FAILED_EXITED = 0, 3, 4
#: This file, run with ``--agent`` as the agent process.
AGENT_SCRIPT = os.path.abspath(__file__)


# -- trees and changes -----------------------------------------------------------------------


def manifest(root: Path) -> Manifest:
    """Everything a user can observe of ``root``: types, modes, bytes, link targets."""
    out: Manifest = {}
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
                with open(p, "rb") as f:
                    out[rel] = ("file", mode, hashlib.sha256(f.read()).hexdigest())
            else:
                out[rel] = ("other", mode, "")
        dirnames[:] = [n for n in dirnames if not os.path.islink(os.path.join(dirpath, n))]
    return out


def _content(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def apply_changes(root: Path, actions: Sequence[Action]) -> None:
    """Make the changes of ``actions`` under ``root`` (a branch, or a plain copy)."""
    for act in actions:
        kind, path = act[0], root / act[1]
        if kind == "write":
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(_content(int(act[2]), int(act[3])))
        elif kind == "unlink":
            path.unlink()
        elif kind == "rmtree":
            shutil.rmtree(path)
        elif kind == "mkdir":
            path.mkdir(parents=True)
        elif kind == "chmod":
            path.chmod(int(act[2]))
        elif kind == "symlink":
            if path.is_symlink():
                path.unlink()
            path.symlink_to(str(act[2]))
        else:
            raise ValueError(f"unknown change {act!r}")


def make_base(root: Path, rnd: random.Random) -> list[str]:
    """A small source-like tree; returns its regular files (relative paths)."""
    files: list[str] = []

    def put(rel: str, size: int, mode: int = 0o644) -> None:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(rnd.randbytes(size))
        p.chmod(mode)
        files.append(rel)

    root.mkdir(parents=True)
    put("README.md", 300)
    put("setup.cfg", 120)
    for k in range(rnd.randint(3, 5)):
        for j in range(rnd.randint(20, 35)):
            sub = "" if j % 3 else "sub/"
            put(f"src/pkg{k}/{sub}mod{j}.py", rnd.randint(50, 4000),
                0o755 if rnd.random() < 0.05 else 0o644)
    for j in range(rnd.randint(5, 15)):
        put(f"docs/page{j}.md", rnd.randint(100, 2000))
    for j in range(rnd.randint(6, 14)):  # removed whole by the change set
        put(f"old/{'a/b/' if j % 2 else ''}legacy{j}.txt", rnd.randint(10, 500))
    put("dir2file/inside.txt", 40)  # becomes a file
    put("file2dir", 40)  # becomes a directory
    (root / "docs").chmod(0o750)
    (root / "link_readme").symlink_to("README.md")
    (root / "src" / "pkg0" / "link_mod").symlink_to("mod1.py")
    return files


def make_changes(files: list[str], rnd: random.Random) -> list[Action]:
    """50 to 200 changed files, every kind of change (see the module docstring)."""
    target = rnd.randint(50, 200)
    pool = [f for f in files if f.startswith(("src/", "docs/", "README", "setup"))]
    rnd.shuffle(pool)
    n_old = sum(1 for f in files if f.startswith("old/"))
    acts: list[Action] = [
        ["rmtree", "old"],
        ["rmtree", "dir2file"], ["write", "dir2file", rnd.getrandbits(32), 77],
        ["unlink", "file2dir"], ["write", "file2dir/now_inside.txt", rnd.getrandbits(32), 55],
        ["mkdir", "new/empty"],
        ["symlink", "new_link", "README.md"],
        ["symlink", "link_readme", "setup.cfg"],  # retargeted
    ]
    left = max(0, target - n_old - 5)
    n_newdir = rnd.randint(5, max(5, left // 4))
    for j in range(n_newdir):
        sub = "deep/" if j % 2 else ""
        acts.append(["write", f"new/{sub}f{j}.txt", rnd.getrandbits(32), rnd.randint(1, 3000)])
    left -= n_newdir
    n_mod = min(len(pool) // 2, left // 3)
    n_del = min(len(pool) // 4, left // 4)
    n_chmod = min(3, len(pool) - n_mod - n_del)
    n_add = max(0, left - n_mod - n_del - n_chmod)
    for f in pool[:n_mod]:
        acts.append(["write", f, rnd.getrandbits(32), rnd.randint(1, 4000)])
    for f in pool[n_mod:n_mod + n_del]:
        acts.append(["unlink", f])
    for f in pool[n_mod + n_del:n_mod + n_del + n_chmod]:
        acts.append(["chmod", f, 0o700])
    dirs = sorted({f.rpartition("/")[0] for f in pool if "/" in f})
    for j in range(n_add):
        acts.append(["write", f"{rnd.choice(dirs)}/added{j}.py", rnd.getrandbits(32),
                     rnd.randint(1, 3000)])
    return acts


def journal_steps(before: Manifest, after: Manifest) -> int:
    """How many journal steps the commit of ``before`` -> ``after`` passes (ops + 3).

    One op per changed entry, except the insides of a directory removed or
    replaced whole (``_journal.build_plan``); the server's log checks this count.
    """
    changed = sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))
    gone = [p + "/" for p in changed
            if before.get(p, ("",))[0] == "dir" and after.get(p, ("",))[0] != "dir"]
    ops = [p for p in changed if not p.startswith(tuple(gone))]
    return len(ops) + 3


def step_name(n: int, steps: int) -> str:
    """The name of the n-th (1-based) journal step of a commit with ``steps`` steps."""
    if n == 1:
        return "intent"
    if n == steps - 1:
        return "done"
    if n == steps:
        return "cleaned"
    return f"op:{n - 2}"


def finished(step: str) -> bool:
    """Whether a crash at ``step`` comes after the point of no return."""
    return step in ("done", "cleaned")


# -- the agent (a separate process) -----------------------------------------------------------


async def agent_main(spec: dict[str, Any]) -> int:
    """Fork a branch, make the changes through its path, commit it into the base."""
    fault = os.environ.get(FAULT_ENV)
    server = [sys.executable, os.fspath(FAULT_LAUNCHER), fault] if fault else None
    async with ba.open_workspace(spec["repo"], backend=FuseBackend(server=server),
                                 state_dir=spec["state"], keep_branches=True) as ws:
        print("SERVER", ws.backend.server_pid, flush=True)  # type: ignore[attr-defined]
        b = await ws.fork(BRANCH)
        await anyio.to_thread.run_sync(_make_changes, b.path, spec)
        print("COMMITTING", flush=True)
        try:
            await b.commit()
        except ba.BackendError as exc:
            print("FAILED", type(exc).__name__, flush=True)
            if spec["on_error"] == "exit":  # die without closing anything
                os._exit(AGENT_FAILED_EXITED)
            return AGENT_FAILED_CLOSED  # close normally (branches kept)
        print("COMMITTED", flush=True)
    return AGENT_COMMITTED


def _make_changes(branch: Path, spec: dict[str, Any]) -> None:
    apply_changes(branch, spec["actions"])
    Path(spec["view"]).write_text(json.dumps(manifest(branch)))


def run_agent(path: str) -> int:
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    spec = json.loads(Path(path).read_text())
    return anyio.run(agent_main, spec)


# -- one trial ------------------------------------------------------------------------------------


@attrs.define
class Trial:
    """One workspace, its change set, how it is killed and what came of it."""

    index: int
    dir: Path
    kill: str  # "server" | "agent" | "none" (calibration)
    mode: str = ""  # server: "uniform" | "boundary"; agent: "mark" | "time"
    n: int = 0  # the journal step of the fault (kill or mark)
    steps: int = 0
    delay_ms: float = 0.0  # agent kills: after the mark or after COMMITTING
    on_error: str = "close"
    step: str = ""  # the step the server was killed at (from its log)
    outcome: str = ""  # "before" | "after" | "neither"
    agent_rc: int | None = None
    seconds: float = 0.0
    commit_s: float = 0.0  # calibration: COMMITTING -> COMMITTED
    violations: list[str] = attrs.Factory(list)

    @property
    def repo(self) -> Path:
        return self.dir / "repo"

    @property
    def state(self) -> Path:
        return self.dir / "state"

    def fail(self, msg: str) -> None:
        self.violations.append(msg)

    def summary(self) -> dict[str, object]:
        return {"index": self.index, "kill": self.kill, "mode": self.mode, "n": self.n,
                "steps": self.steps, "delay_ms": round(self.delay_ms, 3),
                "on_error": self.on_error, "step": self.step, "outcome": self.outcome,
                "agent_rc": self.agent_rc, "seconds": round(self.seconds, 4),
                "violations": self.violations}


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


async def _wait_gone(pid: int, timeout: float) -> bool:
    with anyio.move_on_after(timeout):
        while _alive(pid):  # noqa: ASYNC110 - another process: nothing to wait on
            await anyio.sleep(0.01)
        return True
    return False


def _exists(path: Path) -> bool:
    """``os.path.exists``: a stat on tmpfs, cheaper than a trip to a worker thread."""
    return os.path.exists(path)


def _killed_step(log_text: str) -> str:
    found = re.findall(r"fault hook: kill at journal step \d+ \((\S+)\)", log_text)
    return found[-1] if found else ""


class Runner:
    def __init__(self, args: argparse.Namespace, tmp: Path, log: Any) -> None:
        self.args = args
        self.tmp = tmp
        self.log = log
        self.window_s = 0.0  # agent kills by time: the window after COMMITTING

    async def trial(self, t: Trial, rnd: random.Random) -> None:
        started = time.perf_counter()
        files = make_base(t.repo, rnd)
        actions = make_changes(files, rnd)
        before = manifest(t.repo)
        expect = t.dir / "expected"
        shutil.copytree(t.repo, expect, symlinks=True)
        apply_changes(expect, actions)
        after = manifest(expect)
        shutil.rmtree(expect)
        t.steps = journal_steps(before, after)
        self._choose(t, rnd)
        spec = {"repo": os.fspath(t.repo), "state": os.fspath(t.state), "actions": actions,
                "view": os.fspath(t.dir / "view.json"), "on_error": t.on_error}
        (t.dir / "spec.json").write_text(json.dumps(spec))
        env = dict(os.environ)
        env.pop(FAULT_ENV, None)
        mark = t.dir / "mark"
        if t.kill == "server":
            env[FAULT_ENV] = f"kill:{t.n}"
        elif t.kill == "agent" and t.mode == "mark":
            env[FAULT_ENV] = f"mark:{t.n}:{mark}"
        elif t.kill == "none":
            env[FAULT_ENV] = f"mark:{t.steps}:{mark}"  # checks the step count
        server_pid = await self._run_agent(t, env, mark, rnd)
        if self.args.settle and server_pid:
            await _wait_gone(server_pid, 30)
        if t.kill == "server":
            log_text = (t.state / "fuse" / "server.log").read_text(errors="replace")
            t.step = _killed_step(log_text)
            if t.step != step_name(t.n, t.steps):
                t.fail(f"server killed at {t.step or 'no step'!r}, expected journal step "
                       f"{t.n} of {t.steps} ({step_name(t.n, t.steps)!r})")
        elif t.kill == "none":
            got = mark.read_text() if mark.exists() else ""
            if got != "cleaned":
                t.fail(f"journal step {t.steps} was {got!r}, not 'cleaned': the step count is off")
        view = t.dir / "view.json"
        if not view.exists():
            t.fail("the agent never wrote its branch view")
        elif json.loads(view.read_text()) != {k: list(v) for k, v in after.items()}:
            t.fail("the branch's view, before the commit, was not the after-tree")
        await self._check_reopen(t, before, after, server_pid)
        t.seconds = time.perf_counter() - started
        if t.violations:  # for a look afterwards (the directory is kept)
            (t.dir / "before.json").write_text(json.dumps(before))
            (t.dir / "after.json").write_text(json.dumps(after))

    def _choose(self, t: Trial, rnd: random.Random) -> None:
        if t.kill == "server":
            if rnd.random() < 0.2:
                t.mode = "boundary"
                t.n = rnd.choice([1, 2, t.steps - 2, t.steps - 1, t.steps])
            else:
                t.mode = "uniform"
                t.n = rnd.randint(1, t.steps)
            t.on_error = rnd.choice(["close", "exit"])
        elif t.kill == "agent":
            if rnd.random() < 0.5:
                t.mode = "mark"
                t.n = rnd.randint(1, t.steps)
                t.delay_ms = rnd.uniform(0, 2)
            else:
                t.mode = "time"
                t.delay_ms = rnd.uniform(0, self.window_s * 1e3)

    async def _run_agent(self, t: Trial, env: dict[str, str], mark: Path,
                         rnd: random.Random) -> int:
        argv = [sys.executable, AGENT_SCRIPT, "--agent",
                os.fspath(t.dir / "spec.json")]
        server_pid = 0
        with open(t.dir / "agent.err", "wb") as err:  # noqa: ASYNC230 - tmpfs, instant
            proc = await anyio.open_process(argv, env=env, stderr=err, stdin=subprocess.DEVNULL)
            async with proc:
                assert proc.stdout is not None
                lines = _Lines(proc.stdout)
                try:
                    with anyio.fail_after(120):
                        server_pid = await self._drive(t, proc, lines, mark)
                        t.agent_rc = await proc.wait()
                except TimeoutError:
                    t.fail("the agent hung (killed after 120 s)")
                    proc.kill()
                    t.agent_rc = await proc.wait()
        self._check_agent_rc(t)
        return server_pid

    async def _drive(self, t: Trial, proc: anyio.abc.Process, lines: _Lines, mark: Path) -> int:
        server_pid = 0
        line = await lines.next()
        if line.startswith("SERVER "):
            server_pid = int(line.split()[1])
        line = await lines.next()
        if line != "COMMITTING":
            t.fail(f"the agent said {line!r} before committing")
            return server_pid
        t0 = time.perf_counter()
        if t.kill == "agent" and t.mode == "mark":
            # Polled (another process writes it): a fine grain, the kill follows at once.
            while not _exists(mark) and proc.returncode is None:  # noqa: ASYNC110
                await anyio.sleep(0.0002)
            if not _exists(mark):
                t.fail(f"the agent ended (status {proc.returncode}) before journal step {t.n}")
                return server_pid
            await anyio.sleep(t.delay_ms / 1e3)
            _sigkill(proc)
        elif t.kill == "agent":
            with anyio.move_on_after(t.delay_ms / 1e3):
                await proc.wait()
            _sigkill(proc)
        elif t.kill == "none":
            line = await lines.next()
            t.commit_s = time.perf_counter() - t0
            if line != "COMMITTED":
                t.fail(f"calibration commit failed: {line!r}")
        return server_pid

    def _check_agent_rc(self, t: Trial) -> None:
        rc = t.agent_rc
        if t.kill == "agent":
            if rc not in (-signal.SIGKILL, AGENT_COMMITTED):
                t.fail(f"the agent exited with status {rc}, expected SIGKILL (or done)")
        elif t.kill == "server":
            want = AGENT_FAILED_EXITED if t.on_error == "exit" else AGENT_FAILED_CLOSED
            if rc != want:
                t.fail(f"the agent exited with status {rc} after its server was killed, "
                       f"expected {want} (commit raised BackendError)")
        elif rc != AGENT_COMMITTED:
            t.fail(f"the calibration agent exited with status {rc}")

    async def _check_reopen(self, t: Trial, before: Manifest, after: Manifest,
                            old_server: int) -> None:
        mnt = t.state / "fuse" / "mnt"
        new_server = 0
        try:
            async with ba.open_workspace(t.repo, backend="fuse", state_dir=t.state) as ws:
                new_server = ws.backend.server_pid or 0  # type: ignore[attr-defined]
                journal = t.state / "journal"
                left = sorted(os.listdir(journal)) if journal.is_dir() else []
                if left:
                    t.fail(f"journal entries left after recovery: {left}")
                got = manifest(t.repo)
                t.outcome = ("before" if got == before else "after" if got == after
                             else "neither")
                if t.outcome == "neither":
                    t.fail("base is neither the before-tree nor the after-tree: "
                           + _describe(got, before, after))
                if t.kill == "server" and t.step and t.outcome != "neither":
                    want = "after" if finished(t.step) else "before"
                    if t.outcome != want:
                        t.fail(f"server killed at {t.step!r}: base is the {t.outcome}-tree, "
                               f"expected the {want}-tree")
                names = [b.name for b in ws.branches()]
                if t.outcome == "after" and names:
                    t.fail(f"the commit is done, yet branches are listed: {names}")
                elif t.outcome == "before":
                    if names != [BRANCH]:
                        t.fail(f"the commit was rolled back, yet the branches are {names}, "
                               f"not [{BRANCH!r}]")
                    else:
                        b = ws.get(BRANCH)
                        if manifest(b.path) != after:
                            t.fail("the surviving branch's view is not the after-tree")
                        await b.commit()
                        if manifest(t.repo) != after:
                            t.fail("committing the surviving branch did not give the "
                                   "after-tree")
        except Exception as exc:  # a trial that raises is a violation, the run goes on
            t.fail(f"reopen raised {type(exc).__name__}: {exc}")
            if not t.outcome:  # what the failed open left in the base
                with contextlib.suppress(OSError):
                    got = manifest(t.repo)
                    t.outcome = ("before" if got == before else "after" if got == after
                                 else "neither")
                    if t.outcome == "neither":
                        t.fail("base after the failed reopen is neither the before-tree nor "
                               "the after-tree: " + _describe(got, before, after))
        for pid, who in ((old_server, "old"), (new_server, "new")):
            if pid and not await _wait_gone(pid, 10):
                t.fail(f"the {who} filesystem process {pid} is still alive")
        if is_mounted(mnt):
            t.fail(f"{mnt} is still mounted after reopen and close")
        for sub in ("branches", "layers"):
            d = t.state / "fuse" / sub
            left = sorted(os.listdir(d)) if d.is_dir() else []
            if left:
                t.fail(f"storage left in {d} after every branch was committed: {left[:5]}")


class _Lines:
    """Lines of the agent's stdout."""

    def __init__(self, stream: anyio.abc.ByteReceiveStream) -> None:
        self.stream = stream
        self.buf = b""

    async def next(self) -> str:
        while b"\n" not in self.buf:
            try:
                self.buf += await self.stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return ""
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode(errors="replace").strip()


def _sigkill(proc: anyio.abc.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGKILL)


def _describe(got: Manifest, before: Manifest, after: Manifest) -> str:
    """Which paths differ from the before-tree and from the after-tree (a few of each)."""
    parts = []
    for label, want in (("before", before), ("after", after)):
        diff = sorted(p for p in got.keys() | want.keys() if got.get(p) != want.get(p))
        shown = ", ".join(diff[:4]) + (" ..." if len(diff) > 4 else "")
        parts.append(f"{len(diff)} paths differ from {label} ({shown})")
    return "; ".join(parts)


# -- the run -------------------------------------------------------------------------------------


async def bench_main(args: argparse.Namespace, tmp: Path, log: Any) -> list[Trial]:
    runner = Runner(args, tmp, log)
    calib = []
    for i in range(args.calibrate):
        t = Trial(-1 - i, tmp / f"calib{i}", "none")
        t.dir.mkdir()
        await runner.trial(t, random.Random(f"{args.seed}-calib-{i}"))
        calib.append(t)
        if t.violations:
            log(f"calibration {i}: {t.violations}")
    ok = [t.commit_s for t in calib if not t.violations]
    if not ok:
        raise SystemExit("calibration failed: an uninterrupted commit does not work here")
    runner.window_s = 1.5 * max(ok)
    log(f"uninterrupted commit: {1e3 * min(ok):.1f}-{1e3 * max(ok):.1f} ms; agent kills by time "
        f"in the first {1e3 * runner.window_s:.1f} ms after COMMITTING")
    trials: list[Trial] = []
    for i in range(args.trials):
        kind = "server" if i % 2 == 0 else "agent"
        t = Trial(i, tmp / f"t{i:04d}", kind)
        t.dir.mkdir()
        await runner.trial(t, random.Random(f"{args.seed}-{i}"))
        trials.append(t)
        if t.violations:
            log(f"trial {i} ({kind} {t.mode} n={t.n}/{t.steps} delay={t.delay_ms:.2f}ms "
                f"step={t.step or '-'}): VIOLATION {t.violations} (dir {t.dir})")
        else:
            remove_tree(t.dir)
        if (i + 1) % 20 == 0:
            log(f"{i + 1}/{args.trials} trials, {sum(1 for x in trials if x.violations)} "
                "with violations")
    for t in calib:
        remove_tree(t.dir)
    return [*calib, *trials]


def render(facts: dict[str, str], trials: list[Trial], args: argparse.Namespace,
           seconds: float) -> str:
    real = [t for t in trials if t.kill != "none"]
    out = [
        f"Machine: {machine_line(facts)}. Run took {seconds:.0f} s; seed {args.seed}; "
        f"reopen {'after the old filesystem process exited' if args.settle else 'at once'}.",
        "",
        "| kill | trials | base before | base after | neither | violations "
        "| trial median ms | p95 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def row(label: str, group: list[Trial]) -> str:
        c = Counter(t.outcome for t in group)
        bad = sum(1 for t in group if t.violations)
        s: Stats | None = stats([int(t.seconds * 1e9) for t in group]) if group else None
        times = "- | -" if s is None else f"{s.median_ms:.0f} | {s.p95_ms:.0f}"
        return (f"| {label} | {len(group)} | {c['before']} | {c['after']} | {c['neither']} "
                f"| {bad} | {times} |")

    for kind, mode, label in (
            ("server", "uniform", "filesystem process, uniform journal step"),
            ("server", "boundary", "filesystem process, boundary step"),
            ("agent", "mark", "agent, at a marked journal step"),
            ("agent", "time", "agent, random time after calling commit")):
        out.append(row(label, [t for t in real if t.kill == kind and t.mode == mode]))
    out.append(row("**all**", real))
    server = [t for t in real if t.kill == "server"]
    at = Counter("intent" if t.step == "intent" else "op" if t.step.startswith("op:")
                 else t.step or "?" for t in server)
    steps = [t.steps for t in real]
    out += [
        "",
        f"Filesystem process killed at: intent {at['intent']}, an op {at['op']}, done "
        f"{at['done']}, cleaned {at['cleaned']}. Commits had {min(steps, default=0)}-"
        f"{max(steps, default=0)} journal steps (ops + 3).",
    ]
    bad = [t for t in real if t.violations]
    if bad:
        out += ["", "Violations:", ""]
        for t in bad:
            out.append(f"- trial {t.index} ({t.kill} {t.mode} n={t.n}/{t.steps} "
                       f"delay={t.delay_ms:.2f}ms step={t.step or '-'} outcome={t.outcome}): "
                       + "; ".join(t.violations))
    return "\n".join(out)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--trials", type=int, default=200,
                   help="trials, alternately killing the filesystem process and the agent (200)")
    p.add_argument("--calibrate", type=int, default=3,
                   help="uninterrupted commits first, to time the agent-kill window (3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--settle", action="store_true",
                   help="wait for the old filesystem process to exit before reopening")
    p.add_argument("--dir", type=Path, default=None,
                   help="where the workspaces go (default /dev/shm, else the temp dir)")
    p.add_argument("--json", type=Path, default=None, help="also write every trial here")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--agent", metavar="SPEC", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.calibrate < 1:
        p.error("--calibrate must be at least 1")
    return args


def default_dir() -> Path:
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return shm
    return Path(tempfile.gettempdir())


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.agent:
        return run_agent(args.agent)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    base = args.dir if args.dir is not None else default_dir()
    tmp = Path(tempfile.mkdtemp(prefix="branchagent-bench-crash-", dir=base))

    def log(msg: str) -> None:
        print(f"# {msg}", file=sys.stderr, flush=True)

    started = time.monotonic()
    facts = machine_facts(tmp)
    trials: list[Trial] = []
    try:
        trials = anyio.run(bench_main, args, tmp, log)
    finally:
        if args.keep or not trials or any(t.violations for t in trials):
            log(f"kept {tmp} (the failed trials' directories are there)")
        else:
            remove_tree(tmp)
    seconds = time.monotonic() - started
    print(render(facts, trials, args, seconds))
    if args.json is not None:
        data = {
            "config": {k: (os.fspath(v) if isinstance(v, Path) else v)
                       for k, v in vars(args).items()},
            "machine": facts,
            "seconds": seconds,
            "trials": [t.summary() for t in trials],
        }
        args.json.write_text(json.dumps(data, indent=1) + "\n")
        log(f"wrote {args.json}")
    return 1 if any(t.violations for t in trials) else 0


if __name__ == "__main__":
    sys.exit(main())
