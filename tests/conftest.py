"""Shared fixtures: every async test runs on asyncio and trio; backends are parametrized."""

from __future__ import annotations

from pathlib import Path

import pytest

import branchagent as ba

#: Backends the suite runs against: every one registered and usable here.
BACKENDS = [name for name in ba.available_backends() if name in {"copy", "fuse", "overlay"}]


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _usable(name: str) -> str:
    """``name``, or a skip naming what this host lacks for it (overlay: root, overlayfs)."""
    if name == "overlay":
        from branchagent._backends.overlay import check_available

        try:
            check_available()
        except ba.BackendUnavailable as exc:
            pytest.skip(str(exc))
    return name


@pytest.fixture(params=BACKENDS)
def backend_name(request: pytest.FixtureRequest) -> str:
    return _usable(str(request.param))


@pytest.fixture(params=[b for b in BACKENDS if b != "overlay"])
def forking_backend(request: pytest.FixtureRequest) -> str:
    """The backends sessions fork on (overlay refuses: tests/sandbox/test_sessions.py
    ``test_overlay_refuses_to_fork_a_session``)."""
    return str(request.param)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A small workspace: files, a nested dir, an empty dir, a symlink, an executable."""
    root = tmp_path / "repo"
    (root / "src" / "pkg").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "README.md").write_text("# demo\n")
    (root / "src" / "pkg" / "mod.py").write_text("def f():\n    return 1\n")
    (root / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (root / "run.sh").chmod(0o755)
    (root / "link").symlink_to("README.md")
    return root
