"""The lineage report: traces from real runs, ``Outcome.to_html()``, ``branchagent report``,
``--report FILE``, and the CLI's text tree (no browser here: see test_report_browser.py)."""

from __future__ import annotations

import functools
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import branchagent as ba
from branchagent.cli._progress import Progress
from branchagent.cli._render import print_human
from branchagent.strategy._arena import DIFF_LIMIT, _bounded
from branchagent.strategy._report import children_of, load_trace, verdict_of, winner_path

SCRIPT = Path(sys.executable).with_name("branchagent")
CLI: list[str] = [os.fspath(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m",
                                                                "branchagent.cli"]

#: depth 0 -> three children (one fails, one fails its evaluation); depth 1 -> one grandchild.
EXPAND = (
    'case "$BRANCHAGENT_DEPTH" in '
    '0) echo "echo 2 >&3; echo kid-a >> path.txt"; echo "exit 4"; '
    '   echo "echo 3 >&3; echo kid-b >> path.txt; touch bad";; '
    '1) echo "echo 9 >&3; echo grandkid >> path.txt";; esac'
)
EVALUATE = "test ! -e bad"


def ba_in(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "-w", os.fspath(repo), "--backend", "copy", *args],
                          capture_output=True, text=True, timeout=120, check=False,
                          stdin=subprocess.DEVNULL)


def tree_run(repo: Path, *common: str, report: Path | None = None
             ) -> subprocess.CompletedProcess[str]:
    """A real tree search on ``repo`` (copy backend): two roots, children, a grandchild."""
    extra = ["--report", os.fspath(report)] if report is not None else []
    return ba_in(repo, *common, "tree", *extra, "--no-isolate", "--expand", EXPAND,
                 "--max-depth", "2", "--evaluate", EVALUATE,
                 "-c", "echo 1 >&3; echo root > path.txt",
                 "-c", "echo other > other.txt; exit 3")


def node_indices(page: str) -> list[int]:
    return [int(i) for i in re.findall(r'class="node[^"]*" data-index="(\d+)"', page)]


@pytest.fixture
def traced(repo: Path, tmp_path: Path) -> tuple[dict[str, Any], str, str]:
    """(trace, --report page, text summary) of one real tree search."""
    report = tmp_path / "run.html"
    r = tree_run(repo, "--json", report=report)
    assert r.returncode == 0, r.stderr
    text = tree_run(repo, "-q")
    assert text.returncode == 0, text.stderr
    return json.loads(r.stdout), report.read_text(), text.stdout


def test_a_real_trace_records_times_and_diffs(traced: tuple[dict[str, Any], str, str]) -> None:
    doc, _, _ = traced
    results = doc["results"]
    assert len(results) >= 6
    for r in results:
        assert 0 <= r["start"] <= r["end"] <= doc["duration"] + 1e-6
        assert r["end"] - r["start"] == pytest.approx(r["duration"], abs=1e-6)
        assert isinstance(r["diff"], str)
    by = {r["index"]: r for r in results}
    winner = doc["winner"]
    assert "+grandkid" in winner["diff"]  # its own change, against its parent node
    assert "+root" not in winner["diff"]
    assert by[1]["diff"].count("other.txt") >= 1
    # The roots ran at the same time: their intervals overlap.
    assert by[0]["start"] < by[1]["end"]
    assert by[1]["start"] < by[0]["end"]


def test_the_report_shows_every_node_and_the_winner_path(
        traced: tuple[dict[str, Any], str, str]) -> None:
    doc, page, _ = traced
    assert sorted(node_indices(page)) == [r["index"] for r in doc["results"]]
    path = winner_path(doc)
    assert path[-1] == doc["winner"]["index"]
    assert len(path) == 3
    on_path = [int(i) for i in re.findall(r'class="node[^"]* path[^"]*" data-index="(\d+)"',
                                          page)]
    assert sorted(on_path) == sorted(path)
    assert page.count('<g class="bar"') == len(doc["results"])  # the timeline
    # Self-contained: nothing is fetched from anywhere.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "<link" not in page
    assert "@import" not in page
    # Every node's tree position: a child's <li> is inside its parent's.
    for r in doc["results"]:
        if r["parent"] is not None:
            parent_at = page.index(f'data-index="{r["parent"]}"')
            assert parent_at < page.index(f'data-index="{r["index"]}"')


