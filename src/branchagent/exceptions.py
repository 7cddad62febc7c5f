"""The one exception tree of branchagent.

Every error the library raises on purpose is a subclass of
:class:`BranchAgentError`. Leaves also subclass the builtin a caller would
naturally catch (``LookupError``, ``ValueError``, ``OSError``, ...), so
``except LookupError`` keeps working for code that does not know about us::

    BranchAgentError
    ├── WorkspaceError
    │   ├── WorkspaceClosed              (RuntimeError)
    │   ├── WorkspaceLocked              (BlockingIOError)
    │   └── WorkspaceCorrupt             (RuntimeError)
    ├── BackendError
    │   ├── BackendNotFound              (LookupError)
    │   ├── BackendUnavailable           (RuntimeError)
    │   └── CommitFailed                 (OSError)
    ├── BranchError
    │   ├── InvalidBranchName            (ValueError)
    │   ├── BranchExists                 (FileExistsError)
    │   ├── BranchNotFound               (LookupError)
    │   ├── BranchClosed                 (RuntimeError)
    │   │   └── BranchInvalidated
    │   ├── ConflictError
    │   └── PathEscapeError              (ValueError)
    ├── SandboxError
    │   └── IsolationUnavailable         (RuntimeError)
    └── StrategyError
        ├── StrategyNotFound             (LookupError)
        └── CandidateError

Errors from libraries and the OS are translated at the boundary with
``raise Ours(...) from exc`` so the original stays attached.
"""

from __future__ import annotations

__all__ = [
    "BackendError",
    "BackendNotFound",
    "BackendUnavailable",
    "BranchAgentError",
    "BranchClosed",
    "BranchError",
    "BranchExists",
    "BranchInvalidated",
    "BranchNotFound",
    "CandidateError",
    "CommitFailed",
    "ConflictError",
    "InvalidBranchName",
    "IsolationUnavailable",
    "PathEscapeError",
    "SandboxError",
    "StrategyError",
    "StrategyNotFound",
    "WorkspaceClosed",
    "WorkspaceCorrupt",
    "WorkspaceError",
    "WorkspaceLocked",
]


class BranchAgentError(Exception):
    """Base class of every error branchagent raises on purpose."""


# -- workspace ---------------------------------------------------------------


class WorkspaceError(BranchAgentError):
    """Something is wrong with the workspace as a whole."""


class WorkspaceClosed(WorkspaceError, RuntimeError):
    """The workspace was already closed."""


class WorkspaceLocked(WorkspaceError, BlockingIOError):
    """Another process has this workspace open."""


class WorkspaceCorrupt(WorkspaceError, RuntimeError):
    """The state directory holds something we cannot interpret."""


# -- backends ----------------------------------------------------------------


class BackendError(BranchAgentError):
    """A storage backend failed."""


class BackendNotFound(BackendError, LookupError):
    """No backend is registered under that name."""


class BackendUnavailable(BackendError, RuntimeError):
    """The backend exists but cannot run on this machine (says what to install)."""


class CommitFailed(BackendError, OSError):
    """Applying a commit failed; it was rolled back and nothing changed.

    ``errno`` and ``filename`` carry the OS error that stopped it.
    """


# -- branches ----------------------------------------------------------------


class BranchError(BranchAgentError):
    """An operation on a branch was refused."""


class InvalidBranchName(BranchError, ValueError):
    """A branch name that is not a single, safe path component."""


class BranchExists(BranchError, FileExistsError):
    """A branch with that name already exists in this workspace."""


class BranchNotFound(BranchError, LookupError):
    """No open branch has that name."""


class BranchClosed(BranchError, RuntimeError):
    """The branch was committed or aborted; it can no longer be used."""


class BranchInvalidated(BranchClosed):
    """A sibling (or an ancestor) committed first; this branch is void."""


class ConflictError(BranchError):
    """The parent changed, since the fork, paths that the branch also changed.

    ``paths`` lists them (workspace-relative, POSIX). Nothing was changed.
    """

    def __init__(self, message: str, paths: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.paths = paths


class PathEscapeError(BranchError, ValueError):
    """A path resolves outside the workspace or branch (``..`` or a symlink)."""


# -- sandbox -----------------------------------------------------------------


class SandboxError(BranchAgentError):
    """Running a process inside a branch failed."""


class IsolationUnavailable(SandboxError, RuntimeError):
    """Namespaces are not permitted here; pass ``isolate=False`` to run unisolated."""


# -- strategies --------------------------------------------------------------


class StrategyError(BranchAgentError):
    """A strategy could not run."""


class StrategyNotFound(StrategyError, LookupError):
    """No strategy is registered under that name."""


class CandidateError(StrategyError):
    """A candidate returned something that is not a verdict."""
