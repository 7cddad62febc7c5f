"""``check_backend``: the targeted checks and the model check, on each event loop."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import anyio

from ._checks import backend_checks
from ._harness import BackendFactory, Check
from ._machine import check_model

if TYPE_CHECKING:
    import hypothesis



def _anyio_backends() -> list[str]:
    return ["asyncio"] + (["trio"] if importlib.util.find_spec("trio") is not None else [])


def _runner(check: Check, factory: BackendFactory, loop: str) -> Callable[[], None]:
    async def main() -> None:
        await check(factory)

    return lambda: anyio.run(main, backend=loop)


def check_backend(
    factory: BackendFactory,
    *,
    examples: int = 200,
    steps: int = 50,
    outside_writes: bool = True,
    anyio_backends: Iterable[str] | None = None,
    only: Iterable[str] | None = None,
    settings: hypothesis.settings | None = None,
) -> None:
    """Run the whole conformance suite against ``factory``'s backend; AssertionError on failure.

    ``factory`` returns a fresh, unopened backend each call. The targeted
    checks (:func:`backend_checks`) run on each of ``anyio_backends`` (asyncio,
    and trio when installed); the model check (:func:`check_model`, named
    ``"model"``) runs ``examples`` x ``steps`` on the first. ``only`` restricts
    the run to some check names. Call it from sync code: it runs its own loops.
    """
    checks = backend_checks()
    names = [*checks, "model"] if only is None else list(only)
    unknown = sorted(set(names) - {*checks, "model"})
    if unknown:
        raise ValueError(f"unknown checks {unknown}; known: {sorted([*checks, 'model'])}")
    loops = list(anyio_backends) if anyio_backends is not None else _anyio_backends()
    for name in names:
        runs: list[tuple[str, Callable[[], None]]]
        if name == "model":
            runs = [(loops[0], lambda: check_model(
                factory, examples=examples, steps=steps, outside_writes=outside_writes,
                anyio_backend=loops[0], settings=settings))]
        else:
            runs = [(loop, _runner(checks[name], factory, loop)) for loop in loops]
        for loop, run in runs:
            try:
                run()
            except AssertionError as exc:
                raise AssertionError(f"conformance check {name!r} failed ({loop}): {exc}"
                                     ) from exc
            except Exception as exc:
                raise AssertionError(f"conformance check {name!r} raised ({loop}): {exc!r}"
                                     ) from exc