def test_the_text_tree_groups_children_under_their_parents(
        traced: tuple[dict[str, Any], str, str]) -> None:
    doc, _, text = traced
    rows = [line for line in text.splitlines() if line.lstrip().startswith("#")]
    assert len(rows) == len(doc["results"])
    shown = [(len(line) - len(line.lstrip())) // 2 - 1 for line in rows]
    order = [int(line.split()[0][1:]) for line in rows]
    kids = children_of(doc["results"])

    expected: list[tuple[int, int]] = []

    def walk(parent: int | None, level: int) -> None:
        for i in kids.get(parent, []):
            expected.append((i, level))
            walk(i, level + 1)

    walk(None, 0)
    assert list(zip(order, shown, strict=True)) == expected
    # A failed node says what failed: its candidate's exit, or its evaluation.
    assert re.search(r"#1 +failed .*candidate exit 3", text)
    assert "evaluation failed (exit 1)" in text
    assert "exit 0" not in text


def test_children_print_under_their_real_parent_not_in_index_order() -> None:
    results = tuple(
        ba.Result(index=i, success=True, score=float(i), parent=p, depth=d)
        for i, p, d in [(0, None, 0), (1, None, 0), (2, 1, 1), (3, 0, 1), (4, 1, 1)]
    )
    outcome = ba.Outcome(committed=True, winner=results[4], results=results, strategy="t")
    out = io.StringIO()
    stdout, sys.stdout = sys.stdout, out
    try:
        print_human("tree", outcome, {})
    finally:
        sys.stdout = stdout
    order = [int(m) for m in re.findall(r"#(\d+) ", out.getvalue().split("\n", 1)[1])]
    assert order == [0, 3, 1, 2, 4]
    assert re.search(r"^  #1 +committed", out.getvalue(), re.M)  # on the winner's path
    assert re.search(r"^    #4 +committed", out.getvalue(), re.M)


@pytest.mark.parametrize(
    ("result", "says"),
    [
        ({"success": False, "info": {"returncode": 0, "candidate_success": True,
                                     "evaluate": {"success": False, "returncode": 2}}},
         "evaluation failed (exit 2)"),
        ({"success": False, "info": {"returncode": 0, "killed": "timeout"}},
         "candidate killed: timeout"),
        ({"success": False, "info": {"returncode": 5}}, "candidate exit 5"),
        ({"success": False, "error": "StrategyError: --expand exited 5\nmore"},
         "StrategyError: --expand exited 5"),
        ({"success": False, "info": {"returncode": 0}}, "candidate reported failure"),
        ({"success": True, "info": {"evaluate": {"success": True}}}, "verified"),
    ],
)
def test_a_verdict_says_what_failed(result: dict[str, Any], says: str) -> None:
    assert verdict_of(result) == says


def test_report_command_turns_a_trace_into_the_same_page(
        traced: tuple[dict[str, Any], str, str], tmp_path: Path) -> None:
    doc, page, _ = traced
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps(doc))
    r = subprocess.run([*CLI, "report", os.fspath(trace), "-o", os.fspath(tmp_path / "o.html")],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    made = (tmp_path / "o.html").read_text()
    assert node_indices(made) == node_indices(page)
    # Without -o: next to the trace, with .html.
    r = subprocess.run([*CLI, "report", os.fspath(trace)], capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    assert node_indices((tmp_path / "trace.html").read_text()) == node_indices(page)


@pytest.mark.parametrize(
    ("content", "says"),
    [("not json", "is not JSON"), ('{"a": 1}', "not an outcome"),
     ('{"results": [{"x": 1}]}', 'no integer "index"')],
)
def test_report_refuses_a_bad_trace_and_writes_nothing(tmp_path: Path, content: str,
                                                       says: str) -> None:
    trace = tmp_path / "t.json"
    trace.write_text(content)
    r = subprocess.run([*CLI, "report", os.fspath(trace), "-o", os.fspath(tmp_path / "o.html")],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 2
    assert says in r.stderr
    assert "--json" in r.stderr
    assert not (tmp_path / "o.html").exists()


def test_report_to_a_missing_directory_is_refused_before_the_run(repo: Path,
                                                                 tmp_path: Path) -> None:
    r = ba_in(repo, "speculate", "-c", "touch ran", "--report",
              os.fspath(tmp_path / "nowhere" / "r.html"))
    assert r.returncode == 2
    assert "does not exist" in r.stderr
    assert not (repo / "ran").exists()  # nothing ran


@pytest.mark.parametrize("command", [
    ["speculate", "-c", "echo a > a.txt"],
    ["best-of-n", "-n", "2", "--", "sh", "-c", "echo $BRANCHAGENT_ATTEMPT >&3"],
    ["reflexion", "--retries", "1", "--", "sh", "-c", "echo r > r.txt"],
    ["beam", "--expand", "true", "-c", "echo b > b.txt"],
])
def test_every_strategy_command_writes_a_report(repo: Path, tmp_path: Path,
                                                command: list[str]) -> None:
    out = tmp_path / "r.html"
    r = ba_in(repo, "--json", command[0], "--no-isolate", "--report", os.fspath(out),
              *command[1:])
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert sorted(node_indices(out.read_text())) == [x["index"] for x in doc["results"]]


@pytest.mark.anyio
async def test_outcome_to_html_from_a_library_run(tmp_path: Path, backend_name: str) -> None:
    root = tmp_path / "ws"
    root.mkdir()
    (root / "f.txt").write_text("0\n")

    async def attempt(branch: ba.Branch, i: int) -> float:
        await anyio.lowlevel.checkpoint()
        (branch.path / "f.txt").write_text(f"{i}\n</script><b>x</b>\n")
        return float(i)

    async with ba.open_workspace(root, backend=backend_name) as ws:
        outcome = await ba.BestOfN([functools.partial(attempt, i=i) for i in range(3)]).run(ws)
    assert outcome.winner is not None
    assert outcome.winner.index == 2
    page = outcome.to_html()
    assert node_indices(page) == [0, 1, 2]
    # A diff holding "</script>" cannot end the embedded trace early.
    assert page.count("</script>") == 2
    data = page.split('id="trace">', 1)[1].split("</script>", 1)[0]
    assert json.loads(data)["results"][2]["diff"].count("<b>x</b>") == 1
    assert load_trace(outcome.to_json())["winner"]["index"] == 2


def test_a_long_diff_is_cut_and_says_so() -> None:
    diff = "".join(f"+line {i}\n" for i in range(20_000))
    cut = _bounded(diff)
    assert len(cut) < DIFF_LIMIT + 100
    assert cut.endswith(f"of {len(diff)} characters)\n")
    assert _bounded("short\n") == "short\n"


def test_the_live_table_is_erased_before_the_summary() -> None:
    stream = io.StringIO()
    progress = Progress(stream, live=True)
    progress.feed(ba.Event(kind="branch_forked", branch="b-0", parent=None, depth=0))
    progress.started("b-0", "true")
    drawn = stream.getvalue()
    assert "b-0" in drawn
    progress.close(erase=True)
    tail = stream.getvalue()[len(drawn):]
    assert tail.startswith("\x1b[")
    assert tail.endswith("\x1b[J")
    assert "b-0" not in tail
    progress.redraw()  # closed: nothing more
    assert stream.getvalue().endswith("\x1b[J")
