"""`make demo` runs examples/demo.py: it must pick the right patch and commit it."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import anyio
import pytest

import branchagent as ba

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo.py"


def load_demo() -> ModuleType:
    spec = importlib.util.spec_from_file_location("branchagent_demo", DEMO)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def open_branches(repo: Path, backend: str) -> list[str]:
    async def names() -> list[str]:
        async with ba.open_workspace(repo, backend=backend, keep_branches=True) as ws:
            return [b.name for b in ws.branches()]

    return anyio.run(names)


@pytest.mark.parametrize("strategy", ["best_of_n", "speculate"])
def test_demo_commits_the_right_patch(tmp_path: Path, strategy: str, backend_name: str) -> None:
    demo = load_demo()
    outcome_file = tmp_path / "outcome.json"
    proc = subprocess.run(
        [sys.executable, os.fspath(DEMO), "--workdir", os.fspath(tmp_path),
         "--strategy", strategy, "--backend", backend_name, "--json", os.fspath(outcome_file)],
        capture_output=True, text=True, timeout=240, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    right_title, right_content = demo.PATCHES[demo.RIGHT]

    outcome = json.loads(outcome_file.read_text())
    assert outcome["committed"] is True
    assert outcome["winner"]["index"] == demo.RIGHT
    assert outcome["winner"]["info"]["title"] == right_title
    assert outcome["winner"]["changes"] == ["stats.py"]
    assert [r["success"] for r in outcome["results"] if r["info"].get("tests")] == [
        r["index"] == demo.RIGHT for r in outcome["results"] if r["info"].get("tests")]

    repo = tmp_path / "stats-repo"
    assert (repo / "stats.py").read_text() == right_content
    assert (repo / "test_stats.py").read_text() == demo.TESTS
    assert not (repo / "__pycache__").exists()
    assert open_branches(repo, backend_name) == []

    out = proc.stdout
    assert f'winner: candidate {demo.RIGHT} "{right_title}"' in out
    assert "+        raise ValueError" in out  # the diff is shown
    assert "before: the repository's tests: 2/6 passed" in out
    assert "after the commit, the repository's own test run: 6/6 passed" in out
