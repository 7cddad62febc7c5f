"""The lineage report and the docs site in a real headless browser (Chromium over the
DevTools protocol on a pipe: tests/_chromium.py). Skipped where chromium is absent."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from _chromium import Browser, png_colors, requires_chromium

pytestmark = requires_chromium

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(sys.executable).with_name("branchagent")
CLI: list[str] = [os.fspath(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m",
                                                                "branchagent.cli"]
EXPAND = (
    'case "$BRANCHAGENT_DEPTH" in '
    '0) echo "echo 2 >&3; echo kid-a >> path.txt"; echo "exit 4"; '
    '   echo "echo 3 >&3; echo kid-b >> path.txt";; '
    '1) echo "echo 9 >&3; echo grandkid >> path.txt";; esac'
)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with Browser(width=1000, height=700) as b:
        yield b


@pytest.fixture
def run(repo: Path, tmp_path: Path) -> tuple[dict[str, Any], Path]:
    """A real tree search (copy backend): its trace and its --report page."""
    page = tmp_path / "report.html"
    r = subprocess.run(
        [*CLI, "-w", os.fspath(repo), "--backend", "copy", "--json", "tree", "--report",
         os.fspath(page), "--no-isolate", "--expand", EXPAND, "--max-depth", "2",
         "-c", "echo 1 >&3; echo root > path.txt", "-c", "echo 0.5 >&3; echo alt > alt.txt"],
        capture_output=True, text=True, timeout=120, check=False, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout), page


def test_the_report_renders_every_node(browser: Browser,
                                       run: tuple[dict[str, Any], Path]) -> None:
    doc, page = run
    browser.load(page.as_uri())
    assert browser.evaluate("document.title").startswith("branchagent report")
    assert browser.evaluate("document.querySelectorAll('.node').length") == len(doc["results"])
    assert browser.evaluate("document.querySelectorAll('#timeline .bar').length") == len(
        doc["results"])
    shown = browser.evaluate("[...document.querySelectorAll('.node.path')]"
                             ".map(n => Number(n.dataset.index))")
    assert shown[-1] == doc["winner"]["index"]
    # Laid out: the tree has a real size, nodes are visible.
    height = browser.evaluate("document.querySelector('.node').getBoundingClientRect().height")
    assert height > 5


def test_clicking_a_node_shows_its_diff(browser: Browser,
                                        run: tuple[dict[str, Any], Path]) -> None:
    doc, page = run
    browser.load(page.as_uri())
    # The winner's diff is shown first; a click on another node shows that node's own.
    winner = doc["winner"]["index"]
    assert browser.evaluate("document.getElementById('diff').dataset.index") == str(winner)
    other = next(r for r in doc["results"] if r["index"] != winner and r["diff"])
    browser.click(f'.node[data-index="{other["index"]}"]')
    assert browser.evaluate("document.getElementById('diff').dataset.index") == str(
        other["index"])
    text = browser.evaluate("document.getElementById('diff').textContent")
    assert text.strip() == other["diff"].strip()
    assert browser.evaluate("document.querySelector('.node.selected').dataset.index") == str(
        other["index"])
    added = browser.evaluate("[...document.querySelectorAll('#diff .add')]"
                             ".map(e => e.textContent.trim())")
    assert added == [line for line in other["diff"].splitlines()
                     if line.startswith("+") and not line.startswith("+++")]


def test_a_screenshot_of_the_report_is_not_blank(browser: Browser,
                                                 run: tuple[dict[str, Any], Path]) -> None:
    _, page = run
    browser.load(page.as_uri())
    colors = png_colors(browser.screenshot())
    assert len(colors) > 8, colors  # text, bars, backgrounds: not one flat colour


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None,
                    reason="mkdocs is not installed (pip install -e '.[docs]')")
def test_the_docs_pages_render_tables_not_raw_pipes(browser: Browser, tmp_path: Path) -> None:
    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d",
                        os.fspath(site)], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    pages = sorted(site.glob("**/index.html"))
    pages = [p for p in pages if p.relative_to(site).parts[0] not in ("search", "assets")]
    assert len(pages) >= 5
    raw_pipes = """(() => {
      const main = document.querySelector('article') || document.body;
      const walker = document.createTreeWalker(main, NodeFilter.SHOW_TEXT);
      const bad = [];
      for (let n = walker.nextNode(); n; n = walker.nextNode()) {
        if (n.parentElement.closest('pre, code')) continue;
        for (const line of n.textContent.split('\\n')) {
          if (/^\\s*\\|.*\\|\\s*$/.test(line) || /^\\s*\\|?\\s*:?-{3,}:?\\s*\\|/.test(line))
            bad.push(line.trim().slice(0, 80));
        }
      }
      return bad;
    })()"""
    problems: dict[str, Any] = {}
    tables = 0
    for p in pages:
        browser.load(p.as_uri())
        assert browser.evaluate("document.querySelector('h1') !== null"), p
        bad = browser.evaluate(raw_pipes)
        if bad:
            problems[os.fspath(p.relative_to(site))] = bad
        tables += browser.evaluate("document.querySelectorAll('article table').length")
    assert problems == {}
    assert tables > 0  # the docs do have tables, and they render as tables
