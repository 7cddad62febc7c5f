"""Branch.run(): run a command in a branch, capture its output, bound it, kill it.

The process runs under :func:`._spawn.spawn` (cgroups, namespaces, rlimit
fallback). stdout and stderr are streamed to files in the state directory,
never to pipes that can fill, so a writer of any size neither blocks nor
exhausts memory; what comes back is capped at ``Limits.output`` and says
when it was truncated.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Unpack

import anyio.to_thread
import attrs

from .._limits import Limits
from .._protocols import RunOptions
from . import _cgroup
from ._spawn import check_markers, isolation_available, spawn

__all__ = ["RunResult", "isolation_available", "run_in"]


@attrs.frozen
class RunResult:
    """What a process run in a branch did.

    ``killed`` says why the tree was killed: ``"timeout"``, ``"memory"`` (the
    OOM killer, inside the run's cgroup), ``"cancelled"`` or ``"aborted"``; or
    ``None``. ``enforced`` names the limits really applied and how (for
    example ``"memory:cgroup2"``, ``"pids:cgroup1"``, ``"memory:rlimit-as"``);
    ``not_enforced`` those requested but not available on this host;
    ``limits_hit`` those the process ran into (``"pids"``: a fork failed).
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
    limits_hit: frozenset[str] = frozenset()
    stdout_truncated: bool = False
    stderr_truncated: bool = False

    @property
    def ok(self) -> bool:
        """Exit status 0 and not killed."""
        return self.returncode == 0 and self.killed is None


def _read_capped(path: Path, cap: int | None) -> tuple[str, bool]:
    size = path.stat().st_size
    with path.open("rb") as f:
        data = f.read(cap if cap is not None else size)
    return data.decode("utf-8", errors="replace"), cap is not None and size > cap


def _collect(tmp: Path, cap: int | None) -> tuple[tuple[str, bool], tuple[str, bool]]:
    """The run's stdout and stderr (each cut at ``cap``), then its scratch dir removed."""
    try:
        return _read_capped(tmp / "stdout", cap), _read_capped(tmp / "stderr", cap)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@attrs.frozen
class _Files:
    tmp: Path
    stack: contextlib.ExitStack
    stdin: IO[bytes]
    stdout: IO[bytes]
    stderr: IO[bytes]


def _open_files(scratch: Path | None, stdin: bytes | None) -> _Files:
    """A private scratch dir with the run's stdin/stdout/stderr files, opened."""
    tmp = Path(tempfile.mkdtemp(prefix="run-", dir=scratch))
    stack = contextlib.ExitStack()
    try:
        if stdin is not None:
            (tmp / "stdin").write_bytes(stdin)
            in_f = stack.enter_context((tmp / "stdin").open("rb"))
        else:
            in_f = stack.enter_context(open(os.devnull, "rb"))  # noqa: SIM115
        out_f = stack.enter_context((tmp / "stdout").open("wb"))
        err_f = stack.enter_context((tmp / "stderr").open("wb"))
    except BaseException:
        stack.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _Files(tmp, stack, in_f, out_f, err_f)


async def run_in(
    branch_path: Path,
    workspace_path: Path,
    argv: Sequence[str],
    *,
    scratch: Path | None = None,
    hide: Sequence[Path] = (),
    on_cgroup: Callable[[_cgroup.RunCgroup | None, int], None] | None = None,
    **options: Unpack[RunOptions],
) -> RunResult:
    """Run ``argv`` in ``branch_path``; see ``Branch.run`` (defaults: :class:`RunOptions`)."""
    if isinstance(argv, str) or not argv:
        raise ValueError("argv must be a non-empty sequence of strings, e.g. ['pytest', '-q']")
    limits = options.get("limits") or Limits()
    isolate = options.get("isolate", True)
    files = await anyio.to_thread.run_sync(_open_files, scratch, options.get("stdin"))
    try:
        with files.stack:
            o = await spawn(
                argv, branch_path=branch_path, workspace_path=workspace_path, hide=hide,
                limits=limits, isolate=isolate, env=options.get("env"), stdin=files.stdin,
                stdout=files.stdout, stderr=files.stderr, timeout=options.get("timeout"),
                on_cgroup=on_cgroup,
            )
    except BaseException:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(shutil.rmtree, files.tmp, True)
        raise
    # One trip to a worker thread for both outputs and the clean-up: each trip costs a
    # thread wake-up, which on a loaded machine is most of what a short run costs.
    with anyio.CancelScope(shield=True):
        (stdout, out_trunc), (stderr, err_trunc) = await anyio.to_thread.run_sync(
            _collect, files.tmp, limits.output)
    check_markers(isolate, o.returncode, stderr, os.fspath(argv[0]), workspace_path)
    return RunResult(
        argv=tuple(os.fspath(a) for a in argv), returncode=o.returncode, stdout=stdout,
        stderr=stderr, duration=o.duration, killed=o.killed, isolated=o.isolated,
        enforced=o.enforced | ({"output"} if limits.output is not None else set()),
        not_enforced=o.not_enforced, limits_hit=o.limits_hit,
        stdout_truncated=out_trunc, stderr_truncated=err_trunc,
    )

