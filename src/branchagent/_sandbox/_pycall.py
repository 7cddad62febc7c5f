"""Parent side of an isolated Python call (see :mod:`._child`)."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import cloudpickle

from .._limits import Limits
from ..exceptions import ProcessKilled, RemoteError, SandboxError
from ._run import RunResult, run_in

__all__ = ["call_in"]


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
    async_backend: str = "asyncio",
) -> Any:
    """Run ``fn(branch, *args, **kwargs)`` in a child process in the branch's sandbox.

    Returns its value, or re-raises its exception (same type, with the child's
    traceback attached as a note). A result of any size gets through.
    """
    tmp = Path(tempfile.mkdtemp(prefix="call-", dir=scratch))
    try:
        in_path, out_path = tmp / "in.pkl", tmp / "out.pkl"
        info = {
            "name": name,
            "path": os.fspath(workspace_path if isolate else branch_path),
            "depth": depth,
            "async_backend": async_backend,
        }
        try:
            in_path.write_bytes(cloudpickle.dumps((fn, args, dict(kwargs), info)))
        except Exception as exc:
            raise SandboxError(f"cannot send {fn!r} to an isolated process: {exc}") from exc
        result: RunResult = await run_in(
            branch_path, workspace_path,
            [sys.executable, "-m", "branchagent._sandbox._child", os.fspath(in_path),
             os.fspath(out_path)],
            limits=limits, isolate=isolate, env=env, scratch=scratch,
        )
        if not out_path.exists():
            raise ProcessKilled(
                f"isolated call {getattr(fn, '__qualname__', fn)!r} ended without a result "
                f"(returncode {result.returncode}, killed={result.killed!r}): "
                f"{result.stderr[-2000:]}",
                result,
            )
        payload = cloudpickle.loads(out_path.read_bytes())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if payload[0] == "ok":
        return payload[1]
    if payload[0] == "err":
        exc, tb = payload[1], payload[2]
        exc.add_note(f"raised in an isolated process; its traceback:\n{tb}")
        raise exc
    _, type_name, message, tb = payload
    raise RemoteError(type_name, message, tb)
