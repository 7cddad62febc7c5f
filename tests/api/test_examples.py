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


def test_stateful_analysis_example_searches_over_sessions() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "stateful_analysis.py"), "--warmup", "0",
         "--compare"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = dict(line.split(": ", 1) for line in proc.stdout.splitlines())
    steps = ("steps=['drop_missing', 'normalize_region', 'dedupe', 'parse_amount', "
             "'clip_outliers']")
    for mode in ("sessions", "re-executing"):
        assert "committed=True" in lines[mode]
        assert steps in lines[mode]
    # With sessions, the table is loaded once per root node and every step runs once;
    # re-executing loads it at every node and replays every path.
    fields = {m: dict(f.split("=") for f in lines[m].split() if f.startswith(("nodes", "loads",
                                                                              "steps_run")))
              for m in lines}
    assert int(fields["sessions"]["loads"]) == 5
    assert fields["sessions"]["steps_run"] == fields["sessions"]["nodes"]
    assert int(fields["re-executing"]["loads"]) == int(fields["re-executing"]["nodes"])
    assert int(fields["re-executing"]["steps_run"]) > int(fields["sessions"]["steps_run"])
