"""The verified best-of server: an ASGI app (Starlette) before an OpenAI-compatible upstream."""

from __future__ import annotations

import functools
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import attrs
import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .._branch import Branch
from .._limits import Limits
from .._log import get_logger
from .._rwlock import RWLock
from .._workspace import Workspace, open_workspace
from ..exceptions import BranchAgentError, PathEscapeError, ServeError
from ..llm import (
    Apply,
    ApplyError,
    Completion,
    apply_auto,
    apply_diff,
    cap_text,
    check_relative_path,
    completions_from_openai,
    describe_apply,
    get_scorer,
    run_command,
    write_code_blocks,
    write_file,
)
from ..llm._solve import _apply
from ..strategy import Command, run_candidate
from ..strategy._arena import _bounded as bounded_diff
from ..strategy._report import render_report

__all__ = ["APPLY_MODES", "EXTENSION", "ServeConfig", "ServeError", "create_app", "resolve_apply"]

#: The key of the extension field in each returned choice (and at the response's top level).
EXTENSION = "branchagent"

#: ``--apply`` names. ``file:PATH`` writes the completion's one code block to PATH (its whole
#: text when it has none); ``code:PATH`` writes the blocks that name files, or a lone unnamed
#: block to PATH.
APPLY_MODES = ("auto", "diff", "code", "code:PATH", "command", "file:PATH")

#: Most characters of the verifier's stdout and of its stderr kept in a candidate's record.
TAIL_LIMIT = 4096

#: Request fields that are branchagent's, never sent to the model.
OUR_FIELDS = ("best_of", "commit", "workspace")

#: Sends one request to the model server: ``(method, path, JSON body) -> JSON document``
#: (an HTTP client for ``branchagent serve``; vLLM's own serving objects in its plugin).
Send = Callable[[str, str, Any], Awaitable[Any]]


def _error_response(exc: ServeError) -> JSONResponse:
    """``exc`` as the OpenAI-shaped JSON body, with its HTTP status."""
    return JSONResponse(
        {"error": {"message": exc.message, "type": exc.type, "code": exc.code}},
        status_code=exc.status,
    )


def _bad_request(message: str) -> ServeError:
    return ServeError(400, message, "invalid_request_error", "invalid_request")


def _mode_path(apply: str, prefix: str) -> str:
    path = apply[len(prefix):]
    try:
        return check_relative_path(path)
    except PathEscapeError as exc:
        raise ValueError(f"--apply {apply!r}: {exc}; give a path inside the workspace, e.g. "
                         f"{prefix}calc.py or {prefix}src/calc.py") from None


def resolve_apply(apply: str | Apply, *, isolate: bool = True,
                  timeout: float | None = 60.0) -> Apply:
    """The action an ``--apply`` name stands for (a callable is returned as is).

    ``file:PATH`` is :func:`~branchagent.llm.write_file` (the one code block,
    or the whole text when there is none); ``code:PATH`` is
    :func:`~branchagent.llm.write_code_blocks` with ``path=PATH`` (a lone
    unnamed block goes to PATH). PATH must be relative, without ``..``.
    """
    if callable(apply):
        return apply
    if apply == "auto":
        return apply_auto
    if apply == "diff":
        return apply_diff
    if apply == "code":
        return write_code_blocks
    if apply == "command":
        return functools.partial(run_command, isolate=isolate, timeout=timeout)
    if isinstance(apply, str) and apply.startswith("file:"):
        return functools.partial(write_file, path=_mode_path(apply, "file:"))
    if isinstance(apply, str) and apply.startswith("code:"):
        return functools.partial(write_code_blocks, path=_mode_path(apply, "code:"))
    raise ValueError(f"apply must be one of {', '.join(APPLY_MODES)}, got {apply!r}")


