"""branchagent: fork a workspace into copy-on-write branches, try, commit the winner."""

from __future__ import annotations

from ._backends import available_backends, load_backend
from ._branch import Backend, Branch, BranchState, Change, ChangeKind, EntryType
from ._limits import Limits
from ._sandbox._run import RunResult
from ._workspace import Workspace, WorkspaceBranch, open_workspace
from .exceptions import (
    BackendError,
    BackendNotFound,
    BackendUnavailable,
    BranchAgentError,
    BranchClosed,
    BranchError,
    BranchExists,
    BranchInvalidated,
    BranchNotFound,
    CandidateError,
    CommitFailed,
    ConflictError,
    InvalidBranchName,
    IsolationUnavailable,
    PathEscapeError,
    ProcessKilled,
    RemoteError,
    SandboxError,
    StrategyError,
    StrategyNotFound,
    WorkspaceClosed,
    WorkspaceCorrupt,
    WorkspaceError,
    WorkspaceLocked,
)

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "BackendError",
    "BackendNotFound",
    "BackendUnavailable",
    "Branch",
    "BranchAgentError",
    "BranchClosed",
    "BranchError",
    "BranchExists",
    "BranchInvalidated",
    "BranchNotFound",
    "BranchState",
    "CandidateError",
    "Change",
    "ChangeKind",
    "CommitFailed",
    "ConflictError",
    "EntryType",
    "InvalidBranchName",
    "IsolationUnavailable",
    "Limits",
    "PathEscapeError",
    "ProcessKilled",
    "RemoteError",
    "RunResult",
    "SandboxError",
    "StrategyError",
    "StrategyNotFound",
    "Workspace",
    "WorkspaceBranch",
    "WorkspaceClosed",
    "WorkspaceCorrupt",
    "WorkspaceError",
    "WorkspaceLocked",
    "available_backends",
    "load_backend",
    "open_workspace",
]
