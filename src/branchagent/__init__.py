"""branchagent: fork a workspace into copy-on-write branches, try, commit the winner."""

from __future__ import annotations

from ._backends import available_backends, load_backend
from ._branch import Backend, Branch, BranchState, Change, ChangeKind, EntryType, Usage
from ._doctor import DoctorCheck, DoctorReport, doctor
from ._events import Event, observe
from ._limits import Limits
from ._sandbox._run import RunResult
from ._workspace import Workspace, WorkspaceBranch, open_workspace
from .exceptions import (
    ApplyError,
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
    LLMError,
    PathEscapeError,
    ProcessKilled,
    RemoteError,
    SandboxError,
    ServeError,
    SourceError,
    StrategyError,
    StrategyNotFound,
    UsageError,
    WorkspaceClosed,
    WorkspaceCorrupt,
    WorkspaceError,
    WorkspaceLocked,
)
from .strategy import (
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

__version__ = "0.1.0"

# Last: the built-in strategies are built on branchagent.strategy. They are imported
# module by module (not from the package), so that importing one of them first
# (branchagent_strategies imports branchagent before its modules) is no cycle.
from branchagent_strategies.beam import Beam
from branchagent_strategies.best_of_n import BestOfN
from branchagent_strategies.cascaded import Cascaded
from branchagent_strategies.merge import Merge
from branchagent_strategies.reflexion import Reflexion
from branchagent_strategies.speculate import Speculate
from branchagent_strategies.speculative_execution import SpeculativeExecution
from branchagent_strategies.tournament import Tournament
from branchagent_strategies.tree_search import TreeSearch

from . import llm as llm  # the vLLM glue; imports neither vllm nor openai

__all__ = [
    "ApplyError",
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
    "LLMError",
    "Limits",
    "LocalExecutor",
    "Merge",
    "Outcome",
    "PathEscapeError",
    "ProcessKilled",
    "Reflexion",
    "RemoteError",
    "Result",
    "RunResult",
    "SandboxError",
    "ServeError",
    "SourceError",
    "Speculate",
    "SpeculativeExecution",
    "Strategy",
    "StrategyError",
    "StrategyNotFound",
    "Tournament",
    "TreeSearch",
    "Usage",
    "UsageError",
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
