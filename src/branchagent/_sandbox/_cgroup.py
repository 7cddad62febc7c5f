"""Per-run cgroups: limits, kill and freeze, on whatever this host offers.

Hosts differ, so :func:`detect` looks once and picks the best mechanism per
facility:

- a *pure cgroup v2* hierarchy whose controllers we can enable below our own
  cgroup: memory.max (+ memory.swap.max 0, memory.oom.group 1), pids.max,
  cpu.max, cgroup.kill, cgroup.freeze;
- a *hybrid* host (v2 mounted with few or no controllers, v1 controllers
  beside it): kill and freeze from v2 where present, limits from v1
  (memory.limit_in_bytes + memsw, pids.max, cpu.cfs_quota_us, freezer);
- nothing usable: no cgroup at all; the caller falls back to rlimits and
  process-group kill and says so.

A run's process joins its cgroups *before* it execs the candidate, through a
tiny ``sh`` wrapper that writes its own pid into each ``cgroup.procs``, so
nothing the candidate forks or setsid's can escape. Every limit applied is
named in :attr:`RunCgroup.enforced`; nothing is claimed that is not applied.
"""

from __future__ import annotations

import atexit
import errno
import os
import signal
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

import attrs
import structlog

from .._limits import Limits

__all__ = ["CgroupHost", "RunCgroup", "detect"]

log = structlog.get_logger("branchagent.sandbox")

