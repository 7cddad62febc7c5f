"""``branchagent serve`` against a scripted fake upstream (httpx MockTransport), plus signals.

The fake upstream answers /v1/completions and /v1/chat/completions with
scripted choices and logprobs; the server is driven in-process through
httpx's ASGI transport (its lifespan run by hand), except for the SIGTERM and SIGHUP
test, which starts the real ``branchagent serve`` command in front of a
stdlib HTTP fake upstream.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

import branchagent as ba
from branchagent.llm import Completion
from branchagent.serve import EXTENSION, ServeConfig, create_app

pytestmark = pytest.mark.anyio

# (text, token logprobs): mean logprobs -0.1, -0.01, -0.05, -2.0
SCRIPT: list[tuple[str, list[float]]] = [
    ("ok 1 a", [-0.1, -0.1]),
    ("bad 9", [-0.01]),
    ("ok 1 c", [-0.05, -0.05]),
    ("ok 2 d", [-2.0]),
]
# Passes when candidate.txt starts with "ok"; its second word is the score.
VERIFY = ("grep -q '^ok' candidate.txt && "
          "awk '{print $2}' candidate.txt > \"$BRANCHAGENT_SCORE_FILE\"")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the server runs under uvicorn's asyncio loop


def _choice(i: int, text: str, lps: list[float], chat: bool) -> dict[str, Any]:
    if chat:
        return {"index": i, "message": {"role": "assistant", "content": text},
                "logprobs": {"content": [{"token": "t", "logprob": v, "top_logprobs": []}
                                         for v in lps]},
                "finish_reason": "stop"}
    return {"index": i, "text": text, "finish_reason": "stop",
            "logprobs": {"tokens": ["t"] * len(lps), "token_logprobs": lps,
                         "top_logprobs": None, "text_offset": [0] * len(lps)}}


class FakeUpstream:
    """Scripted OpenAI-compatible upstream; records every request body."""

    def __init__(self, script: list[tuple[str, list[float]]] | None = None) -> None:
        self.script = SCRIPT if script is None else script
        self.bodies: list[dict[str, Any]] = []
        self.fail: Callable[[httpx.Request], httpx.Response] | None = None

    def __call__(self, request: httpx.Request) -> httpx.Response:
        assert request.url.host == "upstream.test"
        if self.fail is not None:
            return self.fail(request)
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list",
                                             "data": [{"id": "tiny", "object": "model"}]})
        body = json.loads(request.content)
        self.bodies.append(body)
        chat = request.url.path.endswith("/chat/completions")
        script = self.script
        prompt = body.get("prompt")
        if prompt is not None and str(prompt).startswith("echo:"):
            script = [(f"ok 1 {prompt}", [-0.1])] * body["n"]
        choices = [_choice(i, t, lps, chat) for i, (t, lps) in enumerate(script[: body["n"]])]
        return httpx.Response(200, json={
            "id": "cmpl-1", "object": "chat.completion" if chat else "text_completion",
            "created": 0, "model": body.get("model"), "choices": choices,
            "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8},
        })


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    (root / "README.md").write_text("base\n")
    return root


@asynccontextmanager
async def serving(repo: Path, upstream: FakeUpstream, **options: Any
                  ) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    options = {"verify": VERIFY, "apply": "file:candidate.txt", "isolate": False,
               "backend": "copy", **options}
    config = ServeConfig(upstream="http://upstream.test/v1", workspace=repo,
                         transport=httpx.MockTransport(upstream), **options)
    app = create_app(config)
    async with app.router.lifespan_context(app):
        server = app.state.server
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://serve.test", timeout=30) as client:
            yield client, server
        assert server.ws.branches() == [], "a branch was left open"


def pristine(repo: Path) -> bool:
    """Nothing but what the fixture wrote is in the workspace."""
    return sorted(p.name for p in repo.iterdir()) == ["README.md"]


def ext(choice: dict[str, Any]) -> dict[str, Any]:
    value = choice[EXTENSION]
    assert isinstance(value, dict)
    return value


async def test_returns_verified_choices_by_score_then_logprob(repo: Path) -> None:
    up = FakeUpstream()
    async with serving(repo, up) as (client, _):
        r = await client.post("/v1/completions", json={
            "model": "tiny", "prompt": "p", "n": 3, "best_of": 4, "max_tokens": 8})
    assert r.status_code == 200, r.text
    doc = r.json()
    texts = [c["text"] for c in doc["choices"]]
    assert texts == ["ok 2 d", "ok 1 c", "ok 1 a"]  # score 2 first, then by mean logprob
    assert [c["index"] for c in doc["choices"]] == [0, 1, 2]
    first = ext(doc["choices"][0])
    assert first["verified"] is True
    assert first["score"] == 2.0
    assert first["returncode"] == 0
    assert first["changes"] == ["candidate.txt"]
    assert first["logprob"] == pytest.approx(-2.0)
    assert first["upstream_index"] == 3
    assert first["committed"] is False
    assert first["branch"]
    assert len({ext(c)["branch"] for c in doc["choices"]}) == 3
    assert ext(doc["choices"][1])["logprob"] == pytest.approx(-0.05)
    top = doc[EXTENSION]
    assert (top["best_of"], top["n"], top["verified"], top["returned"]) == (4, 3, 3, 3)
    assert top["committed"] is None
    bad = top["candidates"][1]
    assert bad["verified"] is False
    assert bad["returncode"] == 1
    assert doc["usage"]["total_tokens"] == 8
    # upstream was asked for best_of candidates with logprobs; our fields not forwarded
    (sent,) = up.bodies
    assert sent["n"] == 4
    assert sent["logprobs"] == 1
    assert sent["temperature"] == 1.0
    assert "best_of" not in sent
    assert "commit" not in sent
    assert sent["max_tokens"] == 8
    # nothing committed: the workspace is pristine
    assert pristine(repo)


async def test_fewer_verified_than_n_returns_fewer(repo: Path) -> None:
    async with serving(repo, FakeUpstream()) as (client, _):
        r = await client.post("/v1/completions", json={"prompt": "p", "n": 4, "best_of": 4})
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 3
    assert all(ext(c)["verified"] for c in r.json()["choices"])


async def test_default_best_of_and_model(repo: Path) -> None:
    up = FakeUpstream()
    async with serving(repo, up, best_of=3) as (client, _):
        r = await client.post("/v1/completions", json={"prompt": "p"})
    assert r.status_code == 200, r.text
    assert up.bodies[0]["n"] == 3
    assert up.bodies[0]["model"] == "tiny"  # the first upstream lists
    (choice,) = r.json()["choices"]
    assert choice["text"] == "ok 1 c"  # of the first three, verified, best logprob


async def test_commit_true_commits_exactly_the_top_one(repo: Path) -> None:
    async with serving(repo, FakeUpstream()) as (client, server):
        r = await client.post("/v1/completions", json={
            "prompt": "p", "n": 2, "best_of": 4, "commit": True})
        assert r.status_code == 200, r.text
        doc = r.json()
        assert [ext(c)["committed"] for c in doc["choices"]] == [True, False]
        assert doc[EXTENSION]["committed"] == ext(doc["choices"][0])["branch"]
        assert (repo / "candidate.txt").read_text() == "ok 2 d"
        assert server.ws.branches() == []
        # a later request forks from the new base, and its own changes stay its own
        r = await client.post("/v1/completions", json={"prompt": "p", "n": 1, "best_of": 3})
        assert r.status_code == 200, r.text
    assert (repo / "candidate.txt").read_text() == "ok 2 d"


async def test_chat_completions(repo: Path) -> None:
    up = FakeUpstream()
    async with serving(repo, up) as (client, _):
        r = await client.post("/v1/chat/completions", json={
            "model": "tiny", "messages": [{"role": "user", "content": "hi"}],
            "n": 2, "best_of": 4, "logprobs": False})
    assert r.status_code == 200, r.text
    doc = r.json()
    assert [c["message"]["content"] for c in doc["choices"]] == ["ok 2 d", "ok 1 c"]
    assert up.bodies[0]["logprobs"] is True
    assert up.bodies[0]["n"] == 4


async def test_models_are_upstream_models(repo: Path) -> None:
    async with serving(repo, FakeUpstream()) as (client, _):
        r = await client.get("/v1/models")
        health = await client.get("/health")
    assert r.status_code == 200
    assert r.json()["data"][0]["id"] == "tiny"
    assert health.json() == {"status": "ok"}


def error_of(r: httpx.Response) -> dict[str, Any]:
    err = r.json()["error"]
    assert isinstance(err, dict)
    assert set(err) == {"message", "type", "code"}
    return err


async def test_upstream_errors_map_to_502_and_504(repo: Path) -> None:
    up = FakeUpstream()
    async with serving(repo, up) as (client, _):
        up.fail = lambda req: httpx.Response(
            500, json={"error": {"message": "engine died", "type": "x", "code": 500}})
        r = await client.post("/v1/completions", json={"prompt": "p", "best_of": 2})
        assert r.status_code == 502
        assert "engine died" in error_of(r)["message"]

        up.fail = lambda req: httpx.Response(400, json={"message": "too long"})
        r = await client.post("/v1/completions", json={"prompt": "p", "best_of": 2})
        assert r.status_code == 502
        assert "too long" in error_of(r)["message"]

        def timeout(req: httpx.Request) -> httpx.Response:
            raise httpx.ReadTimeout("slow", request=req)

        up.fail = timeout
        r = await client.post("/v1/completions", json={"prompt": "p", "best_of": 2})
        assert r.status_code == 504
        assert error_of(r)["type"] == "upstream_timeout"

        def refused(req: httpx.Request) -> httpx.Response:
            raise httpx.ConnectError("refused", request=req)

        up.fail = refused
        r = await client.get("/v1/models")
        assert r.status_code == 502

        up.fail = lambda req: httpx.Response(200, text="not json")
        r = await client.post("/v1/completions", json={"prompt": "p", "best_of": 2})
        assert r.status_code == 502
    assert pristine(repo)


@pytest.mark.parametrize(("body", "why"), [
    (b"{not json", "not JSON"),
    (b"[1, 2]", "JSON object"),
    (b'{"n": 1}', "'prompt' is required"),
    (b'{"prompt": "p", "n": 0}', "'n' must be a positive integer"),
    (b'{"prompt": "p", "n": 3, "best_of": 2}', "at least n"),
    (b'{"prompt": "p", "best_of": "4"}', "'best_of' must be"),
    (b'{"prompt": "p", "commit": "yes"}', "'commit' must be"),
    (b'{"prompt": "p", "best_of": 4, "temperature": 0}', "temperature > 0"),
    (b'{"prompt": "p", "stream": true}', "stream"),
    (b'{"prompt": "p", "best_of": 100}', "more candidates than this server allows (16)"),
    (b'{"prompt": "p", "best_of": 2, "workspace": "/elsewhere"}', "not the workspace"),
    (b'{"prompt": "p", "workspace": 7}', "not the workspace"),
])
async def test_malformed_requests_are_400(repo: Path, body: bytes, why: str) -> None:
    up = FakeUpstream()
    async with serving(repo, up) as (client, _):
        r = await client.post("/v1/completions", content=body,
                              headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert why in error_of(r)["message"]
    assert error_of(r)["type"] == "invalid_request_error"
    assert up.bodies == []


async def test_naming_the_servers_own_workspace_is_fine(repo: Path) -> None:
    up = FakeUpstream()
    async with serving(repo, up, max_best_of=4) as (client, _):
        r = await client.post("/v1/completions", json={"prompt": "p", "best_of": 4,
                                                       "workspace": str(repo / ".")})
        assert r.status_code == 200, r.text
        r = await client.post("/v1/completions", json={"prompt": "p", "best_of": 5})
        assert r.status_code == 400
        assert "at most 4" in error_of(r)["message"]
    assert [b["n"] for b in up.bodies] == [4]
    assert "workspace" not in up.bodies[0]  # ours: never sent to the model
    with pytest.raises(ValueError, match="max_best_of"):
        ServeConfig(upstream="http://upstream.test/v1", workspace=repo, best_of=8,
                    max_best_of=4)


async def test_chat_without_messages_is_400(repo: Path) -> None:
    async with serving(repo, FakeUpstream()) as (client, _):
        r = await client.post("/v1/chat/completions", json={"messages": []})
    assert r.status_code == 400


async def test_apply_error_fails_only_that_candidate(repo: Path) -> None:
    async with serving(repo, FakeUpstream(), apply="diff") as (client, _):
        r = await client.post("/v1/completions", json={"prompt": "p", "n": 2, "best_of": 4})
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["choices"] == []
    assert all(c["error"].startswith("ApplyError") for c in doc[EXTENSION]["candidates"])


async def test_verification_crash_is_500_and_leaves_nothing(repo: Path) -> None:
    def crash(branch: ba.Branch, completion: Completion) -> None:
        if completion.index == 2:
            raise RuntimeError("the verifier blew up")
        branch.resolve("candidate.txt").write_text(completion.text)

    async with serving(repo, FakeUpstream(), apply=crash) as (client, _):
        r = await client.post("/v1/completions", json={"prompt": "p", "best_of": 4,
                                                       "commit": True})
    assert r.status_code == 500
    assert "the verifier blew up" in error_of(r)["message"]
    assert error_of(r)["type"] == "verification_error"
    assert pristine(repo)


async def test_concurrency_is_bounded_and_requests_are_isolated(repo: Path) -> None:
    active: set[str] = set()
    peak = 0

    async def apply(branch: ba.Branch, completion: Completion) -> list[str]:
        nonlocal peak
        mine = completion.text
        target = branch.resolve("candidate.txt")
        if target.exists():
            raise AssertionError(f"request {mine!r} saw {target.read_text()!r}")
        target.write_text(mine)
        active.add(mine)
        peak = max(peak, len(active))
        await anyio.sleep(0.3)
        active.discard(mine)
        if target.read_text() != mine:
            raise AssertionError("another request's change leaked into this branch")
        return ["candidate.txt"]

    results: dict[int, httpx.Response] = {}
    async with serving(repo, FakeUpstream(), apply=apply, max_concurrent=2) as (client, _):

        async def one(i: int) -> None:
            results[i] = await client.post("/v1/completions", json={
                "prompt": f"echo:{i}", "best_of": 2})

        started = time.monotonic()
        async with anyio.create_task_group() as tg:
            for i in range(5):
                tg.start_soon(one, i)
        took = time.monotonic() - started
    assert all(r.status_code == 200 for r in results.values()), [r.text for r in results.values()]
    assert peak == 2  # bounded, and not serialised
    assert took >= 3 * 0.3  # 5 requests, 2 at a time: at least 3 rounds
    assert [r.json()["choices"][0]["text"] for _, r in sorted(results.items())] == [
        f"ok 1 echo:{i}" for i in range(5)]


async def test_a_slow_verification_does_not_block_others(repo: Path) -> None:
    async def apply(branch: ba.Branch, completion: Completion) -> None:
        if "slow" in completion.text:
            await anyio.sleep(3)

    async with serving(repo, FakeUpstream(), apply=apply, verify=None,
                       max_concurrent=2) as (client, _):
        done: dict[str, float] = {}
        t0 = time.monotonic()

        async def ask(prompt: str) -> None:
            r = await client.post("/v1/completions", json={"prompt": prompt, "best_of": 1})
            assert r.status_code == 200
            done[prompt] = time.monotonic() - t0

        async with anyio.create_task_group() as tg:
            tg.start_soon(ask, "echo:slow")
            await anyio.sleep(0.1)
            tg.start_soon(ask, "echo:fast")
    assert done["echo:fast"] < 1.5
    assert done["echo:slow"] >= 3


# -- the real command: SIGTERM, SIGHUP ------------------------------------------------------------

FAKE_UPSTREAM = textwrap.dedent('''
    import json, sys
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class H(BaseHTTPRequestHandler):
        def log_message(self, *a): pass
        def _send(self, doc):
            data = json.dumps(doc).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        def do_GET(self):
            self._send({"object": "list", "data": [{"id": "tiny"}]})
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            self._send({"id": "x", "object": "text_completion", "created": 0, "model": "tiny",
                        "choices": [{"index": i, "text": "ok %d" % i, "finish_reason": "stop",
                                     "logprobs": {"tokens": ["t"], "token_logprobs": [-0.5]}}
                                    for i in range(body["n"])]})

    server = ThreadingHTTPServer(("127.0.0.1", 0), H)
    print(server.server_address[1], flush=True)
    server.serve_forever()
''')


ASK = textwrap.dedent('''
    import json, sys, urllib.error, urllib.request
    req = urllib.request.Request(
        "http://127.0.0.1:%s/v1/completions" % sys.argv[1],
        data=json.dumps({"prompt": "p", "best_of": 2}).encode(),
        headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            print(r.status)
    except urllib.error.HTTPError as exc:
        print(exc.code)
    except Exception as exc:
        print(type(exc).__name__)
''')


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return int(r.status)
    except (urllib.error.URLError, OSError):
        return 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_or_sighup_stops_cleanly_with_nothing_left(
    repo: Path, tmp_path: Path, sig: signal.Signals
) -> None:
    """SIGTERM, and SIGHUP (the terminal closed) alike: in-flight requests end, every
    branch is aborted, every verification process killed; exit 128 + the signal."""
    script = tmp_path / "upstream.py"
    script.write_text(FAKE_UPSTREAM)
    up = subprocess.Popen([sys.executable, os.fspath(script)], stdout=subprocess.PIPE, text=True)
    serve: subprocess.Popen[str] | None = None
    asker: subprocess.Popen[str] | None = None
    try:
        assert up.stdout is not None
        up_port = int(up.stdout.readline())
        port = _free_port()
        pids = tmp_path / "pids"
        pids.mkdir()
        branchagent = Path(sys.executable).with_name("branchagent")
        serve = subprocess.Popen(
            [os.fspath(branchagent), "serve", "-w", os.fspath(repo), "--backend", "copy",
             "--upstream", f"http://127.0.0.1:{up_port}/v1", "--port", str(port),
             "--no-isolate", "--best-of", "2", "--shutdown-timeout", "1",
             "--apply", "file:candidate.txt",
             "--verify", f"echo $$ > {pids}/$(cat candidate.txt | tr ' ' _); exec sleep 60"],
            stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while _get(f"http://127.0.0.1:{port}/health") != 200:
            assert serve.poll() is None, serve.communicate()[1]
            assert time.monotonic() < deadline, "serve did not come up"
            time.sleep(0.1)
        # The in-flight request, from another process (it blocks until the server stops).
        asker = subprocess.Popen([sys.executable, "-c", ASK, str(port)],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        while len(list(pids.iterdir())) < 2:  # both verifications are running
            assert time.monotonic() < deadline, "the verifications did not start"
            time.sleep(0.05)
        time.sleep(0.2)
        status = subprocess.run([os.fspath(branchagent), "status", "--json", "-w",
                                 os.fspath(repo)], capture_output=True, text=True, check=True)
        assert len(json.loads(status.stdout)["branches"]) == 2
        verifier_pids = [int(p.read_text()) for p in pids.iterdir()]
        assert all(_alive(pid) for pid in verifier_pids)

        serve.send_signal(sig)
        _, err = serve.communicate(timeout=30)
        assert serve.returncode == 128 + sig, err
        answer, _ = asker.communicate(timeout=30)
        assert answer.strip(), "the in-flight request did not end"  # a status or an error
        assert "serve_request" in err  # one log line per request
        for pid in verifier_pids:
            for _ in range(50):
                if not _alive(pid):
                    break
                time.sleep(0.1)
            assert not _alive(pid), "a verification process outlived the server"
        status = subprocess.run([os.fspath(branchagent), "status", "--json", "-w",
                                 os.fspath(repo)], capture_output=True, text=True, check=True)
        assert json.loads(status.stdout)["branches"] == [], err
        assert pristine(repo)
    finally:
        for proc in (serve, up, asker):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        for stream in (up.stdout, serve.stderr if serve is not None else None,
                       asker.stdout if asker is not None else None):
            if stream is not None:
                stream.close()


async def test_report_dir_gets_one_lineage_report_per_request(repo: Path,
                                                              tmp_path: Path) -> None:
    reports = tmp_path / "reports"
    reports.mkdir()
    async with serving(repo, FakeUpstream(), report_dir=reports) as (client, _):
        r = await client.post("/v1/completions", json={"prompt": "p", "n": 1, "best_of": 4,
                                                       "commit": True})
        assert r.status_code == 200, r.text
        r2 = await client.post("/v1/completions", json={"prompt": "p", "n": 1, "best_of": 2})
        assert r2.status_code == 200, r2.text
    written = sorted(reports.iterdir())
    assert len(written) == 2
    path = Path(r.json()[EXTENSION]["report"])
    assert path in written
    page = await anyio.Path(path).read_text()
    assert len(re.findall(r'class="node[^"]*" data-index="\d+"', page)) == 4
    trace = json.loads(page.split('id="trace">', 1)[1].split("</script>", 1)[0])
    by_branch = {c["branch"]: c for c in trace["results"]}
    committed = r.json()[EXTENSION]["committed"]
    assert trace["winner"]["branch"] == committed
    assert "+ok 2 d" in by_branch[committed]["diff"]  # each candidate's own diff
    assert all(c["start"] is not None and c["end"] >= c["start"] for c in trace["results"])
    failed = [c for c in trace["results"] if not c["success"]]
    assert failed
    assert all(c["diff"] and "+bad" in c["diff"] for c in failed)


def test_report_dir_must_exist(repo: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a directory"):
        ServeConfig(upstream="http://upstream.test/v1", workspace=repo,
                    report_dir=tmp_path / "missing")


# -- issue 15: chat-shaped answers, file:PATH, records that explain ---------------------------

ADD = "def add(a, b):\n    return a + b\n"


def chat_answer(body: str) -> str:
    """What a small chat model answers: prose around one ```python block."""
    return (f"Sure! Here is `calc.py`:\n\n```python\n{body}```\n\n"
            "This function returns the sum of `a` and `b`.\n")


#: Mean logprobs -0.1, -0.2, -0.3, -0.4: the wrong and the prose-only answers rank first.
CHAT_SCRIPT: list[tuple[str, list[float]]] = [
    (chat_answer("def add(a, b):\n    return a - b\n"), [-0.1]),
    ("I'm sorry, I can only describe it: add returns a plus b.", [-0.2]),
    (chat_answer(ADD), [-0.3]),
    (chat_answer(ADD) + "Or shorter:\n```python\ndef add(a, b): return b + a\n```\n", [-0.4]),
]
PYTEST = f"{sys.executable} -m pytest -q -p no:cacheprovider"


async def test_issue_15_story_file_mode_commits_the_verified_chat_answer(
    repo: Path, tmp_path: Path
) -> None:
    """The issue's setup with fake chat answers: 1 of 4 verifies, is committed, and the
    records show every candidate's text, what apply did and the verifier's tails."""
    (repo / "test_calc.py").write_text(
        "from calc import add\n\n\ndef test_add():\n    assert add(2, 3) == 5\n")
    reports = tmp_path / "reports"
    reports.mkdir()
    async with serving(repo, FakeUpstream(CHAT_SCRIPT), verify=PYTEST, apply="file:calc.py",
                       report_dir=reports) as (client, _):
        r = await client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Write calc.py with add(a, b)."}],
            "best_of": 4, "commit": True})
    assert r.status_code == 200, r.text
    doc = r.json()
    assert (repo / "calc.py").read_text() == ADD  # the block, not the prose around it
    (choice,) = doc["choices"]
    assert choice["message"]["content"] == CHAT_SCRIPT[2][0]
    assert ext(choice)["committed"] is True
    top = doc[EXTENSION]
    assert (top["verified"], top["returned"]) == (1, 1)
    wrong, prose, right, two = top["candidates"]
    assert [c["text"] for c in top["candidates"]] == [t for t, _ in CHAT_SCRIPT]
    assert all(c["text_chars"] == len(c["text"]) for c in top["candidates"])
    assert right["apply"] == {"ok": True, "paths": ["calc.py"], "output": None, "error": None}
    assert "1 passed" in right["verify"]["stdout_tail"]
    assert right["verify"]["returncode"] == 0
    assert wrong["verified"] is False
    assert "assert -1 == 5" in wrong["verify"]["stdout_tail"]
    assert prose["apply"]["ok"] is True  # no block: the whole text is written
    assert "SyntaxError" in prose["verify"]["stdout_tail"]
    assert two["apply"]["ok"] is False
    assert "2 fenced code blocks (python, python)" in two["apply"]["error"]
    assert two["error"] == two["apply"]["error"]
    assert two["verify"] is None  # refused: the verifier never ran
    # the lineage report carries the same records
    page = await anyio.Path(top["report"]).read_text()
    trace = json.loads(page.split('id="trace">', 1)[1].split("</script>", 1)[0])
    infos = [c["info"] for c in trace["results"]]
    assert [i["text"] for i in infos] == [t for t, _ in CHAT_SCRIPT]
    assert "1 passed" in infos[2]["stdout_tail"]
    assert infos[3]["apply"]["ok"] is False


async def test_code_mode_with_a_path_and_its_refusals(repo: Path) -> None:
    script = [
        (chat_answer(ADD), [-0.1]),
        ("add(a, b) returns a + b; no code needed.", [-0.2]),
        ("```python ../escape.py\nprint('pwned')\n```\n", [-0.3]),
        ("```python /etc/passwd\nroot::0:0::/:/bin/sh\n```\n", [-0.4]),
    ]
    async with serving(repo, FakeUpstream(script), verify="test -f calc.py",
                       apply="code:calc.py") as (client, _):
        r = await client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "calc.py"}], "best_of": 4})
    assert r.status_code == 200, r.text
    ok, none, dotdot, absolute = r.json()[EXTENSION]["candidates"]
    assert (ok["verified"], ok["changes"], ok["apply"]["paths"]) == (True, ["calc.py"],
                                                                    ["calc.py"])
    assert none["apply"]["ok"] is False
    assert "0 fenced code block(s)" in none["apply"]["error"]
    assert "'../escape.py'" in dotdot["error"]
    assert "outside the branch" in dotdot["error"]
    assert "absolute" in absolute["error"]
    assert all(c["changes"] == [] for c in (none, dotdot, absolute))
    assert pristine(repo)
    assert not (repo.parent / "escape.py").exists()


@pytest.mark.parametrize("mode", ["file:../calc.py", "code:/abs/calc.py", "file:"])
def test_apply_path_outside_the_workspace_is_refused_at_start(repo: Path, mode: str) -> None:
    with pytest.raises(ValueError, match="give a path inside the workspace"):
        ServeConfig(upstream="http://upstream.test/v1", workspace=repo, apply=mode)
