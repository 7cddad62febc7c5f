"""Strategies are found by name through the ``branchagent.strategies`` entry points.

The built-ins and a third-party plugin (``examples/plugin``, installed for
the test only) go through the same group.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest

import branchagent as ba

PLUGIN = Path(__file__).resolve().parents[2] / "examples" / "plugin"
PLUGIN_MODULE = "ba_example_plugin"


def write_dist_info(site: Path, name: str, version: str, eps: Mapping[str, str]) -> None:
    """Make ``site`` hold a distribution's metadata as an installed wheel would."""
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = ["[branchagent.strategies]", *(f"{k} = {v}" for k, v in eps.items()), ""]
    (info / "entry_points.txt").write_text("\n".join(lines))
    (info / "RECORD").write_text("")


def install_plugin(site: Path) -> str:
    """Install examples/plugin into ``site``; return how it was done.

    With hatchling importable, pip builds and installs the real wheel
    (``--no-build-isolation``: no download). Without it, the wheel's content
    is laid out by hand from the plugin's pyproject.toml: its package and a
    dist-info carrying the entry points, which is all the discovery reads.
    """
    if importlib.util.find_spec("hatchling") is not None:
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
             "--no-build-isolation", "--target", os.fspath(site), os.fspath(PLUGIN)],
            check=True, capture_output=True,
        )
        return "pip"
    meta = tomllib.loads((PLUGIN / "pyproject.toml").read_text())
    project = meta["project"]
    shutil.copytree(PLUGIN / PLUGIN_MODULE, site / PLUGIN_MODULE)
    write_dist_info(site, project["name"], project["version"],
                    project["entry-points"]["branchagent.strategies"])
    return "by hand"


@contextmanager
def on_path(site: Path) -> Iterator[None]:
    """``site`` on sys.path (imports and importlib.metadata see it), removed afterwards."""
    sys.path.insert(0, os.fspath(site))
    importlib.invalidate_caches()
    try:
        yield
    finally:
        sys.path.remove(os.fspath(site))
        for mod in [m for m in sys.modules if m == PLUGIN_MODULE or m.startswith("ba_example")]:
            del sys.modules[mod]
        importlib.invalidate_caches()


@pytest.fixture
def plugin(tmp_path: Path) -> Iterator[str]:
    site = tmp_path / "site"
    site.mkdir()
    how = install_plugin(site)
    with on_path(site):
        yield how
    assert "first_success" not in ba.available_strategies()


def test_builtins_register_through_the_same_group() -> None:
    assert {"speculate", "best_of_n"} <= set(ba.available_strategies())
    assert ba.get_strategy("best_of_n") is ba.BestOfN
    assert ba.get_strategy("speculate") is ba.Speculate
    values = {ep.name: ep.value for ep in entry_points(group="branchagent.strategies")}
    assert values["speculate"] == "branchagent_strategies.speculate:Speculate"
    assert values["best_of_n"] == "branchagent_strategies.best_of_n:BestOfN"


def test_unknown_strategy_lists_the_known_ones() -> None:
    with pytest.raises(ba.StrategyNotFound, match=r"best_of_n, .*speculate") as info:
        ba.get_strategy("beam_me_up")
    assert isinstance(info.value, LookupError)
    assert "'beam_me_up'" in str(info.value)


def test_bad_entry_points_are_strategy_errors(tmp_path: Path) -> None:
    write_dist_info(tmp_path, "ba-broken", "1.0", {
        "broken_import": "ba_no_such_module:Thing",
        "not_a_strategy": "json:dumps",
    })
    with on_path(tmp_path):
        assert {"broken_import", "not_a_strategy"} <= set(ba.available_strategies())
        with pytest.raises(ba.StrategyError, match="cannot load strategy 'broken_import'"):
            ba.get_strategy("broken_import")
        with pytest.raises(ba.StrategyError, match="is not a Strategy subclass"):
            ba.get_strategy("not_a_strategy")
    assert "broken_import" not in ba.available_strategies()


@pytest.mark.anyio
async def test_third_party_plugin_found_by_name_and_runs(plugin: str, repo: Path) -> None:
    assert "first_success" in ba.available_strategies()
    cls: Any = ba.get_strategy("first_success")
    assert issubclass(cls, ba.Strategy)
    assert cls.__module__ == PLUGIN_MODULE

    ran: list[int] = []

    def cand(i: int, ok: bool) -> Any:
        async def candidate(b: ba.Branch) -> bool:
            ran.append(i)
            (b.path / "f.txt").write_text(str(i))
            return ok

        return candidate

    async with ba.open_workspace(repo, backend="copy") as ws:
        outcome = await cls([cand(0, False), cand(1, True), cand(2, True)]).run(ws)
        assert ws.branches() == []
        # A plugin strategy stands where a candidate stands, inside a built-in.
        nested = await ba.BestOfN([cls([cand(3, True)]), cls([cand(4, False)])]).run(ws)
        assert ws.branches() == []
    assert isinstance(outcome, ba.Outcome)
    assert outcome.committed
    assert outcome.winner is not None
    assert outcome.winner.index == 1
    assert ran[:2] == [0, 1]  # the third never ran
    assert [r.success for r in nested.results] == [True, False]
    assert (repo / "f.txt").read_text() == "3"
