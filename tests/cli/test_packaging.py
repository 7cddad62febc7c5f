"""What an installed package gives a user: a version, ``python -m branchagent``, one-line
errors for a missing extra or an unknown backend, and a wheel that works on its own."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

import branchagent as ba

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{ROOT / 'strategies'}"}


def _run(argv: list[str], cwd: Path, *, env: dict[str, str] = ENV,
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
                          check=False)


def test_version_flag_and_python_dash_m(tmp_path: Path) -> None:
    proc = _run([sys.executable, "-m", "branchagent", "--version"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"branchagent {ba.__version__}\n"


def test_unknown_backend_is_refused_naming_the_registered_ones(tmp_path: Path) -> None:
    proc = _run([sys.executable, "-m", "branchagent", "--backend", "zfs", "status"], tmp_path)
    assert proc.returncode == 2
    assert "--backend zfs: no such backend" in proc.stderr
    assert "copy, fuse, overlay" in proc.stderr
    assert proc.stdout == ""
    assert not list(tmp_path.iterdir()), "a refused command must change nothing"


def test_serve_without_its_extra_says_so_in_one_line(tmp_path: Path) -> None:
    # sys.modules[name] = None makes the module unimportable, as if it were not installed.
    code = ("import sys\nsys.modules['uvicorn'] = None\nfrom branchagent.cli import main\n"
            "sys.exit(main(sys.argv[1:]))")
    proc = _run([sys.executable, "-c", code, "serve", "--upstream", "http://127.0.0.1:9",
                 "--verify", "true", "-w", str(tmp_path)], tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert "[serve] extra" in lines[0]
    assert "uvicorn" in lines[0]
    assert "pip install 'branchagent[serve]'" in lines[0]


def test_readme_opens_with_pip_install_and_the_system_packages() -> None:
    text = (ROOT / "README.md").read_text()
    first_block = re.search(r"```(?:sh|bash)?\n(.*?)```", text, re.S)
    assert first_block is not None
    assert 'pip install "branchagent[fuse]"' in first_block.group(1)
    for package in ("libfuse3-dev", "fuse3", "pkg-config"):
        assert package in text


def _build_wheel(out: Path) -> Path:
    try:
        import hatchling  # noqa: F401
    except ImportError:
        pytest.skip("hatchling (the build backend, in the dev extra) is not installed, so "
                    "the wheel cannot be built without a package index")
    proc = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                 "--no-index", "-w", str(out), str(ROOT)], out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wheels = list(out.glob("branchagent-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_and_runs(tmp_path: Path) -> None:
    """The wheel alone (no source tree on the path) gives ``--version`` and runs the README
    example. Offline, the dependencies come from this interpreter's site-packages through a
    ``.pth`` file (which adds the directory only: its own ``.pth`` files, such as an editable
    install of branchagent, are not processed); branchagent itself comes from the wheel."""
    (tmp_path / "dist").mkdir()
    wheel = _build_wheel(tmp_path / "dist")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    proc = _run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)],
                tmp_path, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    site = _run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                tmp_path).stdout.strip()
    (Path(site) / "zz_shared_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    where = _run([str(py), "-c", "import branchagent; print(branchagent.__file__)"], tmp_path,
                 env=clean)
    assert where.returncode == 0, where.stderr
    assert where.stdout.startswith(site), where.stdout

    version = _run([str(py), "-m", "branchagent", "--version"], tmp_path, env=clean)
    assert version.returncode == 0, version.stderr
    assert version.stdout == f"branchagent {ba.__version__}\n"

    example = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    code = next(b for b in example if "open_workspace" in b)
    (tmp_path / "repo").mkdir()
    run = _run([str(py), "-c", code], tmp_path, env=clean)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[0] == "0 fixed None"
    assert len(run.stdout.splitlines()) == 2, run.stdout
