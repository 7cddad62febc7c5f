"""Errors of :mod:`branchagent.llm`, leaves of the library's one exception tree::

    BranchAgentError
    └── LLMError
        ├── ApplyError                   (ValueError)
        └── SourceError                  (RuntimeError)

``ApplyError``: a completion could not be turned into a change on its branch
(a diff hunk that does not apply, no fenced block naming a file, a path
outside the branch, a returned command that failed). ``SourceError``: the
model (an offline ``vllm.LLM`` or an OpenAI-compatible server) failed to
produce candidates; the library's own exception is attached as ``__cause__``.
"""

from __future__ import annotations

from ..exceptions import BranchAgentError

__all__ = ["ApplyError", "LLMError", "SourceError"]


class LLMError(BranchAgentError):
    """Base class of the errors of :mod:`branchagent.llm`."""


class ApplyError(LLMError, ValueError):
    """A completion could not be applied to its branch; the message says where and why."""


class SourceError(LLMError, RuntimeError):
    """The model failed to produce candidates (the original error is the ``__cause__``)."""
