"""Spawn one process tree in a branch's sandbox, wait for it, and make sure it ends.

Layers, outermost first (each only when needed and available)::

    sh (join the run's cgroups) -> prlimit (rlimit fallback) -> unshare (mount, PID,
    [net] namespaces) -> sh (bind the branch over the workspace path, hide the
    state directory) -> the candidate

Whatever happens (exit, timeout, cancellation, abort), the tree is killed:
through the cgroup when there is one (nothing can escape it, setsid or not),
through the PID namespace's init otherwise, and through the process group as
a last resort. Cleanup is shielded.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import anyio
import anyio.to_thread
import attrs
import structlog

from .._limits import Limits
from ..exceptions import IsolationUnavailable, SandboxError
from . import _cgroup

__all__ = ["SpawnOutcome", "check_markers", "isolation_available", "spawn"]

log = structlog.get_logger("branchagent.sandbox")

ISOLATION_FAILED = 125
# Our own failures are told apart from the candidate's exit codes by markers on stderr.
ISOLATION_MARKER = "branchagent: isolation setup failed"
NOT_FOUND_MARKER = "branchagent: executable not found:"
_FAIL = f'{{ echo "{ISOLATION_MARKER}" >&2; exit 125; }}'
# Capabilities a candidate never needs and could use to undo its sandbox (umount the
# branch view or the state dir's cover, remount /sys/fs/cgroup, load modules, ptrace).
# File work as root (DAC override, chown, fowner) is kept.
DROPPED_CAPS = (
    "sys_admin", "sys_module", "sys_boot", "sys_rawio", "sys_time", "net_admin",
    "sys_ptrace", "mknod", "setpcap", "sys_chroot", "mac_admin", "mac_override", "syslog",
    "bpf", "perfmon", "checkpoint_restore", "audit_control", "linux_immutable",
)
_SETPRIV = shutil.which("setpriv")
_DROP = (
    f'exec {_SETPRIV} --no-new-privs --bounding-set '
    + ",".join(f"-{c}" for c in DROPPED_CAPS) + ' -- "$@"'
    if _SETPRIV else 'exec "$@"'
)
_ISOLATE = (
    f'b="$1"; w="$2"; x="$3"; shift 3; mount --bind "$b" "$w" || {_FAIL}; '
    f'while [ "$1" != "--" ]; do mount -t tmpfs -o size=64k,mode=0755 tmpfs "$1" || {_FAIL}; '
    'shift; done; shift; '
    # Read-only, submount-free view of the cgroup tree: no way back out of the run's cgroup.
    'if [ -d /sys/fs/cgroup ]; then mount --bind /sys/fs/cgroup /sys/fs/cgroup && '
    f'mount -o remount,bind,ro /sys/fs/cgroup || {_FAIL}; fi; '
    f'cd "$w" || {_FAIL}; '
    f'command -v "$x" >/dev/null || {{ echo "{NOT_FOUND_MARKER} $x" >&2; exit 127; }}; '
    + _DROP
)


def check_markers(isolate: bool, returncode: int, stderr: str, exe: str, where: Path) -> None:
    """Raise the right error when the sandbox itself (not the candidate) failed."""
    if not isolate:
        return
    if returncode == 127 and stderr.startswith(NOT_FOUND_MARKER):
        raise SandboxError(f"cannot run {exe!r}: not found in the branch")
    if returncode == 125 and ISOLATION_MARKER in stderr:
        raise IsolationUnavailable(
            f"could not set up the branch's view at {where}: {stderr.strip()[-2000:]}"
        )

_isolation: dict[bool, bool] = {}


def isolation_available(network: bool = True) -> bool:
    """Whether ``unshare`` gives us private mount and PID (and net) namespaces here."""
    if network not in _isolation:
        exe = shutil.which("unshare")
        ok = False
        if exe is not None:
            argv = [exe, "--mount", "--pid", "--fork", "--propagation", "private"]
            if not network:
                argv.append("--net")
            if os.geteuid() != 0:
                argv.insert(1, "--map-root-user")
            try:
                res = subprocess.run([*argv, "true"], capture_output=True, check=False, timeout=10)
                ok = res.returncode == 0
            except (OSError, subprocess.TimeoutExpired):
                ok = False
        _isolation[network] = ok
    return _isolation[network]


def _findable(exe: str, cwd: str, path: str | None) -> bool:
    if "/" in exe:
        return os.path.exists(os.path.join(cwd, exe))
    return shutil.which(exe, path=path or os.defpath) is not None


@attrs.frozen
class SpawnOutcome:
    returncode: int
    killed: str | None
    duration: float
    isolated: bool
    enforced: frozenset[str]
    not_enforced: frozenset[str]
    limits_hit: frozenset[str]


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


async def spawn(
    argv: Sequence[str],
    *,
    branch_path: Path,
    workspace_path: Path,
    hide: Sequence[Path] = (),
    limits: Limits,
    isolate: bool,
    env: Mapping[str, str] | None,
    stdin: IO[Any] | int,
    stdout: IO[Any],
    stderr: IO[Any],
    pass_fds: Sequence[int] = (),
    timeout: float | None = None,
    on_cgroup: Callable[[_cgroup.RunCgroup | None, int], None] | None = None,
) -> SpawnOutcome:
    """Run ``argv`` to completion under ``limits``; see the module docstring.

    ``on_cgroup(cgroup_or_None, pid)`` is called once the process started (used
    by the branch for pause/resume) and again with ``(None, 0)`` when it ended.
    """
    if isinstance(argv, str) or not argv:
        raise ValueError("argv must be a non-empty sequence of strings, e.g. ['pytest', '-q']")
    cmd = [os.fspath(a) for a in argv]
    enforced: set[str] = set()
    not_enforced: set[str] = set()
    deadline = timeout if timeout is not None else limits.timeout
    if deadline is not None:
        enforced.add("timeout")

    cg = await anyio.to_thread.run_sync(_cgroup.host().create, limits)
    if cg is not None:
        enforced.update(cg.enforced)
    have = {e.split(":")[0] for e in enforced}
    if limits.memory is not None and "memory" not in have:
        cmd = ["prlimit", f"--as={limits.memory}", "--", *cmd]
        enforced.add("memory:rlimit-as")
    if limits.pids is not None and "pids" not in have:
        not_enforced.add("pids")
    if limits.cpu is not None and "cpu" not in have:
        not_enforced.add("cpu")

    if isolate:
        if not await anyio.to_thread.run_sync(isolation_available, limits.network):
            if cg is not None:
                await anyio.to_thread.run_sync(cg.remove)
            raise IsolationUnavailable(
                "private mount/PID namespaces are not permitted here (unshare failed); "
                "pass isolate=False to run with cwd set to the branch, unisolated"
            )
        prefix = ["unshare", "--mount", "--pid", "--fork", "--kill-child", "--mount-proc",
                  "--propagation", "private"]
        if not limits.network:
            prefix.append("--net")
            enforced.add("network:netns")
        if _SETPRIV:
            enforced.add("caps:dropped")
        else:
            not_enforced.add("caps")
        if os.geteuid() != 0:
            prefix.insert(1, "--map-root-user")
        hidden = [
            os.fspath(h) for h in hide
            if h.exists() and h != workspace_path and h not in workspace_path.parents
        ]
        cmd = [*prefix, "sh", "-c", _ISOLATE, "sh", os.fspath(branch_path),
               os.fspath(workspace_path), os.fspath(argv[0]), *hidden, "--", *cmd]
        cwd = "/"
    else:
        if not limits.network:
            not_enforced.add("network")
        cwd = os.fspath(branch_path)
    if cg is not None:
        cmd = cg.wrap(cmd)
    if not_enforced:
        log.warning("limits_not_enforced", limits=sorted(not_enforced),
                    cgroups=_cgroup.host().kind)

    full_env = dict(os.environ)
    full_env["PYTHONUNBUFFERED"] = "1"
    if env:
        full_env.update(env)
    if not isolate:  # isolated runs look the executable up inside the namespace
        exe = os.fspath(argv[0])
        found = await anyio.to_thread.run_sync(_findable, exe, cwd, full_env.get("PATH"))
        if not found:
            if cg is not None:
                await anyio.to_thread.run_sync(cg.remove)
            raise SandboxError(f"cannot run {exe!r}: not found")

    killed: str | None = None
    started = time.monotonic()
    proc = None
    hit: set[str] = set()
    try:
        try:
            proc = await anyio.open_process(
                cmd, stdin=stdin, stdout=stdout, stderr=stderr, cwd=cwd, env=full_env,
                start_new_session=True, pass_fds=tuple(pass_fds),
            )
        except FileNotFoundError as exc:
            raise SandboxError(f"cannot run {cmd[0]!r}: not found") from exc
        if on_cgroup is not None:
            on_cgroup(cg, proc.pid)
        try:
            with anyio.move_on_after(deadline) as scope:
                await proc.wait()
            if scope.cancelled_caught:
                killed = "timeout"
        except anyio.get_cancelled_exc_class():
            killed = "cancelled"
            raise
    finally:
        with anyio.CancelScope(shield=True):
            if proc is not None:
                _kill_group(proc.pid)
            if cg is not None:
                await anyio.to_thread.run_sync(cg.kill)
            if proc is not None:
                await proc.wait()
                await proc.aclose()
            if on_cgroup is not None:
                on_cgroup(None, 0)
            if cg is not None:
                if await anyio.to_thread.run_sync(cg.oom_killed):
                    hit.add("memory")
                if await anyio.to_thread.run_sync(cg.pids_limit_hit):
                    hit.add("pids")
                await anyio.to_thread.run_sync(cg.remove)
    assert proc is not None
    if "memory" in hit and killed is None:
        killed = "memory"
    duration = time.monotonic() - started
    rc = proc.returncode if proc.returncode is not None else -signal.SIGKILL
    return SpawnOutcome(rc, killed, duration, isolate, frozenset(enforced),
                        frozenset(not_enforced), frozenset(hit))