_JOIN = 'while [ "$1" != "--" ]; do echo $$ > "$1" || exit 126; shift; done; shift; exec "$@"'
_CPU_PERIOD_US = 100_000


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _kv(path: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in _read(path).splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
    return out


@attrs.frozen
class CgroupHost:
    """What this host offers. ``v2`` is our own v2 cgroup dir (or None);
    ``v2_controllers`` those enabled for children there; ``v1`` maps a v1
    controller name to our cgroup dir in its hierarchy."""

    v2: Path | None
    v2_controllers: frozenset[str]
    v2_kill: bool
    v1: dict[str, Path]

    @property
    def kind(self) -> str:
        if self.v2 is not None and {"memory", "pids", "cpu"} <= self.v2_controllers:
            return "v2"
        if self.v2 is not None or self.v1:
            return "hybrid" if self.v1 else "v2-partial"
        return "none"

    def describe(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "v2": str(self.v2) if self.v2 else None,
            "v2_controllers": sorted(self.v2_controllers),
            "v2_kill": self.v2_kill,
            "v1": sorted(self.v1),
        }

    def create(self, limits: Limits) -> RunCgroup | None:
        """A fresh cgroup (set) for one run with ``limits`` applied, or None."""
        if self.kind == "none":
            return None
        tag = f"run-{uuid.uuid4().hex[:12]}"
        rc = RunCgroup(tag)
        try:
            rc._setup(self, limits)
        except OSError as exc:
            log.warning("cgroup_setup_failed", error=str(exc))
            rc.remove()
            return None
        return rc


def _mounts() -> list[tuple[str, str, str, set[str]]]:
    """(mount point, root, fstype, super options) of every cgroup mount."""
    out = []
    for line in _read(Path("/proc/self/mountinfo")).splitlines():
        left, _, right = line.partition(" - ")
        lf, rf = left.split(), right.split()
        if len(rf) < 3 or rf[0] not in ("cgroup", "cgroup2"):
            continue
        out.append((lf[4], lf[3], rf[0], set(rf[2].split(","))))
    return out


def _own_paths() -> dict[str, str]:
    """controller (or "" for v2) -> our cgroup path, from /proc/self/cgroup."""
    out: dict[str, str] = {}
    for line in _read(Path("/proc/self/cgroup")).splitlines():
        _hid, ctrls, path = line.split(":", 2)
        if ctrls == "":
            out[""] = path
        for c in ctrls.split(","):
            if c:
                out[c] = path
    return out


def _join(mount: str, root: str, path: str) -> Path:
    if root != "/" and path.startswith(root):
        path = path[len(root):]
    return Path(mount + ("/" + path.lstrip("/") if path.strip("/") else ""))


_PARENT_NAME = f"branchagent-{os.getpid()}"


def detect() -> CgroupHost:
    """Look at this host's cgroups once (cheap: a few reads, a mkdir or two)."""
    own = _own_paths()
    v2: Path | None = None
    v2_ctrls: frozenset[str] = frozenset()
    v2_kill = False
    v1: dict[str, Path] = {}
    for mount, root, fstype, opts in _mounts():
        if fstype == "cgroup2" and v2 is None and "" in own:
            base = _join(mount, root, own[""])
            parent = base / _PARENT_NAME
            try:
                parent.mkdir(exist_ok=True)
            except OSError:
                continue
            wanted = {"memory", "pids", "cpu"} & set(_read(base / "cgroup.controllers").split())
            enabled = set(_read(base / "cgroup.subtree_control").split())
            for c in sorted(wanted - enabled):
                try:
                    _write(base / "cgroup.subtree_control", f"+{c}")
                    enabled.add(c)
                except OSError:
                    pass  # EBUSY: our cgroup has processes and is not the root
            inner = enabled & wanted
            for c in sorted(inner):
                try:
                    _write(parent / "cgroup.subtree_control", f"+{c}")
                except OSError:
                    inner.discard(c)
            v2, v2_ctrls = parent, frozenset(inner)
            v2_kill = (parent / "cgroup.kill").exists()
        elif fstype == "cgroup":
            for c in ("memory", "pids", "cpu", "freezer"):
                if c in opts and c in own and c not in v1:
                    d = _join(mount, root, own[c]) / _PARENT_NAME
                    try:
                        d.mkdir(exist_ok=True)
                    except OSError:
                        continue
                    v1[c] = d
    # A controller available on v2 is preferred to the same one on v1.
    for c in v2_ctrls:
        v1.pop(c, None)
    host = CgroupHost(v2, v2_ctrls, v2_kill, v1)
    log.debug("cgroups_detected", **host.describe())
    return host


_host: CgroupHost | None = None


def host() -> CgroupHost:
    global _host
    if _host is None:
        _host = detect()
        # Our per-process parent cgroups would otherwise pile up, one set per agent process.
        parents = [d for d in (_host.v2, *_host.v1.values()) if d is not None]
        atexit.register(cleanup_parents, parents)
    return _host


class RunCgroup:
    """The cgroups of one run (one in v2 and/or one per v1 controller)."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.dirs: list[Path] = []
        self.v2: Path | None = None
        self.v1: dict[str, Path] = {}
        self.enforced: set[str] = set()
        self.v2_kill = False

    def _setup(self, h: CgroupHost, limits: Limits) -> None:
        if h.v2 is not None:
            d = h.v2 / self.tag
            d.mkdir()
            self.v2, self.v2_kill = d, h.v2_kill
            self.dirs.append(d)
            if h.v2_kill:
                self.enforced.add("kill:cgroup2")
            if (d / "cgroup.freeze").exists():
                self.enforced.add("freeze:cgroup2")
            if limits.memory is not None and "memory" in h.v2_controllers:
                _write(d / "memory.max", str(limits.memory))
                if (d / "memory.swap.max").exists():
                    _write(d / "memory.swap.max", "0")
                _write(d / "memory.oom.group", "1")
                self.enforced.add("memory:cgroup2")
            if limits.pids is not None and "pids" in h.v2_controllers:
                _write(d / "pids.max", str(limits.pids))
                self.enforced.add("pids:cgroup2")
            if limits.cpu is not None and "cpu" in h.v2_controllers:
                quota = max(1000, int(limits.cpu * _CPU_PERIOD_US))
                _write(d / "cpu.max", f"{quota} {_CPU_PERIOD_US}")
                self.enforced.add("cpu:cgroup2")
        for c, parent in h.v1.items():
            need = {
                "memory": limits.memory is not None,
                "pids": limits.pids is not None,
                "cpu": limits.cpu is not None,
                "freezer": True,
            }[c]
            if not need:
                continue
            d = parent / self.tag
            d.mkdir()
            self.v1[c] = d
            self.dirs.append(d)
            if c == "memory" and limits.memory is not None:
                _write(d / "memory.limit_in_bytes", str(limits.memory))
                if (d / "memory.memsw.limit_in_bytes").exists():
                    _write(d / "memory.memsw.limit_in_bytes", str(limits.memory))
                self.enforced.add("memory:cgroup1")
            elif c == "pids" and limits.pids is not None:
                _write(d / "pids.max", str(limits.pids))
                self.enforced.add("pids:cgroup1")
            elif c == "cpu" and limits.cpu is not None:
                _write(d / "cpu.cfs_period_us", str(_CPU_PERIOD_US))
                _write(d / "cpu.cfs_quota_us", str(max(1000, int(limits.cpu * _CPU_PERIOD_US))))
                self.enforced.add("cpu:cgroup1")
            elif c == "freezer" and self.v2 is None:
                self.enforced.add("freeze:cgroup1")

    # -- joining --------------------------------------------------------------

    def procs_files(self) -> list[str]:
        out = []
        if self.v2 is not None:
            out.append(os.fspath(self.v2 / "cgroup.procs"))
        out.extend(os.fspath(d / "cgroup.procs") for d in self.v1.values())
        return out

    def wrap(self, argv: list[str]) -> list[str]:
        """``argv`` prefixed so the process joins these cgroups before exec."""
        return ["sh", "-c", _JOIN, "sh", *self.procs_files(), "--", *argv]

    # -- state ------------------------------------------------------------------

    def pids(self) -> set[int]:
        out: set[int] = set()
        for d in self.dirs:
            for tok in _read(d / "cgroup.procs").split():
                out.add(int(tok))
        return out

    def populated(self) -> bool:
        if self.v2 is not None:
            return _kv(self.v2 / "cgroup.events").get("populated", 0) == 1
        return bool(self.pids())

    def oom_killed(self) -> bool:
        if self.v2 is not None and "memory:cgroup2" in self.enforced:
            return _kv(self.v2 / "memory.events").get("oom_kill", 0) > 0
        mem = self.v1.get("memory")
        if mem is not None:
            return _kv(mem / "memory.oom_control").get("oom_kill", 0) > 0
        return False

    def pids_limit_hit(self) -> bool:
        if self.v2 is not None and "pids:cgroup2" in self.enforced:
            return _kv(self.v2 / "pids.events").get("max", 0) > 0
        p = self.v1.get("pids")
        if p is not None:
            return _kv(p / "pids.events").get("max", 0) > 0
        return False

    def freeze(self, frozen: bool) -> bool:
        """Freeze or thaw every process; False when no freezer is available."""
        if self.v2 is not None and (self.v2 / "cgroup.freeze").exists():
            _write(self.v2 / "cgroup.freeze", "1" if frozen else "0")
            return True
        fz = self.v1.get("freezer")
        if fz is not None:
            _write(fz / "freezer.state", "FROZEN" if frozen else "THAWED")
            return True
        return False

    def kill(self, *, wait: float = 5.0) -> None:
        """SIGKILL every process in the cgroups, whatever it forked; wait until empty."""
        deadline = time.monotonic() + wait
        if self.v2 is not None and self.v2_kill:
            try:
                _write(self.v2 / "cgroup.kill", "1")
            except OSError:
                pass
        froze = False
        try:
            froze = self.freeze(True)
        except OSError:
            pass
        while True:
            victims = self.pids()
            if not victims:
                break
            for pid in victims:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if froze:
                try:
                    self.freeze(False)  # a frozen task dies only once thawed
                    froze = False
                except OSError:
                    pass
            if time.monotonic() > deadline:
                log.warning("cgroup_kill_incomplete", tag=self.tag, left=sorted(victims))
                break
            time.sleep(0.005)
        if froze:
            try:
                self.freeze(False)
            except OSError:
                pass

    def remove(self) -> None:
        """Remove the cgroup dirs (after :meth:`kill`). Idempotent."""
        for d in list(self.dirs):
            for _ in range(100):
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY:
                        log.warning("cgroup_remove_failed", path=str(d), error=str(exc))
                        break
                    time.sleep(0.01)
            self.dirs.remove(d)


def cleanup_parents(dirs: Iterable[Path]) -> None:
    for d in dirs:
        try:
            os.rmdir(d)
        except OSError:
            pass
