"""branchagent: fork a workspace into copy-on-write branches, try, commit the winner."""

from __future__ import annotations

import importlib as _importlib
import typing as _typing

from . import llm as llm  # the vLLM glue; imports neither vllm nor openai
from ._backends import available_backends, load_backend
from ._branch import Backend, Branch, BranchState, Change, ChangeKind, EntryType, Usage
from ._doctor import DoctorCheck, DoctorReport, doctor
from ._events import Event, observe
from ._limits import Limits
from ._protocols import RunOptions
from ._sandbox._run import RunResult
from ._session import Session
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
    InvalidCandidates,
    InvalidLimits,
    InvalidWorkspace,
    IsolationUnavailable,
    LLMError,
    PathEscapeError,
    ProcessKilled,
    RemoteError,
    SandboxError,
    ServeError,
    SessionClosed,
    SessionError,
    SessionForkError,
    SourceError,
    StrategyError,
    StrategyNotFound,
    UsageError,
    WorkspaceAlreadyOpen,
    WorkspaceClosed,
    WorkspaceCorrupt,
    WorkspaceError,
    WorkspaceLocked,
)
from .strategy import (
    Candidate,
    Command,
    Executor,
    InSession,
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

# The built-in strategies are built on branchagent.strategy, a submodule of this package,
# so importing one of them runs this file first: they are imported here only when one of
# their names is first asked for (``ba.BestOfN``, ``from branchagent import Beam``), by
# __getattr__ below, and never while this file runs. Type checkers see them here.
if _typing.TYPE_CHECKING:
    from branchagent_strategies.beam import Beam
    from branchagent_strategies.best_of_n import BestOfN
    from branchagent_strategies.cascaded import Cascaded
    from branchagent_strategies.merge import Merge
    from branchagent_strategies.reflexion import Reflexion
    from branchagent_strategies.speculate import Speculate
    from branchagent_strategies.speculative_execution import SpeculativeExecution
    from branchagent_strategies.tournament import Tournament
    from branchagent_strategies.tree_search import TreeSearch

#: Each built-in strategy's name here -> its module in branchagent_strategies.
_BUILT_INS = {
    "Beam": "beam",
    "BestOfN": "best_of_n",
    "Cascaded": "cascaded",
    "Merge": "merge",
    "Reflexion": "reflexion",
    "Speculate": "speculate",
    "SpeculativeExecution": "speculative_execution",
    "Tournament": "tournament",
    "TreeSearch": "tree_search",
}


# Hidden from type checkers, which see the imports above: with a module __getattr__ they
# would take any misspelt name of this module (``ba.BestofN``) for Any.
if not _typing.TYPE_CHECKING:

    def __getattr__(name: str) -> _typing.Any:
        """The built-in strategies, imported on first use (then kept in this module's dict)."""
        module = _BUILT_INS.get(name)
        if module is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(_importlib.import_module(f"branchagent_strategies.{module}"), name)
        globals()[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*globals(), *_BUILT_INS})


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
    "InSession",
    "InvalidBranchName",
    "InvalidCandidates",
    "InvalidLimits",
    "InvalidWorkspace",
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
    "RunOptions",
    "RunResult",
    "SandboxError",
    "ServeError",
    "Session",
    "SessionClosed",
    "SessionError",
    "SessionForkError",
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
    "WorkspaceAlreadyOpen",
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
