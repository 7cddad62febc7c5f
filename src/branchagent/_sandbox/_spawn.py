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

import functools
import os
import pwd
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

from .._limits import Limits
from .._log import get_logger
from ..exceptions import IsolationUnavailable, SandboxError
from . import _cgroup

__all__ = [
    "BRANCH_PATH_ENV",
    "WORKSPACE_ENV",
    "SpawnOutcome",
    "check_markers",
    "isolation_available",
    "isolation_problem",
    "spawn",
]

log = get_logger("branchagent.sandbox")

ISOLATION_FAILED = 125
#: Set for every process a branch runs: the workspace's path (where an isolated run sees
#: the branch) and the branch's own path. ``open_workspace`` refuses a path inside either,
#: so that a workspace is never opened inside a branch of another (its state directory
#: would become a change of that branch).
WORKSPACE_ENV = "BRANCHAGENT_WORKSPACE"
BRANCH_PATH_ENV = "BRANCHAGENT_BRANCH_PATH"
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
# Read-only view of the cgroup tree, so a candidate cannot move itself out of its run's
# cgroup. As root: a plain bind remounted read-only (submounts are left out of the view).
_CGROUP_RO_ROOT = (
    'if [ -d /sys/fs/cgroup ]; then mount --bind /sys/fs/cgroup /sys/fs/cgroup && '
    f'mount -o remount,bind,ro /sys/fs/cgroup || {_FAIL}; fi; '
)
# In a user namespace the host's mounts are locked: a non-recursive bind of a tree with
# submounts is refused (EINVAL, "wrong fs type"), and a remount must keep the locked
# flags (nosuid, nodev, noexec, atime). So: a recursive bind, then every mount in it
# remounted read-only with its own flags kept. (A user with a delegated cgroup, e.g. a
# systemd scope, owns the cgroups around its run and could otherwise leave it.)
_CGROUP_RO_USERNS = (
    'if [ -d /sys/fs/cgroup ]; then '
    f'mount --rbind /sys/fs/cgroup /sys/fs/cgroup || {_FAIL}; '
    'while read -r _ _ _ _ m o _; do case "$m" in /sys/fs/cgroup|/sys/fs/cgroup/*) '
    f'mount -o "remount,bind,ro${{o#r[ow]}}" "$m" || {_FAIL};; esac; '
    'done < /proc/self/mountinfo; fi; '
)


def _isolate_script(cgroup_ro: str) -> str:
    return (
        f'b="$1"; w="$2"; x="$3"; shift 3; mount --bind "$b" "$w" || {_FAIL}; '
        f'while [ "$1" != "--" ]; do mount -t tmpfs -o size=64k,mode=0755 tmpfs "$1" || {_FAIL}; '
        'shift; done; shift; '
        + cgroup_ro
        + f'cd "$w" || {_FAIL}; '
        f'command -v "$x" >/dev/null || {{ echo "{NOT_FOUND_MARKER} $x" >&2; exit 127; }}; '
        + _DROP
    )


_ISOLATE = _isolate_script(_CGROUP_RO_ROOT)
_ISOLATE_USERNS = _isolate_script(_CGROUP_RO_USERNS)


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

def _unshare_argv(network: bool) -> list[str]:
    """The namespaces of an isolated run; as a non-root user, in a user namespace of its own
    (the user becomes root there, with power over nothing but its own namespaces)."""
    argv = ["unshare", "--mount", "--pid", "--fork", "--kill-child", "--mount-proc",
            "--propagation", "private"]
    if not network:
        argv.append("--net")
    if os.geteuid() != 0:
        argv[1:1] = ["--user", "--map-root-user"]
    return argv


def _read_sysctl(name: str) -> str | None:
    try:
        with open("/proc/sys/" + name.replace(".", "/")) as f:
            return f.read().strip()
    except OSError:
        return None


