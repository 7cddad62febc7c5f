"""What this host offers, and what a run in a branch will really enforce, and how.

``await ba.doctor()`` (and ``branchagent doctor [--json]``) looks at FUSE,
namespaces, cgroups, overlayfs, reflinks and the platform, and for every
missing piece names the one command or setting that would give it. The probes
are real: the namespace checks run ``unshare``, the reflink check clones a
temporary file, the cgroup check is the sandbox's own detection (which
creates this process's parent cgroups, as the first run would).

Check names (stable; ``--json`` and :meth:`DoctorReport.check` use them)::

    fuse.device  fuse.fusermount3  fuse.pyfuse3  fuse.backend
    ns.mount  ns.pid  ns.user  ns.net  ns.isolation
    cgroups  limit.memory  limit.pids  limit.cpu  limit.kill  limit.freeze  [limit.disk]
    overlayfs  reflink  kernel  python  root  systemd-run

``open_workspace`` logs a compact summary of the cheap part once per process,
as the debug event ``host_capabilities``: FUSE's own check, the cgroup layout
from the mount table, overlayfs, root, kernel, Python. Nothing is spawned and
no cgroup is made for it; the limit mechanisms are logged by the sandbox when
the first run detects them (``cgroups_detected``).
"""

from __future__ import annotations

import errno
import fcntl
import importlib.util
import json
import os
import platform
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

import anyio
import anyio.to_thread
import attrs

from ._limits import Limits
from ._log import get_logger
from ._sandbox import _cgroup, _spawn

__all__ = ["DoctorCheck", "DoctorReport", "doctor", "log_host_capabilities"]

log = get_logger("branchagent")

#: The limits a run can ask for whose mechanism the report names.
LIMITS = ("memory", "pids", "cpu", "kill", "freeze")
_FICLONE = 0x40049409  # _IOW(0x94, 9, int), linux/fs.h
_PROBE_TIMEOUT_S = 10.0

_MECHANISM_TEXT = {
    ("memory", "cgroup2"): "cgroup v2 memory.max (swap off, the whole group OOM-killed)",
    ("memory", "cgroup1"): "cgroup v1 memory.limit_in_bytes (+ memsw where present)",
    ("memory", "rlimit-as"): "RLIMIT_AS through prlimit: caps address space, not resident "
                             "memory (allocation fails with MemoryError; no OOM kill)",
    ("pids", "cgroup2"): "cgroup v2 pids.max",
    ("pids", "cgroup1"): "cgroup v1 pids.max",
    ("cpu", "cgroup2"): "cgroup v2 cpu.max",
    ("cpu", "cgroup1"): "cgroup v1 cpu.cfs_quota_us",
    ("kill", "cgroup2"): "cgroup.kill: the whole tree, setsid'd processes too",
    ("freeze", "cgroup2"): "cgroup v2 cgroup.freeze",
    ("freeze", "cgroup1"): "cgroup v1 freezer.state",
    ("disk", "fuse"): "the FUSE filesystem counts a branch's private bytes",
}
_UNENFORCED_TEXT = {
    "memory": "not enforced",
    "pids": "not enforced: a run's RunResult.not_enforced names it",
    "cpu": "not enforced: a run's RunResult.not_enforced names it",
    "kill": "process-group SIGKILL (and the PID namespace's init when isolated); "
            "an unisolated setsid'd process can escape it",
    "freeze": "SIGSTOP to the process group (Branch.pause); setsid'd processes keep running",
    "disk": "not enforced on this backend",
}


@attrs.frozen
class DoctorCheck:
    """One finding: ``ok`` when the piece is there (or the limit is enforced).
    ``fix``: for a missing piece, the command or setting that would give it; for one
    that works in a weaker way (memory by rlimit), how to get the better one."""

    name: str
    ok: bool
    detail: str
    fix: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail, "fix": self.fix}


