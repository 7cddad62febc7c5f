"""branchagent: fork a workspace into copy-on-write branches, try, commit the winner."""

from __future__ import annotations

from ._backends import available_backends, load_backend
from ._branch import Backend, Branch, BranchState, Change, ChangeKind, EntryType, Usage
from ._doctor import DoctorCheck, DoctorReport, doctor
from ._events import Event, observe
from ._limits import Limits
from ._sandbox._run import RunResult
from ._strategy import (
    Candidate,
    Command,
    Executor,
    Isolated,
    LocalExecutor,
    Outcome,
    Result,
    Strategy,
    Verdict,
    available_strategies,
    get_strategy,
    run_candidate,
)
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

# Last: the built-in strategies import branchagent._strategy, so they come after it.
from branchagent_strategies import (
    Beam,
    BestOfN,
    Cascaded,
    Reflexion,
    Speculate,
    SpeculativeExecution,
    Tournament,
    TreeSearch,
)

from . import llm as llm  # the vLLM glue; imports neither vllm nor openai

__all__ = [
    "Backend",
    "BackendError",
    "BackendNotFound",
    "BackendUnavailable",
    "Beam",
    "BestOfN",
    "Branch",
    "BranchAgentError",
    "BranchClosed",
    "BranchError",
    "BranchExists",
    "BranchInvalidated",
    "BranchNotFound",
    "BranchState",
    "Candidate",
    "CandidateError",
    "Cascaded",
    "Change",
    "ChangeKind",
    "Command",
    "CommitFailed",
    "ConflictError",
    "DoctorCheck",
    "DoctorReport",
    "EntryType",
    "Event",
    "Executor",
    "InvalidBranchName",
    "Isolated",
    "IsolationUnavailable",
    "Limits",
    "LocalExecutor",
    "Outcome",
    "PathEscapeError",
    "ProcessKilled",
    "Reflexion",
    "RemoteError",
    "Result",
    "RunResult",
    "SandboxError",
    "Speculate",
    "SpeculativeExecution",
    "Strategy",
    "StrategyError",
    "StrategyNotFound",
    "Tournament",
    "TreeSearch",
    "Usage",
    "Verdict",
    "Workspace",
    "WorkspaceBranch",
    "WorkspaceClosed",
    "WorkspaceCorrupt",
    "WorkspaceError",
    "WorkspaceLocked",
    "available_backends",
    "available_strategies",
    "doctor",
    "get_strategy",
    "load_backend",
    "observe",
    "open_workspace",
    "run_candidate",
]