@attrs.frozen(kw_only=True)
class ServeConfig:
    """How ``branchagent serve`` runs.

    ``upstream`` is the base URL of the OpenAI-compatible server (with its
    ``/v1``); ``verify`` a shell command run in each candidate's branch
    (``sh -c``; exit 0 verifies, a score may be written to
    ``$BRANCHAGENT_SCORE_FILE``; ``None``: applying is verifying);
    ``best_of`` the default number of upstream candidates, ``max_best_of``
    the most a request may ask for (more is refused with 400); ``score`` the
    logprob scorer that breaks ties between equally verified candidates.
    ``transport`` replaces the HTTP transport to upstream (tests).
    ``report_dir``: write each completion request's lineage report there (one
    self-contained HTML file per request: every candidate, its verdict, its
    diff; see :meth:`branchagent.Outcome.to_html`).
    """

    upstream: str
    workspace: Path
    verify: str | None = None
    apply: str | Apply = "auto"
    backend: str = "copy"
    best_of: int = 4
    max_best_of: int = 16
    max_concurrent: int = 4
    upstream_timeout: float = 120.0
    verify_timeout: float | None = 300.0
    isolate: bool = True
    score: str = "mean_logprob"
    model: str | None = None
    transport: httpx.AsyncBaseTransport | None = None
    report_dir: Path | None = None

    def __attrs_post_init__(self) -> None:
        if self.report_dir is not None and not Path(self.report_dir).is_dir():
            raise ValueError(f"report_dir {self.report_dir} is not a directory; create it "
                             "first (mkdir -p) or give another --report-dir")
        if self.best_of < 1:
            raise ValueError(f"best_of must be at least 1, got {self.best_of}")
        if self.max_best_of < self.best_of:
            raise ValueError(f"max_best_of ({self.max_best_of}) must be at least best_of "
                             f"({self.best_of})")
        if self.max_concurrent < 1:
            raise ValueError(f"max_concurrent must be at least 1, got {self.max_concurrent}")
        resolve_apply(self.apply)
        get_scorer(self.score)


@attrs.define
class _Trial:
    completion: Completion
    logprob: float | None
    verified: bool = False
    score: float | None = None
    returncode: int | None = None
    branch: str | None = None
    changes: list[str] = attrs.Factory(list)
    error: str | None = None
    duration: float = 0.0
    started: float | None = None
    ended: float | None = None
    diff: str | None = None
    apply: dict[str, Any] = attrs.Factory(lambda: describe_apply(ran=False))
    verify: dict[str, Any] | None = None

    def extension(self) -> dict[str, Any]:
        return {
            "verified": self.verified, "score": self.score, "returncode": self.returncode,
            "branch": self.branch, "changes": self.changes, "logprob": self.logprob,
            "upstream_index": self.completion.index, "error": self.error,
            "duration": round(self.duration, 6), "committed": False,
            "text": cap_text(self.completion.text), "text_chars": len(self.completion.text),
            "apply": self.apply, "verify": self.verify,
        }

    def rank(self) -> tuple[float, float, int]:
        score = -math.inf if self.score is None else self.score
        lp = -math.inf if self.logprob is None else self.logprob
        return (-score, -lp, self.completion.index)


