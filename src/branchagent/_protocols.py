"""The protocols of branchagent's seams, in one place.

- :class:`Branch`: what a strategy, a candidate or an agent works with.
- :class:`RunOptions`: the keyword options of :meth:`Branch.run`, written once
  here; the protocol, the workspace's branch and the sandbox take them as
  ``**options: Unpack[RunOptions]``.
- :class:`Backend`: what stores branch data under a workspace (built-ins and
  plugins alike, found through the ``branchagent.backends`` entry points). The
  features a workspace asks a backend about are declared here too, not reached
  through ``getattr``.
- :class:`Executor`: where a strategy's candidates execute (re-exported by
  :mod:`branchagent.strategy`).
- :class:`Source`: where :mod:`branchagent.llm` samples completions (re-exported
  there).

The values they speak (states, changes, usage) are in :mod:`._types`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypedDict, Unpack, runtime_checkable

from ._limits import Limits
from ._types import BranchState, Change, Usage

if TYPE_CHECKING:
    # Types of upper layers, named only in annotations (the layering test exempts these).
    from contextlib import AbstractAsyncContextManager

    from ._sandbox._run import RunResult
    from .llm._completion import Completion
    from .llm._sources import Prompt
    from .strategy._candidates import Candidate
    from .strategy._values import Verdict

__all__ = [
    "Backend",
    "Branch",
    "Executor",
    "RunOptions",
    "SavedBranches",
    "Source",
    "check_run_options",
]

#: Branch records a backend keeps itself: name -> ``{"parent": name | None, "created": t}``.
SavedBranches = dict[str, dict[str, object]]


class RunOptions(TypedDict, total=False):
    """The keyword options of :meth:`Branch.run`; each may be left out.

    - ``limits`` (default ``None``: no limits): a :class:`~branchagent.Limits`.
    - ``isolate`` (default ``True``): run in private mount and PID namespaces
      where the branch is at the workspace's path; ``False`` runs in the branch
      directory.
    - ``env`` (default ``None``): added to the current environment.
    - ``stdin`` (default ``None``: empty): fed to the process.
    - ``timeout`` (default ``None``; or ``limits.timeout``): seconds of wall
      time for the whole process tree.

    A wrapper can forward them typed: ``def run(argv, **options:
    Unpack[RunOptions])``.
    """

    limits: Limits | None
    isolate: bool
    env: Mapping[str, str] | None
    stdin: bytes | None
    timeout: float | None


def check_run_options(options: Mapping[str, object], where: str = "run") -> None:
    """Raise ``TypeError`` for a name :class:`RunOptions` does not have, as a keyword
    list would (``**options`` accepts any name at run time)."""
    for key in options:
        if key not in RunOptions.__optional_keys__:
            raise TypeError(f"{where}() got an unexpected keyword argument {key!r}")


@runtime_checkable
class Branch(Protocol):
    """An isolated, copy-on-write view of a workspace (or of another branch).

    ``path`` is a real directory any process can use. Every method raises
    ``BranchClosed`` once the branch is no longer OPEN.
    """

    @property
    def name(self) -> str: ...

    @property
    def path(self) -> Path: ...

    @property
    def parent(self) -> Branch | None: ...

    @property
    def state(self) -> BranchState: ...

    @property
    def depth(self) -> int: ...

    async def fork(self, name: str | None = None, *,
                   disk_limit: int | str | None = None) -> Branch: ...

    def branch(self, name: str | None = None) -> AbstractAsyncContextManager[Branch]: ...

    async def commit(self) -> None: ...

    async def abort(self) -> None: ...

    async def changes(self) -> list[Change]: ...

    async def diff(self) -> str: ...

    async def usage(self) -> Usage: ...

    def resolve(self, path: str | os.PathLike[str]) -> Path: ...

    async def run(self, argv: Sequence[str], **options: Unpack[RunOptions]) -> RunResult:
        """Run ``argv`` as a new process tree in the branch (options: :class:`RunOptions`)."""

    async def call(
        self,
        fn: Callable[..., Any],
        *args: Any,
        limits: Limits | None = None,
        isolate: bool = True,
        env: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> Any: ...

    async def pause(self) -> None: ...

    async def resume(self) -> None: ...


@runtime_checkable
class Backend(Protocol):
    """What a storage backend implements. The workspace owns the lifecycle rules.

    Names given to a backend are already validated; ``parent`` is ``None``
    for the workspace's base directory. A backend is opened once, used by
    one workspace, and closed once (closing twice is harmless).

    Besides the operations, a backend declares three features as class
    attributes: ``disk_limits`` (how it enforces per-branch disk limits,
    ``"fuse"``, or ``None``: it cannot), ``isolates_outside_writes`` (whether
    writes made into the base from outside stay invisible to top-level
    branches), and ``keeps_branches`` (whether it records its branches durably
    itself, listed by :meth:`saved_branches`; else the workspace keeps
    ``branches.json``).
    """

    name: str
    disk_limits: str | None
    isolates_outside_writes: bool
    keeps_branches: bool

    async def open(self, root: Path, state_dir: Path) -> None:
        """Take over ``root``; recover unfinished commits; keep data of surviving branches."""

    async def create(self, name: str, parent: str | None) -> Path:
        """Make branch ``name`` as a snapshot of ``parent`` and return its directory.

        The backend remembers ``parent``: :meth:`commit` merges into it.
        """

    async def commit(self, name: str) -> list[Change]:
        """Merge ``name`` into the parent it was created from, atomically, then release
        ``name``'s storage.

        Raises ``ConflictError`` or ``CommitFailed`` and changes nothing on failure.
        """

    async def abort(self, name: str) -> None:
        """Release ``name``'s storage. Idempotent."""

    async def abort_many(self, names: Sequence[str]) -> None:
        """Release the storage of every branch in ``names`` (children before parents), in
        one request where the backend has requests. Idempotent, like :meth:`abort`."""

    async def changes(self, name: str, parent: str | None) -> list[Change]:
        """What ``name`` changed since it was forked from ``parent``."""

    async def old_content(self, name: str, parent: str | None, path: str) -> bytes | None:
        """Content of file ``path`` as ``name`` saw it at the fork; None when not available."""

    async def usage(self, name: str) -> Usage:
        """What ``name``'s own copy-on-write storage holds (see :class:`Usage`)."""

    async def set_disk_limit(self, name: str, limit: int | None) -> str | None:
        """Cap the bytes ``name``'s own storage may hold (``None``: no cap).

        Returns how the cap is enforced (``"fuse"``: writes past it fail with
        ``EDQUOT``), or ``None`` when this backend cannot enforce one.
        """

    def path(self, name: str | None) -> Path:
        """The directory of branch ``name`` (the base for ``None``)."""

    def exists(self, name: str) -> bool:
        """Whether ``name``'s storage survives (used when reopening after a crash)."""

    def saved_branches(self) -> SavedBranches | None:
        """The branches this open backend recorded itself (``keeps_branches``), else None."""

    def read_saved_branches(self, state_dir: Path) -> SavedBranches | None:
        """The same, read from ``state_dir`` on disk while another process may serve the
        workspace (``branchagent status``); None when the backend keeps no records."""

    async def aclose(self) -> None:
        """Release every resource. Idempotent."""


@runtime_checkable
class Executor(Protocol):
    """Where candidates execute. The strategy forks and commits; the executor runs.

    ``execute`` runs ``candidate`` so that its effects land in ``branch`` and
    returns its verdict, raising what the candidate raised (see
    :func:`~branchagent.strategy.run_candidate`). Strategies call it from their
    own task group, so concurrency and cancellation stay structured: a remote
    executor awaits its worker and, when cancelled, must stop it before returning.
    """

    async def execute(self, candidate: Candidate, branch: Branch) -> Verdict: ...


@runtime_checkable
class Source(Protocol):
    """Something that samples ``n`` completions with logprobs for a prompt, in one call."""

    async def sample(
        self, prompt: Prompt, n: int, *, sampling: Mapping[str, Any] | None = None
    ) -> list[Completion]:
        """``n`` completions of ``prompt`` (``sampling`` adds to or overrides the source's own)."""
        ...
