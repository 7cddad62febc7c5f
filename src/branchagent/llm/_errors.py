"""Errors of :mod:`branchagent.llm`: defined in :mod:`branchagent.exceptions`, the
library's one exception tree, and re-exported here and by :mod:`branchagent.llm`."""

from __future__ import annotations

from ..exceptions import ApplyError, LLMError, SourceError

__all__ = ["ApplyError", "LLMError", "SourceError"]
