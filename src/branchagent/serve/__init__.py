"""Verified best-of serving: an OpenAI-compatible endpoint in front of a vLLM server.

::

    branchagent serve --upstream http://127.0.0.1:8000/v1 -w REPO --verify 'pytest -q' \\
        [--apply auto|diff|code|code:PATH|command|file:PATH] [--best-of 4] [--max-concurrent 4] \\
        [--host 127.0.0.1] [--port 8100] [--backend copy] [--report-dir DIR]

(install with ``pip install 'branchagent[serve]'``: starlette, uvicorn, httpx).

The same verification also runs inside ``vllm serve`` itself, without this second
server: the vLLM endpoint plugin :mod:`branchagent.serve._vllm` (``VLLM_PLUGINS=branchagent``,
options in ``$BRANCHAGENT_VLLM``; see docs/llm.md). Both share one implementation.

Endpoints: ``GET /v1/models`` (upstream's), ``POST /v1/completions``,
``POST /v1/chat/completions`` and ``GET /health``. A completion request with
``best_of=K`` (default: ``--best-of``) and ``n=M`` (default 1) asks upstream
for ``K`` candidates (``n=K`` with logprobs; ``temperature`` 1.0 unless
given), applies each in its own fresh branch of the workspace (``--apply``),
runs ``--verify`` there (``sh -c``; exit 0 verifies; a score may be written
to ``$BRANCHAGENT_SCORE_FILE``), and answers with the best ``M`` that
verified, ordered by verification score (higher first; none counts lowest),
then by logprob score (``--score``, default the mean token logprob), then by
upstream order. Fewer than ``M`` verified: fewer choices (possibly none) come
back. Branches are forked from the base per request, so requests never see
each other's changes; every branch is aborted before the answer, unless the
request says ``"commit": true``: then the top choice is committed into the
workspace (a committing request runs alone: a commit invalidates other
requests' branches, so it waits for them and they wait for it).

The extension field. Each returned choice carries::

    choice["branchagent"] = {
        "verified": true, "score": 1.0 | null, "returncode": 0 | null,
        "branch": "b-...", "changes": ["path", ...], "logprob": -1.23,
        "upstream_index": 3, "error": null, "duration": 0.12, "committed": false,
        "text": "the completion (cut at 16000 characters, with a marker line)",
        "text_chars": 412,
        "apply": {"ok": true, "paths": ["calc.py"], "output": null, "error": null},
        "verify": {"returncode": 0, "killed": null, "stdout_tail": "...",
                   "stderr_tail": "...", "stdout_chars": 120, "stderr_chars": 0,
                   "duration": 0.004},
    }

and the response's top level ``response["branchagent"] = {"best_of", "n",
"verified", "returned", "committed" (the branch name or null), "scorer",
"candidates": [the same record for every upstream candidate, verified or not]}``
(and ``"report"``: the path of the request's lineage report, with ``--report-dir DIR``:
one self-contained HTML file per request, every candidate with its verdict,
timing and diff; see :meth:`branchagent.Outcome.to_html`).
``error`` says why a candidate failed to apply (``"ApplyError: ..."``) or was
killed. ``apply`` says what applying did: the paths written (``ok`` true), or
why it refused (``ok`` false, ``error``); ``verify`` holds the last 4096
characters of the verifier's stdout and of its stderr (``null`` when it did
not run). ``--apply file:PATH`` writes the completion's one fenced code block
to PATH (its whole text when it has none; of several blocks, the only one whose
language fits PATH's extension, else the candidate is refused);
``--apply code:PATH`` writes the blocks that name files, or a lone unnamed
block to PATH. ``best_of``, ``commit`` and ``workspace`` (optional: the
workspace the client expects; another one is refused) are not sent upstream.

Errors (:class:`ServeError`, a :class:`~branchagent.BranchAgentError`) come as
OpenAI-shaped JSON, ``{"error": {"message", "type", "code"}}``:
400 for a malformed request (not JSON, missing ``prompt``/``messages``, bad
``n``/``best_of``/``commit``, ``best_of < n``, ``best_of`` over
``--max-best-of`` (16), a ``workspace`` other than the server's,
``temperature`` 0 with ``best_of > 1``, ``stream``), 502 when upstream fails or answers an error,
504 when it does not answer within ``--upstream-timeout``, 500 when applying
or verifying crashes (an ``ApplyError``, a diff that does not apply, is not a
crash: that candidate just fails).

At most ``--max-concurrent`` requests are served at once (an
``anyio.Semaphore``); the others wait their turn, they are not refused. The
server binds 127.0.0.1 unless told otherwise, logs one structlog line per
request (``serve_request``: method, path, status, duration, best_of,
verified, committed) and stops on SIGTERM, SIGHUP (its terminal closed) or
Ctrl-C: in-flight requests get ``--shutdown-timeout`` seconds, then they are
cancelled, every branch is aborted and every process killed; it exits 143
(SIGTERM), 129 (SIGHUP) or 130 (SIGINT).
The backend is ``--backend``, else the one recorded in the workspace's state
directory, else ``copy`` (portable; ``fuse`` is faster where it works).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ..exceptions import ServeError

if TYPE_CHECKING:
    from ._app import APPLY_MODES, EXTENSION, ServeConfig, create_app, resolve_apply

__all__ = ["APPLY_MODES", "EXTENSION", "ServeConfig", "ServeError", "create_app", "resolve_apply"]


def __getattr__(name: str) -> Any:
    # Lazy: the CLI imports this package for its options without needing starlette.
    if name in __all__:
        return getattr(importlib.import_module("._app", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