@attrs.frozen
class DoctorReport:
    """What :func:`doctor` found. ``mechanisms`` maps each limit (``memory``,
    ``pids``, ``cpu``, ``kill``, ``freeze``, and ``disk`` where ``Limits`` has
    it) to the mechanism a run uses (``cgroup2``, ``cgroup1``, ``rlimit-as``,
    ``fuse``) or None (not enforced, or only a weaker fallback)."""

    path: str
    checks: tuple[DoctorCheck, ...]
    mechanisms: Mapping[str, str | None]
    cgroups: Mapping[str, Any]

    def check(self, name: str) -> DoctorCheck:
        """The check called ``name`` (``KeyError`` if there is none)."""
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(name)

    @property
    def missing(self) -> tuple[DoctorCheck, ...]:
        return tuple(c for c in self.checks if not c.ok)

    @property
    def fuse_ok(self) -> bool:
        """Whether the default backend (FUSE) can work here."""
        return self.check("fuse.backend").ok

    @property
    def isolation_ok(self) -> bool:
        """Whether ``Branch.run(..., isolate=True)`` (the default) can work here."""
        return self.check("ns.isolation").ok

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: ``path``, ``fuse_ok``, ``isolation_ok``, ``mechanisms``,
        ``cgroups``, ``checks`` (each ``name``, ``ok``, ``detail``, ``fix``)."""
        return {
            "path": self.path,
            "fuse_ok": self.fuse_ok,
            "isolation_ok": self.isolation_ok,
            "mechanisms": dict(self.mechanisms),
            "cgroups": _jsonable(self.cgroups),
            "checks": [c.as_dict() for c in self.checks],
        }

    def to_json(self, *, indent: int | None = 2) -> str:
        return json.dumps(self.as_dict(), indent=indent)

    def render(self) -> str:
        """A table, one line per check; under each missing piece, its fix."""
        width = max(len(c.name) for c in self.checks)
        lines = [f"branchagent doctor: {self.path}"]
        for c in self.checks:
            lines.append(f"  {'ok' if c.ok else 'MISSING':<8} {c.name:<{width}}  {c.detail}")
            if c.fix:
                what = "fix" if not c.ok else "better"
                lines.append(f"  {'':<8} {'':<{width}}  {what}: {c.fix}")
        mech = ", ".join(f"{k} {v or '-'}" for k, v in self.mechanisms.items())
        lines.append(f"enforced per run: {mech}")
        verdict = "works" if self.fuse_ok else "cannot work here (pass --backend copy)"
        lines.append(f"default backend (fuse): {verdict}; isolated runs: "
                     + ("work" if self.isolation_ok else "cannot work here (--no-isolate)"))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.render()


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


# -- small probes (sync, blocking: run in a worker thread) -------------------------------------


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _in_container() -> bool:
    if os.path.exists("/.dockerenv") or os.path.exists("/run/.containerenv"):
        return True
    text = _read("/proc/1/cgroup") or ""
    return any(word in text for word in ("docker", "kubepods", "containerd", "lxc"))


def _check_device() -> DoctorCheck:
    dev = "/dev/fuse"
    try:
        st = os.stat(dev)
    except OSError:
        fix = ("run the container with --device /dev/fuse --cap-add SYS_ADMIN"
               if _in_container() else "modprobe fuse")
        return DoctorCheck("fuse.device", False, f"{dev} does not exist", fix)
    kind = "character device" if stat.S_ISCHR(st.st_mode) else "not a character device"
    mode = f"mode {stat.S_IMODE(st.st_mode):04o}"
    if not os.access(dev, os.R_OK | os.W_OK):
        return DoctorCheck("fuse.device", False,
                           f"{dev}: {kind}, {mode}, not readable and writable by uid "
                           f"{os.geteuid()}", f"chmod 0666 {dev} (the usual mode), or run as root")
    return DoctorCheck("fuse.device", True, f"{dev}: {kind}, {mode}, read/write for this user")


def _check_fusermount() -> DoctorCheck:
    exe = shutil.which("fusermount3")
    if exe is None:
        return DoctorCheck("fuse.fusermount3", os.geteuid() == 0,
                           "fusermount3 not found on PATH" + (
                               " (root unmounts with umount; still, fuse3 provides libfuse3)"
                               if os.geteuid() == 0 else ""),
                           "apt-get install fuse3")
    st = os.stat(exe)
    setuid = bool(st.st_mode & stat.S_ISUID) and st.st_uid == 0
    if setuid:
        return DoctorCheck("fuse.fusermount3", True, f"{exe} (setuid root)")
    if os.geteuid() == 0:
        return DoctorCheck("fuse.fusermount3", True, f"{exe} (not setuid; not needed as root)")
    return DoctorCheck("fuse.fusermount3", False,
                       f"{exe} is not setuid root: an ordinary user cannot mount with it",
                       f"chmod u+s {exe}")


def _check_pyfuse3() -> DoctorCheck:
    """Imported in a child interpreter: the import loads libfuse3 (and trio), and a
    missing shared library shows only then; this process stays as it was."""
    from ._backends.fuse._backend import _INSTALL

    if importlib.util.find_spec("pyfuse3") is None:
        return DoctorCheck("fuse.pyfuse3", False, "pyfuse3 is not installed", _INSTALL)
    code = "import pyfuse3, sys; sys.stdout.write(getattr(pyfuse3, '__version__', '?'))"
    try:
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return DoctorCheck("fuse.pyfuse3", False, f"import pyfuse3 did not finish: {exc}",
                           _INSTALL)
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["?"])[-1]
        fix = ("apt-get install libfuse3-3" if "libfuse3" in last else _INSTALL)
        return DoctorCheck("fuse.pyfuse3", False, f"import pyfuse3 fails: {last}", fix)
    return DoctorCheck("fuse.pyfuse3", True, f"pyfuse3 {res.stdout.strip()} imports")


def _check_backend(pyfuse3: DoctorCheck | None) -> DoctorCheck:
    """The FUSE backend's own check (what ``open_workspace`` raises), plus the import."""
    from ._backends import available_backends
    from ._backends.fuse._backend import check_available
    from .exceptions import BackendUnavailable

    if "fuse" not in available_backends():
        return DoctorCheck("fuse.backend", False, "no backend named 'fuse' is registered",
                           "pip install -e . (a branchagent install registers it)")
    try:
        check_available()
    except BackendUnavailable as exc:
        return DoctorCheck("fuse.backend", False, str(exc),
                           "fix the fuse.* line(s) above, or pass backend='copy' "
                           "(--backend copy)")
    if pyfuse3 is not None and not pyfuse3.ok:
        return DoctorCheck("fuse.backend", False, "pyfuse3 is installed but does not import",
                           pyfuse3.fix)
    return DoctorCheck("fuse.backend", True, "the FUSE backend (the default) can work here")


