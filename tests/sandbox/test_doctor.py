"""``ba.doctor()`` and ``branchagent doctor``: the report matches this host.

Expectations are computed here independently of ``_doctor`` wherever that is
possible (stat /dev/fuse, run ``unshare`` and ``cp --reflink``, read the
mount table), and the limit mechanisms are checked against what a real run
reports in ``RunResult.enforced``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
from structlog.testing import capture_logs

import branchagent as ba
from branchagent import _doctor

SCRIPT = Path(sys.executable).with_name("branchagent")
CLI: list[str] = [os.fspath(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m",
                                                                "branchagent.cli"]
DOCS = Path(__file__).resolve().parents[2] / "docs" / "doctor.md"
KEYS = {"path", "fuse_ok", "isolation_ok", "mechanisms", "cgroups", "checks"}


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, timeout=60,
                          check=False, stdin=subprocess.DEVNULL)


def works(*argv: str) -> bool:
    try:
        return subprocess.run(list(argv), capture_output=True, timeout=30,
                              check=False).returncode == 0
    except OSError:
        return False


def cgroup_mounts() -> tuple[Path | None, set[str]]:
    """(the cgroup2 mount point, the v1 controllers mounted), from /proc/self/mountinfo."""
    v2: Path | None = None
    v1: set[str] = set()
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields = right.split()
        if fields and fields[0] == "cgroup2" and v2 is None:
            v2 = Path(left.split()[4])
        elif fields and fields[0] == "cgroup":
            v1 |= set(fields[2].split(",")) & {"memory", "pids", "cpu", "freezer"}
    return v2, v1


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> ba.DoctorReport:
    return anyio.run(ba.doctor, tmp_path_factory.mktemp("doctor"))


# -- the report matches this host -----------------------------------------------------------


def test_fuse_checks_match_the_host(report: ba.DoctorReport) -> None:
    dev = report.check("fuse.device")
    assert dev.ok == (os.path.exists("/dev/fuse") and os.access("/dev/fuse", os.R_OK | os.W_OK))
    exe = shutil.which("fusermount3")
    setuid = exe is not None and bool(os.stat(exe).st_mode & stat.S_ISUID)
    assert report.check("fuse.fusermount3").ok == (setuid or os.geteuid() == 0)
    imports = importlib.util.find_spec("pyfuse3") is not None and works(
        sys.executable, "-c", "import pyfuse3")
    assert report.check("fuse.pyfuse3").ok == imports
    if imports:
        from importlib.metadata import version

        assert version("pyfuse3") in report.check("fuse.pyfuse3").detail
    assert report.fuse_ok == report.check("fuse.backend").ok
    assert report.fuse_ok == (dev.ok and imports and (exe is not None or os.geteuid() == 0))
    for c in report.checks:
        assert c.ok or c.fix, f"{c.name} is missing and names no fix"


def test_namespace_checks_match_unshare(report: ba.DoctorReport) -> None:
    as_user = [] if os.geteuid() == 0 else ["--map-root-user"]
    assert report.check("ns.user").ok == works("unshare", "--user", "--map-root-user", "true")
    assert report.check("ns.mount").ok == works("unshare", *as_user, "--mount", "true")
    assert report.check("ns.pid").ok == works("unshare", *as_user, "--pid", "--fork", "true")
    assert report.check("ns.net").ok == works("unshare", *as_user, "--net", "true")
    assert report.isolation_ok == works("unshare", *as_user, "--mount", "--pid", "--fork",
                                        "--propagation", "private", "true")
    maxns = Path("/proc/sys/user/max_user_namespaces").read_text().strip()
    assert f"max_user_namespaces={maxns}" in report.check("ns.user").detail


def test_cgroup_layout_matches_the_mount_table(report: ba.DoctorReport) -> None:
    v2, v1 = cgroup_mounts()
    kind = report.cgroups["kind"]
    if v2 is not None and v1:
        assert kind in ("hybrid", "v2"), kind
    elif v2 is not None:
        assert kind in ("v2", "v2-partial"), kind
    else:
        assert kind in ("v1", "none"), kind
    offered = set((v2 / "cgroup.controllers").read_text().split()) if v2 else set()
    for limit in ("memory", "pids", "cpu"):
        how = report.mechanisms[limit]
        if how == "cgroup2":
            assert limit in offered
        elif how == "cgroup1":
            assert limit in v1
    if v2 is not None and v1 and "memory" not in offered and os.geteuid() == 0:
        # This project's machine (machine.md): hybrid, memory/pids/cpu on v1, root.
        assert kind == "hybrid"
        assert report.mechanisms["memory"] == "cgroup1"
    assert report.check("cgroups").ok == (kind in ("v2", "hybrid", "v1"))


@pytest.mark.anyio
async def test_mechanisms_are_what_a_run_enforces(repo: Path) -> None:
    report = await ba.doctor(repo)
    async with ba.open_workspace(repo, backend="copy") as ws:
        b = await ws.fork()
        r = await b.run(["true"], limits=ba.Limits(memory="256M", pids=64, cpu=1.0),
                        isolate=False)
        await b.abort()
    assert r.ok, r.stderr
    for limit in ("memory", "pids", "cpu"):
        how = report.mechanisms[limit]
        if how is None:
            assert limit in r.not_enforced, (limit, r.enforced)
        else:
            assert f"{limit}:{how}" in r.enforced, (limit, r.enforced)
    for facility in ("kill", "freeze"):
        how = report.mechanisms[facility]
        if how is not None:
            assert f"{facility}:{how}" in r.enforced, (facility, r.enforced)


def test_filesystem_and_platform_checks(report: ba.DoctorReport, tmp_path: Path) -> None:
    overlay = any(line.split()[-1:] == ["overlay"]
                  for line in Path("/proc/filesystems").read_text().splitlines())
    assert report.check("overlayfs").ok == overlay
    # Reflinks, on the report's directory (same filesystem as tmp_path's).
    a, b = Path(report.path) / "a", Path(report.path) / "b"
    a.write_bytes(b"x" * 65536)
    try:
        assert report.check("reflink").ok == works("cp", "--reflink=always", os.fspath(a),
                                                   os.fspath(b))
    finally:
        a.unlink()
        b.unlink(missing_ok=True)
    assert not any(p.name.startswith(".branchagent-doctor-") for p in Path(report.path).iterdir())
    assert platform.release() in report.check("kernel").detail
    assert platform.python_version() in report.check("python").detail
    assert ("running as root" in report.check("root").detail) == (os.geteuid() == 0)
    assert report.check("systemd-run").ok == (
        os.geteuid() == 0  # root never uses a delegated scope
        or (shutil.which("systemd-run") is not None and os.path.isdir("/run/systemd/system")))


def test_disk_is_reported_only_where_limits_has_it(report: ba.DoctorReport) -> None:
    import attrs

    has_disk = "disk" in attrs.fields_dict(ba.Limits)
    assert ("disk" in report.mechanisms) == has_disk
    if has_disk:
        assert report.mechanisms["disk"] == ("fuse" if report.fuse_ok else None)


# -- the record and its renderings -----------------------------------------------------------


def test_records_are_frozen_and_the_json_round_trips(report: ba.DoctorReport) -> None:
    import attrs

    c = report.checks[0]
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        c.ok = not c.ok  # type: ignore[misc]
    doc = json.loads(report.to_json())
    assert set(doc) == KEYS
    assert doc == report.as_dict()
    assert [x["name"] for x in doc["checks"]] == [x.name for x in report.checks]
    with pytest.raises(KeyError):
        report.check("no.such.check")
    assert str(report) == report.render()


def test_check_names_are_the_documented_ones(report: ba.DoctorReport) -> None:
    assert _doctor.__doc__ is not None
    documented = set(re.findall(r"`([a-z0-9.-]+)`", DOCS.read_text()))
    names = {c.name for c in report.checks}
    assert names <= documented, names - documented
    for name in names:
        assert name in _doctor.__doc__, name


def test_a_missing_piece_shows_its_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real = os.access

    def access(path: Any, mode: int, *a: Any, **kw: Any) -> bool:
        return False if os.fspath(path) == "/dev/fuse" else real(path, mode, *a, **kw)

    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse here: the missing-device path is the real one")
    monkeypatch.setattr(os, "access", access)
    report = anyio.run(ba.doctor, tmp_path)
    dev = report.check("fuse.device")
    assert not dev.ok
    assert dev.fix is not None
    assert "chmod 0666 /dev/fuse" in dev.fix
    assert not report.fuse_ok  # the backend's own check sees the same
    text = report.render()
    line = next(i for i, s in enumerate(text.splitlines()) if " fuse.device " in s)
    assert "MISSING" in text.splitlines()[line]
    assert "fix: chmod 0666 /dev/fuse" in text.splitlines()[line + 1]
    assert "cannot work here" in text


# -- the command --------------------------------------------------------------------------------


def test_cli_json_is_the_report(tmp_path: Path) -> None:
    r = cli("doctor", "--json", "-w", os.fspath(tmp_path))
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert set(doc) == KEYS
    assert doc["path"] == os.path.realpath(tmp_path)
    for c in doc["checks"]:
        assert set(c) == {"name", "ok", "detail", "fix"}
        assert isinstance(c["ok"], bool)
        assert isinstance(c["detail"], str)
    assert set(doc["mechanisms"]) >= {"memory", "pids", "cpu", "kill", "freeze"}
    assert {"kind", "mechanisms", "hints"} <= set(doc["cgroups"])


def test_cli_table_names_the_fix_and_exits_0_when_pieces_are_missing(tmp_path: Path) -> None:
    """Without unshare (nor fusermount3, nor systemd-run) on PATH."""
    empty = tmp_path / "bin"
    empty.mkdir()
    env = {**os.environ, "PATH": os.fspath(empty)}
    r = cli("doctor", "-w", os.fspath(tmp_path), env=env)
    assert r.returncode == 0, r.stderr  # doctor informs; it does not fail
    lines = r.stdout.splitlines()
    i = next(i for i, s in enumerate(lines) if " ns.mount " in s)
    assert lines[i].split()[0] == "MISSING"
    assert "unshare not found" in lines[i]
    assert "fix: apt-get install util-linux" in lines[i + 1]
    assert "isolated runs: cannot work here" in r.stdout
    assert r.stderr == ""


def test_cli_table_has_one_line_per_check(report: ba.DoctorReport) -> None:
    r = cli("doctor")
    assert r.returncode == 0, r.stderr
    for c in report.checks:
        rows = [s for s in r.stdout.splitlines() if re.search(rf"\s{re.escape(c.name)}\s", s)]
        assert len(rows) == 1, (c.name, rows)
        assert rows[0].split()[0] in ("ok", "MISSING")
    assert "enforced per run: memory " in r.stdout


def test_cli_bad_workspace_exits_2(tmp_path: Path) -> None:
    r = cli("doctor", "-w", os.fspath(tmp_path / "nope"))
    assert r.returncode == 2
    assert "not a directory" in r.stderr


# -- the log line -------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_open_workspace_logs_host_capabilities_once(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_doctor, "_logged", False)
    with capture_logs() as logs:
        for _ in range(2):
            async with ba.open_workspace(repo, backend="copy"):
                pass
    events = [e for e in logs if e["event"] == "host_capabilities"]
    assert len(events) == 1
    e = events[0]
    assert e["log_level"] == "debug"
    v2, v1 = cgroup_mounts()
    assert e["cgroup_layout"] == (("hybrid" if v1 else "v2") if v2 else ("v1" if v1 else "none"))
    assert e["root"] == (os.geteuid() == 0)
    assert (e["fuse"] is True) == (os.access("/dev/fuse", os.R_OK | os.W_OK)
                                   and importlib.util.find_spec("pyfuse3") is not None)
