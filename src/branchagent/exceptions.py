"""The one exception tree of branchagent.

Every error the library raises on purpose is a subclass of
:class:`BranchAgentError`. Leaves also subclass the builtin a caller would
naturally catch (``LookupError``, ``ValueError``, ``OSError``, ...), so
``except LookupError`` keeps working for code that does not know about us::

    BranchAgentError
    ├── WorkspaceError
    │   ├── WorkspaceClosed              (RuntimeError)
    │   ├── WorkspaceLocked              (BlockingIOError)
    │   │   └── WorkspaceAlreadyOpen
    │   ├── WorkspaceCorrupt             (RuntimeError)
    │   └── InvalidWorkspace             (ValueError)
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
    │   ├── InvalidLimits                (ValueError)
    │   ├── IsolationUnavailable         (RuntimeError)
    │   ├── ProcessKilled                (ChildProcessError)
    │   ├── RemoteError
    │   └── SessionError
    │       ├── SessionClosed            (RuntimeError)
    │       └── SessionForkError         (RuntimeError)
    ├── StrategyError
    │   ├── StrategyNotFound             (LookupError)
    │   ├── InvalidCandidates            (ValueError)
    │   └── CandidateError
    ├── LLMError
    │   ├── ApplyError                   (ValueError)
    │   └── SourceError                  (RuntimeError)
    ├── ServeError
    └── UsageError                       (ValueError)

Errors from libraries and the OS are translated at the boundary with
``raise Ours(...) from exc`` so the original stays attached. ``LLMError`` and
its leaves are :mod:`branchagent.llm`'s, ``ServeError`` is
:mod:`branchagent.serve`'s and ``UsageError`` the ``branchagent`` command's
(:mod:`branchagent.cli`): defined here, with the rest of the tree, and
re-exported by those modules too.

``ApplyError``: a completion could not be turned into a change on its branch
(a diff hunk that does not apply, no fenced block naming a file, a path
outside the branch, a returned command that failed); it fails that candidate
only. ``SourceError``: the model (an offline ``vllm.LLM`` or an
OpenAI-compatible server) failed to produce candidates; the library's own
exception is attached as ``__cause__``. ``ServeError``: what the server
answers a request with, as an OpenAI-shaped JSON body and an HTTP status.
``InvalidWorkspace``, ``InvalidLimits`` and ``InvalidCandidates`` refuse bad input at
the door (a path that cannot be a workspace, a ``Limits`` field of the wrong type or
value, candidates that are not a non-empty collection of candidates), before anything
is created; each message names the problem and its fix. ``WorkspaceAlreadyOpen``: this
process already has the workspace open (the message says where it was opened).
``UsageError``: the ``branchagent`` command was used wrongly, or the host
lacks what it needs; it exits 2 with a message that says what to do.
"""

from __future__ import annotations

__all__ = [
    "ApplyError",
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
    "InvalidCandidates",
    "InvalidLimits",
    "InvalidWorkspace",
    "IsolationUnavailable",
    "LLMError",
    "PathEscapeError",
    "ProcessKilled",
    "RemoteError",
    "SandboxError",
    "ServeError",
    "SessionClosed",
    "SessionError",
    "SessionForkError",
    "SourceError",
    "StrategyError",
    "StrategyNotFound",
    "UsageError",
    "WorkspaceAlreadyOpen",
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


class WorkspaceAlreadyOpen(WorkspaceLocked):
    """This process already has the workspace open; the message names where it was opened."""


class WorkspaceCorrupt(WorkspaceError, RuntimeError):
    """The state directory holds something we cannot interpret."""


class InvalidWorkspace(WorkspaceError, ValueError):
    """The path cannot be a workspace (``/``, a branch of another workspace, a state
    directory, a state directory inside the workspace); nothing was created."""


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


class InvalidLimits(SandboxError, ValueError):
    """A :class:`~branchagent.Limits` field of the wrong type or value (named in the message)."""


class IsolationUnavailable(SandboxError, RuntimeError):
    """Namespaces are not permitted here; pass ``isolate=False`` to run unisolated."""


class ProcessKilled(SandboxError, ChildProcessError):
    """An isolated call's process ended without a result (killed, crashed).

    ``result`` is the :class:`RunResult` of the process (``killed`` says why).
    """

    def __init__(self, message: str, result: object = None) -> None:
        super().__init__(message)
        self.result = result


class RemoteError(SandboxError):
    """An isolated call raised an exception that could not be sent back as itself.

    ``type_name`` is its qualified type name, ``traceback`` the child's text.
    """

    def __init__(self, type_name: str, message: str, traceback: str = "") -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.traceback = traceback


class SessionError(SandboxError):
    """A forkable Python session (``branch.session()``) could not do what was asked."""


class SessionClosed(SessionError, RuntimeError):
    """The session was closed, or ended with its branch; start another with
    ``branch.session()``."""


class SessionForkError(SessionError, RuntimeError):
    """A session could not be forked (other threads, child processes or open files in
    the interpreter: the message names them); nothing was changed."""


# -- strategies --------------------------------------------------------------


class StrategyError(BranchAgentError):
    """A strategy could not run."""


class StrategyNotFound(StrategyError, LookupError):
    """No strategy is registered under that name."""


class InvalidCandidates(StrategyError, ValueError):
    """A strategy was given candidates it cannot run: not a collection (a string is one
    command, not a list of them), an item that is not a candidate, or none at all."""


class CandidateError(StrategyError):
    """A candidate returned something that is not a verdict."""


# -- llm ---------------------------------------------------------------------


class LLMError(BranchAgentError):
    """Base class of the errors of :mod:`branchagent.llm`."""


class ApplyError(LLMError, ValueError):
    """A completion could not be applied to its branch; the message says where and why."""


class SourceError(LLMError, RuntimeError):
    """The model failed to produce candidates (the original error is the ``__cause__``)."""


# -- serve -------------------------------------------------------------------


class ServeError(BranchAgentError):
    """An error :mod:`branchagent.serve` answers with: an HTTP ``status`` and an
    OpenAI-shaped body, ``{"error": {"message", "type", "code"}}``."""

    def __init__(self, status: int, message: str, type_: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code or type_


# -- the command line --------------------------------------------------------


class UsageError(BranchAgentError, ValueError):
    """A usage or environment problem: ``branchagent`` exits 2 with a message that says
    what to do."""