def _userns_setting() -> str | None:
    """The kernel setting that forbids this user a user namespace, named with its fix."""
    if _read_sysctl("kernel.unprivileged_userns_clone") == "0":
        return ("kernel.unprivileged_userns_clone = 0 (as root: "
                "`sysctl -w kernel.unprivileged_userns_clone=1`)")
    if _read_sysctl("user.max_user_namespaces") == "0":
        return ("user.max_user_namespaces = 0 (as root: "
                "`sysctl -w user.max_user_namespaces=15000`)")
    if _read_sysctl("kernel.apparmor_restrict_unprivileged_userns") == "1":
        return ("kernel.apparmor_restrict_unprivileged_userns = 1 (as root: `sysctl -w "
                "kernel.apparmor_restrict_unprivileged_userns=0`, or an AppArmor profile "
                "granting `userns` to this Python)")
    return None


def _probe(network: bool) -> str | None:
    """None when the run's namespaces can be made here, else why not (said for people)."""
    argv = _unshare_argv(network)
    exe = shutil.which(argv[0])
    if exe is None:
        return "`unshare` (util-linux) is not installed; apt-get install util-linux"
    try:
        res = subprocess.run([exe, *argv[1:], "true"], capture_output=True, check=False,
                             timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`unshare` could not be run: {exc}"
    if res.returncode == 0:
        return None
    said = res.stderr.decode(errors="replace").strip()[-500:] or f"exit {res.returncode}"
    if os.geteuid() == 0:
        return f"private mount/PID namespaces are not permitted here ({said})"
    user = _user_name()
    setting = _userns_setting()
    if setting is not None:
        return (f"isolate=True needs a user namespace for the non-root user {user} "
                f"(`unshare --user --map-root-user`), and user namespaces are disabled "
                f"here: {setting}")
    return (f"isolate=True needs a user namespace with private mount/PID namespaces for "
            f"the non-root user {user} (`unshare --user --map-root-user`), and unshare "
            f"failed: {said}")


def _user_name() -> str:
    uid = os.geteuid()
    try:
        return f"{pwd.getpwuid(uid).pw_name!r} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


_isolation: dict[tuple[bool, int], str | None] = {}


def isolation_problem(network: bool = True) -> str | None:
    """Why an isolated run cannot work here (``None``: it can); looked at once per process."""
    key = (network, os.geteuid())
    if key not in _isolation:
        _isolation[key] = _probe(network)
    return _isolation[key]


def isolation_available(network: bool = True) -> bool:
    """Whether ``unshare`` gives us private mount and PID (and net) namespaces here
    (as a non-root user: inside a user namespace)."""
    return isolation_problem(network) is None


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


class Child:
    """A started process, awaited through a pidfd.

    Started by :class:`subprocess.Popen`, which uses vfork (or posix_spawn): the cost of
    a start does not grow with this process's memory. An event loop's own spawn may use
    fork instead (uvloop does), and in a large process, such as vLLM's API server with
    torch loaded, copying the page tables made every verifier start 5-10x slower.
    """

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._popen = popen
        self.pid = popen.pid
        try:
            self._pidfd: int | None = os.pidfd_open(popen.pid)
        except (AttributeError, OSError):  # no pidfd (Linux < 5.3): a thread waits
            self._pidfd = None

    @classmethod
    def start(cls, argv: Sequence[str], *, stdin: IO[Any] | int, stdout: IO[Any],
              stderr: IO[Any], cwd: str, env: Mapping[str, str],
              pass_fds: tuple[int, ...], look_up: str | None = None) -> Child:
        """Start ``argv`` in a new session (blocking: call it in a worker thread), after
        checking that the executable ``look_up`` is found from ``cwd`` and ``env``'s PATH."""
        if look_up is not None and not _findable(look_up, cwd, env.get("PATH")):
            raise SandboxError(f"cannot run {look_up!r}: not found")
        return cls(subprocess.Popen(argv, stdin=stdin, stdout=stdout, stderr=stderr, cwd=cwd,
                                    env=env, start_new_session=True, pass_fds=pass_fds))

    @property
    def returncode(self) -> int | None:
        return self._popen.returncode

    async def wait(self) -> int:
        """Wait for the process to end (reaping it) and return its exit status."""
        while (rc := self._popen.poll()) is None:
            if self._pidfd is None:
                return await anyio.to_thread.run_sync(self._popen.wait,
                                                      abandon_on_cancel=True)
            await anyio.wait_readable(self._pidfd)
        return rc

    def close(self) -> None:
        """Release the pidfd (idempotent); call once the process was waited for."""
        fd, self._pidfd = self._pidfd, None
        if fd is not None:
            os.close(fd)


def _finish_cgroup(cg: _cgroup.RunCgroup, *, kill: bool) -> set[str]:
    """Kill what is left in ``cg`` (when ``kill``), then the limits it hit, read before it
    is removed: one worker-thread trip."""
    hit = set()
    try:
        if kill:
            cg.kill()
        if cg.oom_killed():
            hit.add("memory")
        if cg.pids_limit_hit():
            hit.add("pids")
    finally:
        cg.remove()
    return hit


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
    # From here on the run's cgroup exists: whatever happens (an error, a cancellation
    # before the process even started), the finally below kills what is in it and removes it.
    killed: str | None = None
    proc: Child | None = None
    hit: set[str] = set()
    try:
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
                problem = isolation_problem(limits.network) or (
                    "private mount/PID namespaces are not permitted here")
                raise IsolationUnavailable(
                    f"{problem}; or pass isolate=False to run with cwd set to the branch, "
                    "unisolated")
            prefix = _unshare_argv(limits.network)
            if not limits.network:
                enforced.add("network:netns")
            if _SETPRIV:
                enforced.add("caps:dropped")
            else:
                not_enforced.add("caps")
            hidden = [
                os.fspath(h) for h in hide
                if h.exists() and h != workspace_path and h not in workspace_path.parents
            ]
            script = _ISOLATE if os.geteuid() == 0 else _ISOLATE_USERNS
            cmd = [*prefix, "sh", "-c", script, "sh", os.fspath(branch_path),
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
        full_env[WORKSPACE_ENV] = os.fspath(workspace_path)
        full_env[BRANCH_PATH_ENV] = os.fspath(branch_path)
        if env:
            full_env.update(env)
        # Isolated runs look the executable up inside the namespace; others here, in the
        # same worker-thread trip as the start.
        look_up = None if isolate else os.fspath(argv[0])
        started = time.monotonic()
        try:
            # Shielded: once the process exists, ``proc`` must hold it for the cleanup below.
            with anyio.CancelScope(shield=True):
                proc = await anyio.to_thread.run_sync(functools.partial(
                    Child.start, cmd, stdin=stdin, stdout=stdout, stderr=stderr, cwd=cwd,
                    env=full_env, pass_fds=tuple(pass_fds), look_up=look_up))
        except FileNotFoundError as exc:
            raise SandboxError(f"cannot run {cmd[0]!r}: not found") from exc
        assert proc is not None  # a shielded scope swallows nothing
        if on_cgroup is not None:
            on_cgroup(cg, proc.pid)
        try:
            with anyio.move_on_after(deadline) as scope:
                await proc.wait()
            ended = time.monotonic()
            if scope.cancelled_caught:
                killed = "timeout"
        except anyio.get_cancelled_exc_class():
            killed = "cancelled"
            raise
    finally:
        with anyio.CancelScope(shield=True):
            if proc is not None:
                _kill_group(proc.pid)
            # The run's own process has exited (the common case): what it left in its
            # cgroup is killed in the same trip that reads and removes the cgroup.
            kill_later = cg is not None and proc is not None and proc.returncode is not None
            if cg is not None and not kill_later:
                await anyio.to_thread.run_sync(cg.kill)
            if proc is not None:
                await proc.wait()
                proc.close()
            if on_cgroup is not None and proc is not None:
                on_cgroup(None, 0)
            if cg is not None:
                hit.update(await anyio.to_thread.run_sync(
                    functools.partial(_finish_cgroup, cg, kill=kill_later)))
    assert proc is not None
    if "memory" in hit and killed is None:
        killed = "memory"
    # The run's time: from the start to its process's exit (or the kill that ended it),
    # not the cleanup after it.
    duration = ended - started
    rc = proc.returncode if proc.returncode is not None else -signal.SIGKILL
    return SpawnOutcome(rc, killed, duration, isolate, frozenset(enforced),
                        frozenset(not_enforced), frozenset(hit))