class _Server:
    """Candidate -> branch -> verify -> rank for one workspace: the one implementation behind
    ``branchagent serve`` (``send`` is HTTP to upstream) and the vLLM plugin (``send`` calls
    vLLM's serving objects in its own process)."""

    def __init__(self, config: ServeConfig, send: Send | None = None) -> None:
        self.config = config
        self.send: Send = send if send is not None else self._http
        self.apply = resolve_apply(config.apply, isolate=config.isolate,
                                   timeout=config.verify_timeout)
        self.scorer = get_scorer(config.score)
        self.verifier: Command | None = None
        if config.verify is not None:
            self.verifier = Command(["sh", "-c", config.verify], isolate=config.isolate,
                                    limits=Limits(timeout=config.verify_timeout))
        self.semaphore = anyio.Semaphore(config.max_concurrent)
        # Shared for requests that only try candidates, exclusive for one that commits:
        # a commit into the base invalidates every other top-level branch, so it waits
        # until no other request has branches open, and new requests wait behind it.
        self.lock = RWLock(writers_first=True)
        self.ws: Workspace | None = None
        self.client: httpx.AsyncClient | None = None
        self.log = get_logger("branchagent.serve")

    # -- upstream --------------------------------------------------------------------------

    async def upstream(self, method: str, path: str, body: Any = None) -> Any:
        return await self.send(method, path, body)

    async def _http(self, method: str, path: str, body: Any = None) -> Any:
        assert self.client is not None
        try:
            r = await self.client.request(method, path, json=body)
        except httpx.TimeoutException as exc:
            raise ServeError(504, f"the upstream server did not answer in time: {exc!r}",
                             "upstream_timeout") from exc
        except httpx.HTTPError as exc:
            raise ServeError(502, f"the upstream server failed: {exc!r}",
                             "upstream_error") from exc
        try:
            doc = r.json()
        except ValueError:
            doc = None
        if r.status_code >= 400:
            detail = doc.get("error") if isinstance(doc, dict) else None
            if isinstance(detail, dict):
                detail = detail.get("message")
            if detail is None and isinstance(doc, dict):
                detail = doc.get("message") or doc.get("detail")
            raise ServeError(502, f"the upstream server answered {r.status_code}: "
                                  f"{detail if detail is not None else r.text[:500]}",
                             "upstream_error")
        if not isinstance(doc, dict):
            raise ServeError(502, "the upstream server answered with no JSON object",
                             "upstream_error")
        return doc

    # -- one candidate -----------------------------------------------------------------------

    async def trial(self, ws: Workspace, t: _Trial, keep: set[str]) -> None:
        started = t.started = time.monotonic()
        branch = await ws.fork()
        t.branch = branch.name
        try:
            try:
                applied = await _apply(self.apply, branch, t.completion)
            except ApplyError as exc:
                t.error = f"ApplyError: {exc}"
                t.apply = describe_apply(error=t.error)
                return
            except Exception as exc:
                raise ServeError(500, f"applying candidate {t.completion.index} crashed: "
                                      f"{type(exc).__name__}: {exc}",
                                 "verification_error") from exc
            t.apply = describe_apply(applied)
            try:
                if self.verifier is None:
                    t.verified, t.returncode = True, None
                else:
                    verdict = await run_candidate(self.verifier, branch)
                    t.verified, t.score = verdict.success, verdict.score
                    rc = verdict.info.get("returncode")
                    t.returncode = rc if isinstance(rc, int) else None
                    t.verify = _verify_record(verdict.info)
                    if not verdict.success and verdict.info.get("killed"):
                        t.error = f"killed: {verdict.info['killed']}"
                t.changes = [c.path for c in await branch.changes()]
                if self.config.report_dir is not None:
                    t.diff = await _diff_of(branch) if t.changes else ""
            except Exception as exc:
                raise ServeError(500, f"verifying candidate {t.completion.index} crashed: "
                                      f"{type(exc).__name__}: {exc}",
                                 "verification_error") from exc
            if t.verified:
                keep.add(branch.name)
        finally:
            t.ended = time.monotonic()
            t.duration = t.ended - started
            if branch.name not in keep:
                with anyio.CancelScope(shield=True):
                    await branch.abort()

    # -- one request --------------------------------------------------------------------------

    def parse(self, raw: bytes, chat: bool) -> tuple[dict[str, Any], int, int, bool]:
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise _bad_request(f"the request body is not JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise _bad_request("the request body must be a JSON object")
        key = "messages" if chat else "prompt"
        if key not in body:
            raise _bad_request(f"'{key}' is required")
        if chat and (not isinstance(body["messages"], list) or not body["messages"]):
            raise _bad_request("'messages' must be a non-empty list")
        if body.get("stream"):
            raise _bad_request("stream=true is not supported by branchagent serve")
        n = _positive(body, "n", 1)
        best_of = _positive(body, "best_of", max(self.config.best_of, n))
        if best_of > self.config.max_best_of:
            raise _bad_request(f"best_of={best_of} is more candidates than this server allows "
                               f"({self.config.max_best_of}); ask for at most "
                               f"{self.config.max_best_of}")
        self.check_workspace(body.get("workspace"))
        commit = body.get("commit", False)
        if best_of < n:
            raise _bad_request(f"best_of ({best_of}) must be at least n ({n})")
        if not isinstance(commit, bool):
            raise _bad_request(f"'commit' must be true or false, got {commit!r}")
        temperature = body.get("temperature")
        if best_of > 1 and temperature is not None and not (
            isinstance(temperature, int | float) and temperature > 0
        ):
            raise _bad_request(f"best_of={best_of} candidates need temperature > 0, "
                               f"got {temperature!r}")
        upstream = {k: v for k, v in body.items() if k not in OUR_FIELDS}
        upstream["n"] = best_of
        if chat:
            upstream["logprobs"] = True
        elif not _is_int(upstream.get("logprobs")):
            upstream["logprobs"] = 1
        if best_of > 1 and temperature is None:
            upstream["temperature"] = 1.0
        return upstream, n, best_of, commit

    def check_workspace(self, named: Any) -> None:
        """A request may name the workspace it expects; another one is refused (400)."""
        if named is None:
            return
        ours = Path(self.config.workspace).resolve()
        if not isinstance(named, str) or Path(named).resolve() != ours:
            raise _bad_request(f"'workspace' {named!r} is not the workspace this server "
                               f"verifies in ({ours}); leave it out or name that one")

    async def complete(self, request: Request, chat: bool) -> dict[str, Any]:
        return await self.complete_raw(await request.body(), chat)

    async def complete_raw(self, raw: bytes, chat: bool) -> dict[str, Any]:
        upstream_body, n, best_of, commit = self.parse(raw, chat)
        if upstream_body.get("model") is None:
            upstream_body["model"] = await self.default_model()
        path = "/chat/completions" if chat else "/completions"
        request_started = time.monotonic()
        async with self.semaphore:
            doc = await self.upstream("POST", path, upstream_body)
            try:
                completions = completions_from_openai(doc)
            except (TypeError, ValueError) as exc:
                raise ServeError(502, f"the upstream response is malformed: {exc}",
                                 "upstream_error") from exc
            choices = doc.get("choices")
            assert isinstance(choices, list)
            trials = []
            for c in completions:
                try:
                    lp: float | None = self.scorer(c)
                except ValueError:
                    lp = None
                trials.append(_Trial(c, lp))
            ws = self.ws
            assert ws is not None
            keep: set[str] = set()
            async with self.lock.hold(commit):
                committed: str | None = None
                # The branches kept for the answer are aborted on every path: an answer, an
                # error in a trial, or the request cancelled (the server shutting down).
                try:
                    try:
                        async with anyio.create_task_group() as tg:
                            for t in trials:
                                tg.start_soon(self.trial, ws, t, keep)
                    except BaseExceptionGroup as group:
                        _raise_first(group)
                    verified = sorted((t for t in trials if t.verified), key=_Trial.rank)
                    chosen = verified[:n]
                    if commit and chosen:
                        top = chosen[0]
                        for b in ws.branches():
                            if b.name == top.branch:
                                await b.commit()
                                committed = b.name
                finally:
                    with anyio.CancelScope(shield=True):
                        await ws.abort_many(b for b in ws.branches()
                                            if b.name in keep and b.name != committed)
        out_choices = []
        for position, t in enumerate(chosen):
            source = choices[trials.index(t)]
            choice = dict(source) if isinstance(source, dict) else {}
            choice["index"] = position
            ext = t.extension()
            ext["committed"] = t.branch == committed and committed is not None
            choice[EXTENSION] = ext
            out_choices.append(choice)
        doc = dict(doc)
        doc["choices"] = out_choices
        doc[EXTENSION] = {
            "best_of": best_of, "n": n, "verified": len(verified), "returned": len(chosen),
            "committed": committed, "scorer": getattr(self.scorer, "__name__", str(self.scorer)),
            "candidates": [t.extension() for t in trials],
        }
        if self.config.report_dir is not None:
            doc[EXTENSION]["report"] = await self.write_report(
                trials, chosen, committed, request_started)
        return doc

    async def write_report(self, trials: list[_Trial], chosen: list[_Trial],
                           committed: str | None, t0: float) -> str | None:
        """Write this request's lineage report into ``report_dir``; its path (None: failed)."""
        assert self.config.report_dir is not None
        trace = _trace(trials, chosen, committed, t0)
        name = f"serve-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}.html"
        path = Path(self.config.report_dir) / name
        try:
            await anyio.to_thread.run_sync(path.write_text, render_report(trace), "utf-8")
        except OSError as exc:  # the answer matters more than its report
            self.log.warning("serve_report_failed", path=str(path), error=str(exc))
            return None
        return str(path)

    async def default_model(self) -> str:
        if self.config.model is not None:
            return self.config.model
        doc = await self.upstream("GET", "/models")
        data = doc.get("data")
        if not isinstance(data, list) or not data or not isinstance(data[0], dict):
            raise ServeError(502, "the upstream server lists no model", "upstream_error")
        return str(data[0].get("id"))


def _verify_record(info: Mapping[str, Any]) -> dict[str, Any]:
    """The verifier's exit status, kill reason and the last :data:`TAIL_LIMIT` characters of
    its stdout and stderr (with their full lengths)."""
    out, err = info.get("stdout_tail"), info.get("stderr_tail")
    return {
        "returncode": info.get("returncode"), "killed": info.get("killed"),
        "stdout_tail": out[-TAIL_LIMIT:] if isinstance(out, str) else None,
        "stderr_tail": err[-TAIL_LIMIT:] if isinstance(err, str) else None,
        "stdout_chars": info.get("stdout_chars"), "stderr_chars": info.get("stderr_chars"),
        "duration": info.get("run_duration"),
    }


async def _diff_of(branch: Branch) -> str | None:
    try:
        return bounded_diff(await branch.diff())
    except (BranchAgentError, OSError, UnicodeError):
        return None


def _trace(trials: list[_Trial], chosen: list[_Trial], committed: str | None,
           t0: float) -> dict[str, Any]:
    """One request's candidates as an outcome dict (``Outcome.to_dict``'s shape)."""
    results = []
    for i, t in enumerate(trials):
        verify = t.verify or {}
        info: dict[str, Any] = {"returncode": t.returncode, "logprob": t.logprob,
                                "upstream_index": t.completion.index,
                                "text": cap_text(t.completion.text),
                                "text_chars": len(t.completion.text),
                                "apply": t.apply,
                                "stdout_tail": verify.get("stdout_tail"),
                                "stderr_tail": verify.get("stderr_tail"),
                                "chosen": any(t is c for c in chosen)}
        results.append({
            "index": i, "parent": None, "depth": 0, "success": t.verified, "score": t.score,
            "duration": t.duration,
            "start": None if t.started is None else t.started - t0,
            "end": None if t.ended is None else t.ended - t0,
            "error": t.error, "branch": t.branch, "changes": list(t.changes),
            "info": info, "diff": t.diff,
        })
    winner = next((r for r, t in zip(results, trials, strict=True)
                   if committed is not None and t.branch == committed), None)
    return {"strategy": "serve best_of", "committed": winner is not None, "winner": winner,
            "results": results, "merged": [], "duration": time.monotonic() - t0,
            "timed_out": False, "info": {"chosen": [trials.index(c) for c in chosen]}}


def _positive(body: Mapping[str, Any], name: str, default: int) -> int:
    value = body.get(name)
    if value is None:
        return default
    if not _is_int(value) or value < 1:
        raise _bad_request(f"'{name}' must be a positive integer, got {value!r}")
    return int(value)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _raise_first(group: BaseExceptionGroup[BaseException]) -> None:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            _raise_first(exc)
        if isinstance(exc, ServeError):
            raise exc
    raise group


async def answer(request: Request, fn: Callable[[], Awaitable[Any]], log: Any) -> Response:
    """``fn``'s document as JSON, or its error OpenAI-shaped; one ``serve_request`` log line."""
    started = time.monotonic()
    rid = uuid.uuid4().hex[:12]
    fields: dict[str, Any] = {}
    try:
        doc = await fn()
        if isinstance(doc, dict) and EXTENSION in doc:
            ext = doc[EXTENSION]
            fields = {k: ext[k] for k in ("best_of", "n", "verified", "returned", "committed")}
        response: Response = JSONResponse(doc)
    except ServeError as exc:
        fields = {"error": exc.message[:300]}
        response = _error_response(exc)
    except Exception as exc:
        fields = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        response = _error_response(ServeError(
            500, f"internal error: {type(exc).__name__}: {exc}", "server_error"))
    log.info("serve_request", id=rid, method=request.method, path=request.url.path,
             status=response.status_code,
             duration_ms=round((time.monotonic() - started) * 1e3, 3), **fields)
    return response


def create_app(config: ServeConfig) -> Starlette:
    """The ASGI app: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``.

    The workspace and the upstream client are opened in the app's lifespan
    and closed (every branch aborted, every process killed) when it ends.
    """
    server = _Server(config)
    req_log = get_logger("branchagent.serve.access")

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with (
            open_workspace(config.workspace, backend=config.backend) as ws,
            httpx.AsyncClient(base_url=config.upstream.rstrip("/"),
                              timeout=config.upstream_timeout,
                              transport=config.transport) as client,
        ):
            server.ws, server.client = ws, client
            try:
                yield
            finally:
                server.ws = server.client = None

    def handler(fn: Callable[[Request], Awaitable[Any]]) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            return await answer(request, lambda: fn(request), req_log)

        return endpoint

    async def models(request: Request) -> Any:
        return await server.upstream("GET", "/models")

    async def completions(request: Request) -> Any:
        return await server.complete(request, chat=False)

    async def chat(request: Request) -> Any:
        return await server.complete(request, chat=True)

    async def health(request: Request) -> Any:
        return {"status": "ok"}

    routes: list[Route] = [
        Route("/health", handler(health), methods=["GET"]),
        Route("/v1/models", handler(models), methods=["GET"]),
        Route("/v1/completions", handler(completions), methods=["POST"]),
        Route("/v1/chat/completions", handler(chat), methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.server = server
    return app


def config_summary(config: ServeConfig) -> Mapping[str, Any]:
    """What the server logs when it starts."""
    return {"upstream": config.upstream, "workspace": str(config.workspace),
            "backend": config.backend, "verify": config.verify,
            "apply": config.apply if isinstance(config.apply, str) else repr(config.apply),
            "best_of": config.best_of, "max_concurrent": config.max_concurrent}
