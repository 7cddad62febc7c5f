"""Child side of an isolated Python call: ``python -m branchagent._sandbox._child IN_FD OUT_FD``.

Reads ``(fn, args, kwargs, info)`` pickled with cloudpickle from file
descriptor IN_FD (inherited: the state directory is hidden inside the
sandbox), calls
``fn(branch, *args, **kwargs)`` (awaiting it if it is a coroutine function),
and writes ``("ok", value)`` or ``("err", exception, traceback_text)`` to
OUT_FD. Both are regular files, not pipes: a result of any size gets through.
Both sides pickle with :func:`dumps`, which keeps the file names of code sent
by value, so a traceback names the candidate's own files and source lines.
"""

from __future__ import annotations

import inspect
import io
import marshal
import os
import pickle
import sys
import traceback
import types
from collections import ChainMap
from pathlib import Path
from typing import Any, ClassVar

import cloudpickle  # type: ignore[import-untyped]


def _reduce_code(code: types.CodeType) -> tuple[Any, ...]:
    # cloudpickle 3.1.3 and later send code by value as "<dynamic-code>" (no file
    # name, so no source lines in a traceback); marshal keeps it whole. Both ends
    # run the same interpreter (sys.executable), so its marshal format matches.
    return marshal.loads, (marshal.dumps(code),)


class _Pickler(cloudpickle.Pickler):  # type: ignore[misc]
    dispatch_table: ClassVar[ChainMap[Any, Any]] = ChainMap(
        {types.CodeType: _reduce_code}, cloudpickle.Pickler.dispatch_table)


def dumps(obj: Any) -> bytes:
    """``cloudpickle.dumps(obj)``, except that code keeps its file name."""
    with io.BytesIO() as f:
        _Pickler(f).dump(obj)
        return f.getvalue()


class ChildBranch:
    """What an isolated callable gets as its branch: a name and a path, read-only."""

    def __init__(self, info: dict[str, Any]) -> None:
        self.name: str = info["name"]
        self.path: Path = Path(info["path"])
        self.depth: int = info["depth"]

    def __repr__(self) -> str:
        return f"<ChildBranch {self.name!r} at {self.path}>"


def main(argv: list[str]) -> int:
    in_fd, out_fd = int(argv[1]), int(argv[2])
    with os.fdopen(in_fd, "rb") as f:
        for entry in pickle.load(f):  # the caller's sys.path, so its modules import here
            if entry not in sys.path:
                sys.path.append(entry)
        fn, args, kwargs, info = cloudpickle.load(f)
    branch = ChildBranch(info)
    try:
        if inspect.iscoroutinefunction(fn):
            import anyio

            async def call() -> Any:
                return await fn(branch, *args, **kwargs)

            value = anyio.run(call, backend=info.get("async_backend", "asyncio"))
        else:
            value = fn(branch, *args, **kwargs)
        payload: tuple[Any, ...] = ("ok", value)
    except BaseException as exc:  # reported to the parent, which re-raises it
        tb = "".join(traceback.format_exception(exc))
        try:
            dumps(exc)
            payload = ("err", exc, tb)
        except Exception:
            payload = ("err_raw", f"{type(exc).__module__}.{type(exc).__qualname__}", str(exc), tb)
    try:
        data = dumps(payload)
    except Exception as exc:
        data = dumps(
            ("err_raw", "TypeError", f"result of {fn!r} cannot be pickled: {exc}", "")
        )
    with os.fdopen(out_fd, "wb") as out:
        out.write(data)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
