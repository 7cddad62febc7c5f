"""The library is silent until the application asks: no log line on stdout, ever.

Each check runs a fresh interpreter, so that no structlog or logging configuration left
by another test (the CLI's, ``capture_logs``') changes what is seen.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

from branchagent._log import get_logger

ROOT = Path(__file__).resolve().parents[2]
ENV_PATH = f"{ROOT / 'src'}:{ROOT / 'strategies'}"

#: A few operations on a copy-backend workspace, and a 3-candidate BestOfN; each logs at
#: info or debug.
WORK = """
import pathlib
import anyio
import branchagent as ba

async def work(path):
    path.mkdir()
    async with ba.open_workspace(path, backend="copy") as ws:
        b = await ws.fork("one")
        (b.path / "f.txt").write_text("x\\n")
        await b.commit()
        outcome = await ba.BestOfN([lambda b: 1.0, lambda b: 2.0, lambda b: 3.0]).run(ws)
        assert outcome.committed

anyio.run(work, pathlib.Path({path!r}))
print("done")
"""


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    import os

    env = {**os.environ, "PYTHONPATH": ENV_PATH}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120, check=False)


def _readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    blocks: list[str] = re.findall(r"```python\n(.*?)```", text, re.S)
    example = [b for b in blocks if "open_workspace" in b]
    assert example, "README.md has no python example calling open_workspace"
    return example[0]


def test_readme_example_prints_only_its_own_output(tmp_path: Path) -> None:
    (tmp_path / "repo").mkdir()
    proc = _python(_readme_example(), tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 2, proc.stdout
    assert lines[0] == "0 fixed None"
    assert lines[1].startswith("[Change(path='app.py'"), lines[1]
    # Nothing on stderr either: no handler is configured, so nothing is shown.
    assert proc.stderr == ""


def test_unconfigured_library_prints_nothing(tmp_path: Path) -> None:
    proc = _python(WORK.format(path=str(tmp_path / "ws")), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "done\n"
    assert proc.stderr == ""


def test_basicconfig_warning_silences_debug_and_info(tmp_path: Path) -> None:
    code = "import logging, sys\nlogging.basicConfig(level=logging.WARNING, stream=sys.stdout)\n"
    proc = _python(code + WORK.format(path=str(tmp_path / "ws")), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "done\n"
    assert proc.stderr == ""


def test_basicconfig_info_shows_library_events(tmp_path: Path) -> None:
    code = "import logging\nlogging.basicConfig(level=logging.INFO)\n"
    proc = _python(code + WORK.format(path=str(tmp_path / "ws")), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "done\n"
    assert re.search(r"^INFO:branchagent:workspace_opened .*backend=copy", proc.stderr, re.M)
    assert "INFO:branchagent:branch_committed branch=one" in proc.stderr
    assert "DEBUG" not in proc.stderr


def test_cli_verbose_logs_on_stderr_never_stdout(tmp_path: Path) -> None:
    import os

    (tmp_path / "ws").mkdir()
    env = {**os.environ, "PYTHONPATH": ENV_PATH}
    proc = subprocess.run(
        [sys.executable, "-m", "branchagent.cli", "-v", "-w", str(tmp_path / "ws"),
         "--backend", "copy", "run", "--no-isolate", "--", "sh", "-c", "echo hi > out.txt"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "workspace_opened" in proc.stderr
    assert "branch_committed" in proc.stderr
    for word in ("workspace_opened", "branch_committed", "branch_forked", "[info"):
        assert word not in proc.stdout, proc.stdout


def test_stdlib_route_renders_fields_and_honours_levels(caplog: pytest.LogCaptureFixture,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import structlog

    monkeypatch.setattr(structlog._config._CONFIG, "is_configured", False)
    log = get_logger("branchagent.test")
    with caplog.at_level(logging.INFO, logger="branchagent"):
        log.debug("hidden")
        log.info("shown", n=3, text="two words")
    assert [r.getMessage() for r in caplog.records] == ["shown n=3 text='two words'"]
    assert caplog.records[0].name == "branchagent.test"


def test_structlog_configuration_wins_when_present() -> None:
    from structlog.testing import capture_logs

    with capture_logs() as logs:
        get_logger("branchagent.test").warning("captured", k=1)
    assert logs == [{"event": "captured", "k": 1, "log_level": "warning"}]


def test_logger_names_stay_under_the_library() -> None:
    with pytest.raises(ValueError, match="outside the library"):
        get_logger("myapp")


def test_library_logger_has_a_null_handler() -> None:
    handlers = logging.getLogger("branchagent").handlers
    assert any(isinstance(h, logging.NullHandler) for h in handlers)

