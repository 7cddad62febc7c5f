"""Branch.run(): spawn a process tree in a branch, capture its output, bound it, kill it.

This is the first cut of the sandbox: it gives every guarantee it states and
reports honestly which limits were enforced. Isolation uses ``unshare``
(util-linux): a private mount namespace in which the branch directory is
bind-mounted over the workspace's original path, and a private PID
namespace whose init is killed with the tree. Output goes to files, never
to pipes that can fill. Limits: ``timeout`` (wall clock, whole tree),
``memory`` (RLIMIT_AS through ``prlimit``) and ``output`` (capped when read
back) are enforced; ``pids``, ``cpu`` and ``network=False`` need the cgroup
layer and are reported as not enforced.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import anyio
import attrs
import structlog

from .._limits import Limits
from ..exceptions import IsolationUnavailable, SandboxError

__all__ = ["RunResult", "run_in"]

log = structlog.get_logger("branchagent.sandbox")

_ISOLATE_SCRIPT = 'mount --bind "$1" "$2" || exit 125; cd "$2" || exit 125; shift 2; exec "$@"'


@attrs.frozen
class RunResult:
    """What a process run in a branch did.

    ``killed`` says why the tree was killed (``"timeout"``, ``"cancelled"``)
    or is ``None``. ``enforced`` names the limits that were really applied;
    ``not_enforced`` those requested but not available here.
    """

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    duration: float
    killed: str | None = None
    isolated: bool = False
    enforced: frozenset[str] = frozenset()
    not_enforced: frozenset[str] = frozenset()
    stdout_truncated: bool = False
    stderr_truncated: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.killed is None


def _read_capped(path: Path, cap: int | None) -> tuple[str, bool]:
    size = path.stat().st_size
    with path.open("rb") as f:
        data = f.read(cap if cap is not None else size)
    return data.decode("utf-8", errors="replace"), cap is not None and size > cap


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


_isolation_checked: bool | None = None


def isolation_available() -> bool:
    """Whether ``unshare`` can give us private mount and PID namespaces here."""
    global _isolation_checked
    if _isolation_checked is None:
        exe = shutil.which("unshare")
        if exe is None:
            _isolation_checked = False
        else:
            argv = [exe, "--mount", "--pid", "--fork", "--propagation", "private"]
            if os.geteuid() != 0:
                argv.insert(1, "--map-root-user")
            res = subprocess.run([*argv, "true"], capture_output=True, check=False, timeout=10)
            _isolation_checked = res.returncode == 0
    return _isolation_checked


async def run_in(
    branch_path: Path,
    workspace_path: Path,
    argv: Sequence[str],
    *,
    limits: Limits | None = None,
    isolate: bool = True,
    env: Mapping[str, str] | None = None,
    stdin: bytes | None = None,
    timeout: float | None = None,
    scratch: Path | None = None,
) -> RunResult:
    """Run ``argv`` in ``branch_path``; see ``Branch.run``."""
    if isinstance(argv, str) or not argv:
        raise ValueError("argv must be a non-empty sequence of strings, e.g. ['pytest', '-q']")
    limits = limits or Limits()
    deadline = timeout if timeout is not None else limits.timeout
    enforced: set[str] = set()
    not_enforced: set[str] = set()
    cmd = [os.fspath(a) for a in argv]
    if limits.memory is not None:
        cmd = ["prlimit", f"--as={limits.memory}", "--", *cmd]
        enforced.add("memory:rlimit-as")
    for name, value in (("pids", limits.pids), ("cpu", limits.cpu)):
        if value is not None:
            not_enforced.add(name)
    if not limits.network:
        not_enforced.add("network")
    if deadline is not None:
        enforced.add("timeout")
    if limits.output is not None:
        enforced.add("output")
    if isolate:
        if not await anyio.to_thread.run_sync(isolation_available):
            raise IsolationUnavailable(
                "private mount/PID namespaces are not permitted here (unshare failed); "
                "pass isolate=False to run with cwd set to the branch, unisolated"
            )
        prefix = ["unshare", "--mount", "--pid", "--fork", "--kill-child", "--mount-proc",
                  "--propagation", "private"]
        if os.geteuid() != 0:
            prefix.insert(1, "--map-root-user")
        cmd = [*prefix, "sh", "-c", _ISOLATE_SCRIPT, "sh",
               os.fspath(branch_path), os.fspath(workspace_path), *cmd]
        cwd = "/"
    else:
        cwd = os.fspath(branch_path)
    if not_enforced:
        log.warning("limits_not_enforced", limits=sorted(not_enforced),
                    reason="no cgroup layer in this version")
    full_env = dict(os.environ)
    full_env["PYTHONUNBUFFERED"] = "1"
    if env:
        full_env.update(env)
    tmp = Path(tempfile.mkdtemp(prefix="run-", dir=scratch))
    out_path, err_path = tmp / "stdout", tmp / "stderr"
    killed: str | None = None
    started = time.monotonic()
    try:
        with out_path.open("wb") as out_f, err_path.open("wb") as err_f:
            in_f = None
            if stdin is not None:
                (tmp / "stdin").write_bytes(stdin)
                in_f = (tmp / "stdin").open("rb")
            try:
                try:
                    proc = await anyio.open_process(
                        cmd, stdin=in_f if in_f is not None else subprocess.DEVNULL,
                        stdout=out_f, stderr=err_f, cwd=cwd, env=full_env,
                        start_new_session=True,
                    )
                except FileNotFoundError as exc:
                    raise SandboxError(f"cannot run {cmd[0]!r}: not found") from exc
                try:
                    with anyio.move_on_after(deadline) as scope:
                        await proc.wait()
                    if scope.cancelled_caught:
                        killed = "timeout"
                except anyio.get_cancelled_exc_class():
                    killed = "cancelled"
                    raise
                finally:
                    if proc.returncode is None or killed is not None:
                        _kill_group(proc.pid)
                        with anyio.CancelScope(shield=True):
                            await proc.wait()
                    await proc.aclose()
            finally:
                if in_f is not None:
                    in_f.close()
        duration = time.monotonic() - started
        stdout, out_trunc = _read_capped(out_path, limits.output)
        stderr, err_trunc = _read_capped(err_path, limits.output)
        rc = proc.returncode if proc.returncode is not None else -signal.SIGKILL
        if isolate and rc == 125 and not stdout:
            raise IsolationUnavailable(f"could not bind the branch over {workspace_path}: {stderr}")
        return RunResult(
            argv=tuple(os.fspath(a) for a in argv), returncode=rc, stdout=stdout, stderr=stderr,
            duration=duration, killed=killed, isolated=isolate,
            enforced=frozenset(enforced), not_enforced=frozenset(not_enforced),
            stdout_truncated=out_trunc, stderr_truncated=err_trunc,
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
