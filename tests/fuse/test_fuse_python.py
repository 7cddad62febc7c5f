"""Python tooling in a FUSE branch: ``python -m venv``, then ``pip install`` of a local wheel.

Both run for real inside a branch (a venv is a thousand-odd files, renames,
symlinks, executables and scripts with absolute shebangs), the branch is
committed, and the venv must work from the base. No network: the wheel is
written by hand and pip runs with ``--no-index``; the venv gets its pip from
``ensurepip``'s bundled wheel. Skipped (with the reason) where FUSE cannot run.
"""

from __future__ import annotations

import base64
import hashlib
import sys
import zipfile
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest

import branchagent as ba
from _support import requires_fuse, snapshot
from branchagent._backends.fuse import FuseBackend
from branchagent._sandbox._run import isolation_available

pytestmark = [pytest.mark.anyio, requires_fuse]

needs_isolation = pytest.mark.skipif(
    not isolation_available(),
    reason="unshare cannot create private mount and PID namespaces here "
    "(user namespaces not permitted)",
)

GREETING = "hello from a wheel"

#: ``--isolated``: no PIP_* variables or pip.conf (PIP_FIND_LINKS, an index URL) from the host.
PIP = ("-m", "pip", "--isolated", "--disable-pip-version-check")


@pytest.fixture
def anyio_backend() -> str:
    """The tools are subprocesses; one event loop is enough."""
    return "asyncio"


@pytest.fixture
def wheel(tmp_path: Path) -> Path:
    """A pure-Python wheel, hello-ba 1.0, with a console script; built by hand, outside the repo."""
    name, version = "hello_ba", "1.0"
    info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": (f"def greet() -> str:\n    return {GREETING!r}\n\n\n"
                                "def main() -> None:\n    print(greet())\n").encode(),
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: hello-ba\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": (b"Wheel-Version: 1.0\nGenerator: branchagent-tests\n"
                          b"Root-Is-Purelib: true\nTag: py3-none-any\n"),
        f"{info}/entry_points.txt": b"[console_scripts]\nhello-ba = hello_ba:main\n",
    }

    def digest(data: bytes) -> str:
        raw = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
        return f"sha256={raw.decode()}"

    record = "".join(f"{path},{digest(data)},{len(data)}\n" for path, data in files.items())
    out = tmp_path / "wheels" / f"{name}-{version}-py3-none-any.whl"
    out.parent.mkdir()
    with zipfile.ZipFile(out, "w") as whl:
        for path, data in files.items():
            whl.writestr(path, data)
        whl.writestr(f"{info}/RECORD", f"{record}{info}/RECORD,,\n")
    return out


@asynccontextmanager
async def fuse_workspace(repo: Path) -> AsyncIterator[ba.Workspace]:
    async with ba.open_workspace(repo, backend=FuseBackend(),
                                 state_dir=repo.parent / "state") as ws:
        yield ws


async def run_here(argv: Sequence[str | Path], cwd: Path) -> str:
    """Run ``argv`` outside any sandbox; return its stdout, failing the test on a bad exit."""
    r = await anyio.run_process([str(a) for a in argv], cwd=cwd, check=False)
    out, err = r.stdout.decode(), r.stderr.decode()
    assert r.returncode == 0, f"{argv} failed ({r.returncode}):\n{out}\n{err}"
    return out


async def run_in(b: ba.WorkspaceBranch, argv: Sequence[str | Path]) -> str:
    """Run ``argv`` in ``b``'s sandbox (the branch at the workspace's path); return stdout."""
    r = await b.run([str(a) for a in argv], timeout=120)
    assert r.ok, f"{argv} failed in {b.name}: {r}"
    assert r.isolated
    return r.stdout


IMPORT = "import hello_ba, sys; print(hello_ba.greet()); print(sys.prefix)"


async def test_venv_and_pip_install_through_the_branch_path(repo: Path, wheel: Path) -> None:
    """Tools run on the branch's own path (its mount), as an agent without the sandbox would."""
    async with fuse_workspace(repo) as ws:
        b = await ws.fork("venv")
        venv = b.path / "venv"
        await run_here([sys.executable, "-m", "venv", venv], b.path)
        await run_here([venv / "bin/python", *PIP, "install", "--no-index", wheel], b.path)
        out = await run_here([venv / "bin/python", "-c", IMPORT], b.path)
        assert out.splitlines() == [GREETING, str(venv)]
        assert await run_here([venv / "bin/hello-ba"], b.path) == f"{GREETING}\n"
        assert not (repo / "venv").exists()
        await b.commit()
    # The interpreter finds its venv from where it is invoked (pyvenv.cfg beside bin/), so
    # the moved venv imports the package from the base ...
    out = await run_here([repo / "venv/bin/python", "-c", IMPORT], repo)
    assert out.splitlines() == [GREETING, str(repo / "venv")]
    # ... but pip wrote the scripts' shebangs with the path it ran under: the branch's mount,
    # gone now. (The realistic case, run() at the workspace's own path, is the next test.)
    script = repo / "venv/bin/hello-ba"
    assert script.read_text().startswith(f"#!{venv}/bin/python")
    assert await run_here([repo / "venv/bin/python", script], repo) == f"{GREETING}\n"


@needs_isolation
async def test_venv_made_with_run_works_in_the_base_and_abort_keeps_it(
    repo: Path, wheel: Path
) -> None:
    """Tools run through ``Branch.run()``, which binds the branch over the workspace's path:
    every absolute path they write (shebangs, pyvenv.cfg) is the base's, so the committed
    venv works as is, console scripts included. Then a branch that uninstalls is aborted."""
    async with fuse_workspace(repo) as ws:
        venv = ws.path / "venv"
        b = await ws.fork("install")
        await run_in(b, [sys.executable, "-m", "venv", venv])
        await run_in(b, [venv / "bin/python", *PIP, "install", "--no-index", wheel])
        out = await run_in(b, [venv / "bin/python", "-c", IMPORT])
        assert out.splitlines() == [GREETING, str(venv)]
        assert await run_in(b, [venv / "bin/hello-ba"]) == f"{GREETING}\n"
        assert (b.path / "venv/bin/hello-ba").read_text().startswith(f"#!{venv}/bin/python")
        assert not (repo / "venv").exists()
        await b.commit()

        assert await run_here([repo / "venv/bin/hello-ba"], repo) == f"{GREETING}\n"
        out = await run_here([repo / "venv/bin/python", "-c", IMPORT], repo)
        assert out.splitlines() == [GREETING, str(repo / "venv")]
        installed = snapshot(repo / "venv")

        gone = await ws.fork("uninstall")
        await run_in(gone, [venv / "bin/python", *PIP, "uninstall", "-y", "hello-ba"])
        r = await gone.run([str(venv / "bin/python"), "-c", "import hello_ba"], timeout=60)
        assert r.returncode == 1
        assert "ModuleNotFoundError" in r.stderr
        assert not (gone.path / "venv/bin/hello-ba").exists()
        deleted = {c.path for c in await gone.changes() if c.kind is ba.ChangeKind.DELETED}
        assert "venv/bin/hello-ba" in deleted
        assert snapshot(repo / "venv") == installed  # the base is untouched meanwhile
        await gone.abort()

        assert snapshot(repo / "venv") == installed
        assert await run_here([repo / "venv/bin/hello-ba"], repo) == f"{GREETING}\n"
        out = await run_here([repo / "venv/bin/python", "-m", "pip", "--isolated", "show",
                              "hello-ba"], repo)
        assert "Version: 1.0" in out.splitlines()
