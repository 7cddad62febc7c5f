"""Parent side of an isolated Python call (see :mod:`._child`)."""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import anyio
import anyio.to_thread
import cloudpickle  # type: ignore[import-untyped]

from .._limits import Limits
from ..exceptions import ProcessKilled, RemoteError, SandboxError
from ._cgroup import RunCgroup
from ._child import dumps
from ._run import RunResult
from ._spawn import check_markers, spawn

__all__ = ["call_in"]

_CHILD = os.fspath(Path(__file__).with_name("_child.py"))


def _open_files(
    scratch: Path | None, blob: bytes
) -> tuple[Path, contextlib.ExitStack, tuple[IO[bytes], ...]]:
    tmp = Path(tempfile.mkdtemp(prefix="call-", dir=scratch))
    stack = contextlib.ExitStack()
    try:
        (tmp / "in.pkl").write_bytes(blob)
        files = (
            stack.enter_context((tmp / "in.pkl").open("rb")),
            stack.enter_context((tmp / "out.pkl").open("w+b")),
            stack.enter_context((tmp / "stdout").open("wb")),
            stack.enter_context((tmp / "stderr").open("w+b")),
            stack.enter_context(open(os.devnull, "rb")),  # noqa: SIM115
        )
    except BaseException:
        stack.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp, stack, files


def _read_back(out_f: IO[bytes], err_f: IO[bytes]) -> tuple[bytes, str]:
    out_f.seek(0)
    data = out_f.read()
    err_f.seek(0)
    return data, err_f.read()[-4000:].decode("utf-8", errors="replace")


async def call_in(
    branch_path: Path,
    workspace_path: Path,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    *,
    name: str,
    depth: int,
    limits: Limits | None,
    isolate: bool,
    env: Mapping[str, str] | None,
    scratch: Path | None,
    hide: Sequence[Path] = (),
    on_cgroup: Callable[[RunCgroup | None, int], None] | None = None,
    async_backend: str = "asyncio",
) -> Any:
    """Run ``fn(branch, *args, **kwargs)`` in a child process in the branch's sandbox.

    Returns its value, or re-raises its exception (same type, with the child's
    traceback attached as a note). A result of any size gets through.
    """
    info = {
        "name": name,
        "path": os.fspath(workspace_path if isolate else branch_path),
        "depth": depth,
        "async_backend": async_backend,
    }
    try:
        # The caller's sys.path goes first, on its own: functions pickled by reference
        # (from the caller's modules) must be importable before the payload is loaded.
        blob = pickle.dumps(list(sys.path)) + dumps((fn, args, dict(kwargs), info))
    except Exception as exc:
        raise SandboxError(f"cannot send {fn!r} to an isolated process: {exc}") from exc
    limits = limits or Limits()
    tmp, stack, (in_f, out_f, so, se, devnull) = await anyio.to_thread.run_sync(
        _open_files, scratch, blob)
    try:
        with stack:
            o = await spawn(
                # By file path, not -m: the child need not import the whole package.
                [sys.executable, _CHILD, str(in_f.fileno()), str(out_f.fileno())],
                branch_path=branch_path, workspace_path=workspace_path, hide=hide,
                limits=limits, isolate=isolate, env=env, stdin=devnull, stdout=so, stderr=se,
                pass_fds=(in_f.fileno(), out_f.fileno()), on_cgroup=on_cgroup,
            )
            data, err_tail = await anyio.to_thread.run_sync(_read_back, out_f, se)
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(shutil.rmtree, tmp, True)
    check_markers(isolate, o.returncode, err_tail, sys.executable, workspace_path)
    if not data:
        raise ProcessKilled(
            f"isolated call {getattr(fn, '__qualname__', fn)!r} ended without a result "
            f"(returncode {o.returncode}, killed={o.killed!r}): {err_tail}",
            RunResult(
                argv=(sys.executable, _CHILD), returncode=o.returncode, stdout="",
                stderr=err_tail, duration=o.duration, killed=o.killed, isolated=o.isolated,
                enforced=o.enforced, not_enforced=o.not_enforced, limits_hit=o.limits_hit,
            ),
        )
    payload = cloudpickle.loads(data)
    if payload[0] == "ok":
        return payload[1]
    if payload[0] == "err":
        remote: BaseException = payload[1]
        remote.add_note(f"raised in an isolated process; its traceback:\n{payload[2]}")
        raise remote
    _, type_name, message, tb = payload
    raise RemoteError(type_name, message, tb)
