"""scripts/check_links.py: every internal href/src of a built site must resolve."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "check_links.py"


def _checker() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_links", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _site(tmp_path: Path, index: str) -> Path:
    site = tmp_path / "site"
    (site / "api").mkdir(parents=True)
    (site / "api" / "index.html").write_text('<h2 id="open">open</h2><a name="old"></a>')
    (site / "logo.png").write_bytes(b"\x89PNG")
    (site / "index.html").write_text(index)
    return site


def test_links_that_resolve_pass(tmp_path: Path) -> None:
    site = _site(tmp_path, '<a href="api/">a</a><a href="api/index.html#open">b</a>'
                           '<a href="api/#old">c</a><img src="logo.png"><a href="#top">d</a>'
                           '<p id="top"></p><a href="https://example.org/x#y">e</a>'
                           '<a href="mailto:x@y">f</a><a href="/api/">g</a>')
    assert _checker().broken_links(site) == []


def test_missing_files_and_anchors_are_reported(tmp_path: Path) -> None:
    site = _site(tmp_path, '<a href="nope/">a</a><a href="api/#gone">b</a>'
                           '<img src="missing.png"><a href="#here">c</a>'
                           '<a href="../../outside.html">d</a>')
    broken = _checker().broken_links(site)
    assert broken == [
        "index.html: nope/: no such file in the site",
        "index.html: api/#gone: no anchor #gone in api/index.html",
        "index.html: missing.png: no such file in the site",
        "index.html: #here: no anchor #here in index.html",
        "index.html: ../../outside.html: no such file in the site",
    ]


def test_command_line_exit_status(tmp_path: Path) -> None:
    good = _site(tmp_path / "good", '<a href="api/">a</a>')
    bad = _site(tmp_path / "bad", '<a href="nope.html">a</a>')
    run = [sys.executable, str(SCRIPT)]
    ok = subprocess.run([*run, str(good)], capture_output=True, text=True, check=False)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    fail = subprocess.run([*run, str(bad)], capture_output=True, text=True, check=False)
    assert fail.returncode == 1
    assert fail.stdout == "index.html: nope.html: no such file in the site\n"
    usage = subprocess.run([*run, str(tmp_path / "absent")], capture_output=True, text=True,
                           check=False)
    assert usage.returncode == 2
    assert "usage" in usage.stderr
