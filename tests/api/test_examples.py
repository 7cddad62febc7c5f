"""The runnable examples in examples/ do what their docstrings say."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_subclass_strategy_example_widens_then_commits() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "subclass_strategy.py")],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "step 1: 2 round(s), committed=True" in proc.stdout
    assert "return a + b" in proc.stdout
    assert "return a * b" in proc.stdout