def _unshare(*flags: str) -> tuple[bool, str]:
    """Try ``unshare FLAGS true``; (worked, why not)."""
    exe = shutil.which("unshare")
    if exe is None:
        return False, "unshare not found on PATH"
    argv = [exe, *flags]
    if os.geteuid() != 0 and "--map-root-user" not in flags:
        argv.insert(1, "--map-root-user")
    try:
        res = subprocess.run([*argv, "true"], capture_output=True, text=True, check=False,
                             timeout=_PROBE_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, str(exc)
    return res.returncode == 0, res.stderr.strip()[-300:]


def _userns_fix() -> str:
    maxns = _read("/proc/sys/user/max_user_namespaces")
    if maxns == "0":
        return "sysctl -w user.max_user_namespaces=15000"
    if _read("/proc/sys/kernel/unprivileged_userns_clone") == "0":
        return "sysctl -w kernel.unprivileged_userns_clone=1"
    if _read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns") == "1":
        return "sysctl -w kernel.apparmor_restrict_unprivileged_userns=0"
    if _in_container():
        return ("run the container with --security-opt seccomp=unconfined "
                "(the default seccomp profile refuses unshare)")
    return "sysctl -w user.max_user_namespaces=15000"


def _ns_fix(why: str) -> str:
    if "not found" in why:
        return "apt-get install util-linux (it provides unshare)"
    if os.geteuid() != 0:
        return _userns_fix() + " (as an ordinary user these need a user namespace)"
    if _in_container():
        return ("run the container with --cap-add SYS_ADMIN --security-opt seccomp=unconfined "
                "--security-opt apparmor=unconfined (or --privileged)")
    return "run as root, or enable user namespaces: " + _userns_fix()


def _ns_check(name: str, what: str, flags: tuple[str, ...]) -> DoctorCheck:
    ok, why = _unshare(*flags)
    shown = " ".join(flags)
    if ok:
        return DoctorCheck(name, True, f"{what}: `unshare {shown} true` works")
    return DoctorCheck(name, False, f"{what}: `unshare {shown} true` fails: {why or '?'}",
                       _ns_fix(why))


def _check_userns() -> DoctorCheck:
    ok, why = _unshare("--user", "--map-root-user")
    facts = [f"max_user_namespaces={_read('/proc/sys/user/max_user_namespaces') or '?'}"]
    clone = _read("/proc/sys/kernel/unprivileged_userns_clone")
    if clone is not None:
        facts.append(f"unprivileged_userns_clone={clone}")
    tail = f" ({', '.join(facts)})"
    if ok:
        return DoctorCheck("ns.user", True, f"user namespaces work{tail}")
    return DoctorCheck("ns.user", False, f"user namespaces fail: {why or '?'}{tail}",
                       _ns_fix(why) if "not found" in why else _userns_fix())


def _check_isolation() -> DoctorCheck:
    """The sandbox's own probe: the run's own unshare line (with --net for network=False)."""
    problem = _spawn.isolation_problem(True)
    if problem is None:
        net = _spawn.isolation_problem(False)
        tail = ("; with Limits(network=False) too" if net is None else
                f"; Limits(network=False) cannot work: {net}")
        return DoctorCheck("ns.isolation", True,
                           f"Branch.run(isolate=True) works (private mount + PID namespaces){tail}")
    return DoctorCheck("ns.isolation", False,
                       f"Branch.run(isolate=True) raises IsolationUnavailable here: {problem}",
                       "see the ns.* lines above; or pass isolate=False (--no-isolate)")


def _fstype(path: str) -> tuple[str, str]:
    """(filesystem type, mount point) of ``path``, from /proc/self/mountinfo."""
    best = ("?", "/")
    real = os.path.realpath(path)
    for line in (_read("/proc/self/mountinfo") or "").splitlines():
        left, _, right = line.partition(" - ")
        lf, rf = left.split(), right.split()
        if len(lf) < 5 or not rf:
            continue
        mnt = lf[4].replace("\\040", " ")
        inside = real == mnt or real.startswith(mnt.rstrip("/") + "/")
        if inside and len(mnt) >= len(best[1]):
            best = (rf[0], mnt)
    return best


def _check_reflink(path: str) -> DoctorCheck:
    fs, mnt = _fstype(path)
    where = f"{fs} at {mnt}"
    fix = ("put the workspace on btrfs or XFS (mkfs.xfs -m reflink=1): the copy backend then "
           "forks by cloning; the FUSE backend does not need reflinks")
    fds: list[int] = []
    names: list[str] = []
    try:
        try:
            for _ in range(2):
                fd, name = tempfile.mkstemp(prefix=".branchagent-doctor-", dir=path)
                fds.append(fd)
                names.append(name)
            os.write(fds[0], b"\0" * 65536)
        except OSError as exc:
            return DoctorCheck("reflink", False, f"cannot test in {path}: {exc.strerror}",
                               "run doctor on a writable directory: -w DIR (path=DIR)")
        try:
            fcntl.ioctl(fds[1], _FICLONE, fds[0])
        except OSError as exc:
            code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
            return DoctorCheck("reflink", False, f"{where}: FICLONE fails ({code})", fix)
    finally:
        for fd in fds:
            os.close(fd)
        for name in names:
            try:
                os.unlink(name)
            except OSError:
                pass
    return DoctorCheck("reflink", True, f"{where}: FICLONE works")


def _check_overlay() -> DoctorCheck:
    fss = _read("/proc/filesystems") or ""
    if any(line.split()[-1:] == ["overlay"] for line in fss.splitlines()):
        return DoctorCheck("overlayfs", True, "overlay is in /proc/filesystems")
    return DoctorCheck("overlayfs", False, "overlay is not in /proc/filesystems",
                       "modprobe overlay")


def _platform_checks() -> list[DoctorCheck]:
    out = []
    release = platform.release()
    try:
        major, minor = (int(x) for x in release.split(".")[:2])
        recent = (major, minor) >= (5, 14)
    except ValueError:
        recent = True
    out.append(DoctorCheck(
        "kernel", True, f"Linux {release}" + ("" if recent else
                                              " (before 5.14: no cgroup.kill)")))
    py = sys.version_info
    ok = py >= (3, 11)
    out.append(DoctorCheck("python", ok, f"Python {platform.python_version()} ({sys.executable})",
                           None if ok else "use Python 3.11 or later"))
    uid = os.geteuid()
    out.append(DoctorCheck("root", True, "running as root" if uid == 0 else
                           f"running as uid {uid} (not root: FUSE needs /dev/fuse access and "
                           "a setuid fusermount3; namespaces need user namespaces)"))
    exe = shutil.which("systemd-run")
    booted = os.path.isdir("/run/systemd/system")
    if exe is not None and booted:
        out.append(DoctorCheck("systemd-run", True, f"{exe}; systemd is the init"))
    else:
        init = _read("/proc/1/comm") or "?"
        detail = (f"{exe} present, but systemd is not the init (PID 1 is {init}): "
                  "it cannot start units" if exe else "systemd-run not found on PATH")
        if uid == 0:  # root places its cgroups itself: a delegated scope is never used
            out.append(DoctorCheck("systemd-run", True, detail + "; not needed as root"))
        else:
            out.append(DoctorCheck(
                "systemd-run", False, detail,
                "only needed for a delegated cgroup as an ordinary user "
                "(systemd-run --user --scope -p Delegate=yes -- CMD) on a systemd host"))
    return out


# -- cgroups and limits --------------------------------------------------------------------------


def _cgroup_facts() -> tuple[dict[str, Any], dict[str, str | None], dict[str, str]]:
    """(the sandbox's own account of the cgroups, limit -> mechanism, limit -> hint)."""
    desc = dict(_cgroup.describe_host())
    raw_mech = desc.get("mechanisms")
    raw_hints = desc.get("hints")
    mech: dict[str, str | None] = {}
    for limit in LIMITS:
        value = raw_mech.get(limit) if isinstance(raw_mech, Mapping) else None
        mech[limit] = value if isinstance(value, str) else None
    hints = ({str(k): str(v) for k, v in raw_hints.items() if v}
             if isinstance(raw_hints, Mapping) else {})
    return desc, mech, hints


def _layout_check(desc: Mapping[str, Any], hints: Mapping[str, str]) -> DoctorCheck:
    kind = str(desc.get("kind") or "unknown")
    bits = [kind]
    placement = desc.get("placement")
    if isinstance(placement, Mapping) and placement.get("step") not in (None, "none"):
        where = placement.get("path")
        bits.append(f"placement {placement['step']}" + (f" ({where})" if where else ""))
    bits.append(f"v2 controllers [{' '.join(desc.get('v2_controllers') or ()) or 'none'}]")
    if desc.get("v1"):
        bits.append(f"v1 [{' '.join(desc['v1'])}]")
    detail = ", ".join(bits)
    if kind in ("v2", "hybrid", "v1"):
        return DoctorCheck("cgroups", True, detail)
    fix = next((hints[k] for k in ("pids", "cpu", "memory") if k in hints),
               "mount -t cgroup2 none /sys/fs/cgroup")
    what = ("no usable cgroup here" if kind == "none" else
            "cgroup v2 without the memory, pids and cpu controllers for our runs")
    return DoctorCheck("cgroups", False, f"{detail}: {what}", fix)


def _limit_checks(mech: Mapping[str, str | None], hints: Mapping[str, str]) -> list[DoctorCheck]:
    out = []
    for limit, how in mech.items():
        if how is None:
            text = _UNENFORCED_TEXT[limit]
            ok = limit in ("kill",)  # a weaker fallback still ends the run's tree
            fix = hints.get(limit) or (
                "make the FUSE backend work (the fuse.* lines): it enforces Limits.disk"
                if limit == "disk" else "no cgroup controller for it is reachable here")
            out.append(DoctorCheck(f"limit.{limit}", ok, text, fix))
        else:
            text = f"{how}: {_MECHANISM_TEXT.get((limit, how), how)}"
            # rlimit-as works, in a weaker way: the hint says how to get the cgroup limit.
            better = hints.get(limit) if how == "rlimit-as" else None
            out.append(DoctorCheck(f"limit.{limit}", True, text, better))
    return out


def _disk_mechanism(fuse_ok: bool) -> tuple[bool, str | None]:
    # Limits.disk is enforced by the FUSE filesystem; the copy backend has no hook for it.
    """(whether ``Limits`` has ``disk``, its mechanism on the default backend)."""
    if "disk" not in attrs.fields_dict(Limits):
        return False, None
    return True, "fuse" if fuse_ok else None


def _resolve(path: str | os.PathLike[str] | None) -> str:
    where = os.path.realpath(os.fspath(path) if path is not None else os.getcwd())
    if not os.path.isdir(where):
        raise NotADirectoryError(f"{where} is not a directory")
    return where


# -- the report --------------------------------------------------------------------------------


async def doctor(path: str | os.PathLike[str] | None = None) -> DoctorReport:
    """Look at this host: FUSE, namespaces, cgroups and the limit mechanisms a run will
    use, overlayfs, reflinks on ``path``'s filesystem (default: the current directory),
    kernel, Python, root, systemd-run. Spawns a few short processes (``unshare``, one
    interpreter importing pyfuse3), each in a worker thread; takes a fraction of a second.
    """
    where = await anyio.to_thread.run_sync(_resolve, path)
    probes: dict[str, Callable[[], Any]] = {
        "fuse.device": _check_device,
        "fuse.fusermount3": _check_fusermount,
        "fuse.pyfuse3": _check_pyfuse3,
        "ns.mount": lambda: _ns_check("ns.mount", "mount namespace",
                                      ("--mount", "--propagation", "private")),
        "ns.pid": lambda: _ns_check("ns.pid", "PID namespace", ("--pid", "--fork")),
        "ns.user": _check_userns,
        "ns.net": lambda: _ns_check("ns.net", "network namespace", ("--net",)),
        "ns.isolation": _check_isolation,
        "cgroups": _cgroup_facts,
        "overlayfs": _check_overlay,
        "reflink": lambda: _check_reflink(where),
        "platform": _platform_checks,
    }
    results: dict[str, Any] = {}

    async def one(key: str) -> None:
        results[key] = await anyio.to_thread.run_sync(probes[key])

    async with anyio.create_task_group() as tg:
        for key in probes:
            tg.start_soon(one, key)
    pyfuse3: DoctorCheck = results["fuse.pyfuse3"]
    backend = await anyio.to_thread.run_sync(_check_backend, pyfuse3)
    desc, mech, hints = results["cgroups"]
    has_disk, disk = _disk_mechanism(backend.ok)
    mechanisms: dict[str, str | None] = {k: mech.get(k) for k in LIMITS}
    if has_disk:
        mechanisms["disk"] = disk
    checks = [
        results["fuse.device"], results["fuse.fusermount3"], pyfuse3, backend,
        results["ns.mount"], results["ns.pid"], results["ns.user"], results["ns.net"],
        results["ns.isolation"], _layout_check(desc, hints), *_limit_checks(mechanisms, hints),
        results["overlayfs"], results["reflink"], *results["platform"],
    ]
    return DoctorReport(where, tuple(checks), mechanisms, desc)


# -- the log line open_workspace writes ----------------------------------------------------------

_logged = False


def _cgroup_layout() -> str:
    """``v2``, ``hybrid``, ``v1`` or ``none`` from the mounts alone (no cgroup touched)."""
    types = set()
    for line in (_read("/proc/self/mountinfo") or "").splitlines():
        types.update(line.partition(" - ")[2].split()[:1])
    v2, v1 = "cgroup2" in types, "cgroup" in types
    return ("hybrid" if v1 else "v2") if v2 else ("v1" if v1 else "none")


def _cheap_summary() -> dict[str, Any]:
    """A few stats and reads; no process spawned and no cgroup made (the sandbox detects
    its cgroups at the first run and logs ``cgroups_detected`` then)."""
    from ._backends.fuse._backend import check_available
    from .exceptions import BackendUnavailable

    try:
        check_available()
        fuse: bool | str = True
    except BackendUnavailable as exc:
        fuse = str(exc)
    return {
        "fuse": fuse,
        "cgroup_layout": _cgroup_layout(),
        "overlayfs": _check_overlay().ok,
        "root": os.geteuid() == 0,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


async def log_host_capabilities() -> None:
    """Log ``host_capabilities`` (debug) once per process; later calls return at once."""
    global _logged
    if _logged:
        return
    _logged = True
    summary = await anyio.to_thread.run_sync(_cheap_summary)
    log.debug("host_capabilities", **summary)
