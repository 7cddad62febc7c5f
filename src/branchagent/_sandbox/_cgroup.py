"""Per-run cgroups: limits, kill and freeze, on whatever this host offers.

Hosts differ, so :func:`detect` looks once, finds where run cgroups can go
without any configuration, and picks the best mechanism per facility.

On cgroup v2 the place for our ``branchagent-<pid>`` parent cgroup is chosen
among these, by the number of the controllers memory/pids/cpu it gives, the
closest to our own cgroup winning a tie (:func:`_plan_v2`):

``own``
    our own cgroup, when the controllers can be enabled in its
    ``cgroup.subtree_control`` as it is (the hierarchy's root, or a delegated
    cgroup without processes of its own);
``leaf``
    our own cgroup holds processes (the kernel's "no internal processes"
    rule makes enabling controllers fail with EBUSY) but lists the wanted
    controllers: the processes we may move (as root, all of them: the
    container-init pattern) go to a leaf child ``branchagent-leaf`` and the
    controllers are enabled in our cgroup. The agent lives in that leaf from
    then on, so the leaf stays;
``ancestor``
    our cgroup lacks controllers its parent does not delegate: the nearest
    ancestor whose children get them (its ``cgroup.subtree_control``; at the
    hierarchy's root, anything the root offers), where we may create a child
    and write ``cgroup.procs`` (moving a process across subtrees needs write
    access to the common ancestor's ``cgroup.procs``: root has it);
``systemd-scope``
    not root and nothing better: a delegated transient scope from the user's
    systemd (D-Bus ``StartTransientUnit`` with ``Delegate=yes`` and our own
    pid, through ``busctl``), then the same steps inside it.

What cgroup v2 cannot give comes from cgroup v1 where it is mounted (hybrid
hosts: memory.limit_in_bytes + memsw, pids.max, cpu.cfs_quota_us, freezer);
what neither gives is left to the caller (rlimits, process-group kill), which
reports it as not enforced.

A run's process joins its cgroups *before* it execs the candidate, through a
tiny ``sh`` wrapper that writes its own pid into each ``cgroup.procs``, so
nothing the candidate forks or setsid's can escape. Every limit applied is
named in :attr:`RunCgroup.enforced`; nothing is claimed that is not applied.

Nothing is left behind: our parent cgroups are removed at exit, and the ones of
agents that died without cleaning up (kill -9) are swept at the next
:func:`detect`. All file system access goes through a :class:`CgroupFs`, so the
placement logic runs against fake trees in the tests.
"""

from __future__ import annotations

import atexit
import errno
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import attrs

from .._limits import Limits
from .._log import get_logger

__all__ = ["CgroupFs", "CgroupHost", "RunCgroup", "describe_host", "detect", "host"]

log = get_logger("branchagent.sandbox")

_JOIN = 'while [ "$1" != "--" ]; do echo $$ > "$1" || exit 126; shift; done; shift; exec "$@"'
_CPU_PERIOD_US = 100_000
WANTED = ("memory", "pids", "cpu")
LEAF_NAME = "branchagent-leaf"
_PARENT_RE = re.compile(r"^branchagent-(\d+)$")
_RUN_PREFIX = "run-"


def parent_name(pid: int) -> str:
    return f"branchagent-{pid}"


class CgroupFs:
    """The seams the cgroup code goes through: the real kernel by default.

    Tests subclass it with a fake tree (a temporary directory shaped like
    /sys/fs/cgroup, with fake /proc/self/cgroup and mountinfo texts) that
    reproduces the kernel rules that matter.
    """

    def proc_self_cgroup(self) -> str:
        return self.read(Path("/proc/self/cgroup"))

    def mountinfo(self) -> str:
        return self.read(Path("/proc/self/mountinfo"))

    def pid(self) -> int:
        return os.getpid()

    def euid(self) -> int:
        return os.geteuid()

    def read(self, path: Path) -> str:
        try:
            return path.read_text()
        except OSError:
            return ""

    def write(self, path: Path, value: str) -> None:
        with open(path, "w") as f:
            f.write(value)

    def mkdir(self, path: Path) -> None:
        """Create ``path``; FileExistsError when it is there."""
        os.mkdir(path)

    def rmdir(self, path: Path) -> None:
        os.rmdir(path)

    def listdir(self, path: Path) -> list[str]:
        try:
            return os.listdir(path)
        except OSError:
            return []

    def exists(self, path: Path) -> bool:
        return path.exists()

    def is_dir(self, path: Path) -> bool:
        return path.is_dir()

    def may_write(self, path: Path) -> bool:
        return os.access(path, os.W_OK)

    def may_move(self, pid: int) -> bool:
        """Whether we may move process ``pid`` (same uid, or we are root)."""
        if self.euid() == 0:
            return True
        try:
            return os.stat(f"/proc/{pid}").st_uid == self.euid()
        except OSError:
            return False

    def alive(self, pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def which(self, name: str) -> str | None:
        return shutil.which(name)

    def run(self, argv: Sequence[str], timeout: float) -> tuple[int, str]:
        """Run a helper command; (exit status, stderr+stdout)."""
        try:
            res = subprocess.run(list(argv), capture_output=True, text=True, check=False,
                                 timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return -1, str(exc)
        return res.returncode, (res.stderr + res.stdout).strip()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def try_join(self, procs: Path) -> bool:
        """Whether a child of ours can be moved into ``procs`` (a throwaway ``sleep``)."""
        try:
            child = subprocess.Popen(["sleep", "30"], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except OSError as exc:
            log.debug("cgroup_join_probe_unavailable", error=str(exc))
            return True  # cannot tell; the run's own join reports a failure
        try:
            self.write(procs, str(child.pid))
        except OSError as exc:
            log.info("cgroup_join_refused", path=str(procs), error=str(exc))
            return False
        finally:
            child.kill()
            child.wait()
        return True


def _words(fs: CgroupFs, path: Path) -> set[str]:
    return set(fs.read(path).split())


def _kv(fs: CgroupFs, path: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in fs.read(path).splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
    return out


def _procs(fs: CgroupFs, d: Path) -> list[int]:
    return [int(t) for t in fs.read(d / "cgroup.procs").split() if t.isdigit()]


# -- what the host offers ----------------------------------------------------------


@attrs.frozen
class CgroupHost:
    """What this host offers and where run cgroups go.

    ``v2`` is our ``branchagent-<pid>`` parent on cgroup v2 (or None);
    ``v2_controllers`` those enabled for its children; ``v1`` maps a v1
    controller name to our parent dir in its hierarchy. ``placement`` names
    the step that chose ``v2`` (see the module docstring).
    """

    v2: Path | None
    v2_controllers: frozenset[str]
    v2_kill: bool
    v1: dict[str, Path]
    placement: str = attrs.field(default="none", kw_only=True)
    mounts: Mapping[str, object] = attrs.field(factory=dict, kw_only=True, eq=False)
    hints: Mapping[str, str] = attrs.field(factory=dict, kw_only=True, eq=False)
    leaf: Path | None = attrs.field(default=None, kw_only=True)
    fs: CgroupFs = attrs.field(factory=CgroupFs, kw_only=True, eq=False, repr=False)

    @property
    def kind(self) -> str:
        """``v2``, ``v2-partial``, ``hybrid``, ``v1`` or ``none`` (nothing usable)."""
        if self.v2 is not None:
            if set(WANTED) <= self.v2_controllers:
                return "v2"
            return "hybrid" if self.v1 else "v2-partial"
        return "v1" if self.v1 else "none"

    def mechanisms(self) -> dict[str, str | None]:
        """Facility -> mechanism a run gets here (``cgroup2``, ``cgroup1``, ``rlimit-as``)."""
        out: dict[str, str | None] = {}
        for c in WANTED:
            out[c] = "cgroup2" if c in self.v2_controllers else "cgroup1" if c in self.v1 else None
        if out["memory"] is None:
            out["memory"] = "rlimit-as"
        out["kill"] = "cgroup2" if self.v2 is not None and self.v2_kill else None
        if self.v2 is not None and self.fs.exists(self.v2 / "cgroup.freeze"):
            out["freeze"] = "cgroup2"
        else:
            out["freeze"] = "cgroup1" if "freezer" in self.v1 else None
        return out

    def describe(self) -> dict[str, object]:
        """JSON-serializable account of the layout, the placement and the mechanisms."""
        mech = self.mechanisms()
        missing = [k for k, v in mech.items() if v is None or v == "rlimit-as"]
        return {
            "kind": self.kind,
            "mounts": dict(self.mounts),
            "placement": {
                "step": self.placement,
                "path": str(self.v2) if self.v2 is not None else None,
                "leaf": str(self.leaf) if self.leaf is not None else None,
                "v1": {c: str(p) for c, p in sorted(self.v1.items())},
            },
            "v2": str(self.v2) if self.v2 else None,
            "v2_controllers": sorted(self.v2_controllers),
            "v2_kill": self.v2_kill,
            "v1": sorted(self.v1),
            "mechanisms": mech,
            "hints": {k: self.hints.get(k, _GENERIC_HINTS[k]) for k in missing},
        }

    def create(self, limits: Limits) -> RunCgroup | None:
        """A fresh cgroup (set) for one run with ``limits`` applied, or None."""
        if self.kind == "none":
            return None
        tag = f"{_RUN_PREFIX}{uuid.uuid4().hex[:12]}"
        rc = RunCgroup(tag, fs=self.fs)
        try:
            rc._setup(self, limits)
        except OSError as exc:
            log.warning("cgroup_setup_failed", error=str(exc))
            rc.remove()
            return None
        return rc

    def parents(self) -> list[Path]:
        return [d for d in (self.v2, *self.v1.values()) if d is not None]

    def cleanup(self) -> None:
        """Remove our parent cgroups (at exit; their run cgroups are gone by then)."""
        for d in self.parents():
            _remove_tree(self.fs, d)


_GENERIC_HINTS = {
    "memory": "no cgroup memory controller: only an address-space rlimit (RLIMIT_AS) applies",
    "pids": "no cgroup pids controller reachable",
    "cpu": "no cgroup cpu controller reachable",
    "kill": "cgroup.kill needs a cgroup v2 hierarchy on Linux 5.14+; the process group "
            "and PID namespace are used instead",
    "freeze": "no cgroup freezer: pause uses SIGSTOP on the process group",
}


# -- reading /proc ------------------------------------------------------------------


@attrs.frozen
class _Mount:
    point: Path
    root: str
    fstype: str
    opts: frozenset[str]


def _mounts(fs: CgroupFs) -> list[_Mount]:
    """Every cgroup and cgroup2 mount, from mountinfo."""
    out = []
    for line in fs.mountinfo().splitlines():
        left, _, right = line.partition(" - ")
        lf, rf = left.split(), right.split()
        if len(lf) < 5 or len(rf) < 3 or rf[0] not in ("cgroup", "cgroup2"):
            continue
        out.append(_Mount(Path(lf[4]), lf[3], rf[0], frozenset(rf[2].split(","))))
    return out


def _own_paths(fs: CgroupFs) -> dict[str, str]:
    """controller (or "" for v2) -> our cgroup path, from /proc/self/cgroup."""
    out: dict[str, str] = {}
    for line in fs.proc_self_cgroup().splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _hid, ctrls, path = parts
        if ctrls == "":
            out[""] = path
        for c in ctrls.split(","):
            if c:
                out[c] = path
    return out


def _join(mount: _Mount, path: str) -> Path | None:
    """Where cgroup ``path`` (as /proc/self/cgroup says) is under ``mount``; None if outside."""
    root = mount.root.rstrip("/")
    if root:
        if path != root and not path.startswith(root + "/"):
            return None
        path = path[len(root):]
    rel = path.strip("/")
    return mount.point / rel if rel else mount.point


# -- sweeping what dead agents left ---------------------------------------------------


def _remove_tree(fs: CgroupFs, d: Path) -> bool:
    """rmdir ``d`` and its (empty) child cgroups, deepest first. True if gone."""
    for name in fs.listdir(d):
        if fs.is_dir(d / name):
            _remove_tree(fs, d / name)
    try:
        fs.rmdir(d)
    except FileNotFoundError:
        return True
    except OSError as exc:
        log.debug("cgroup_rmdir_failed", path=str(d), error=str(exc))
        return False
    return True


def sweep(fs: CgroupFs, d: Path) -> list[Path]:
    """Remove the ``branchagent-<pid>`` cgroups under ``d`` whose agent is dead."""
    removed = []
    me = fs.pid()
    for name in fs.listdir(d):
        m = _PARENT_RE.match(name)
        if m is None or int(m.group(1)) == me or fs.alive(int(m.group(1))):
            continue
        if fs.is_dir(d / name) and _remove_tree(fs, d / name):
            removed.append(d / name)
    if removed:
        log.info("cgroup_stale_removed", paths=[str(p) for p in removed])
    return removed


# -- cgroup v2 placement ----------------------------------------------------------------


@attrs.frozen
class _V2Choice:
    parent: Path
    controllers: frozenset[str]
    kill: bool
    step: str
    leaf: Path | None = None


@attrs.frozen
class _Candidate:
    where: Path
    distance: int  # 0: our own cgroup, 1: its parent, ...
    gain: frozenset[str]
    is_root: bool
    own: Path


def _enable(fs: CgroupFs, d: Path, ctrls: Iterable[str]) -> tuple[set[str], dict[str, int]]:
    """Enable each of ``ctrls`` for ``d``'s children; (enabled now, errno per failure)."""
    have = _words(fs, d / "cgroup.subtree_control")
    failed: dict[str, int] = {}
    for c in sorted(set(ctrls) - have):
        try:
            fs.write(d / "cgroup.subtree_control", f"+{c}")
            have.add(c)
        except OSError as exc:
            failed[c] = exc.errno or 0
    return have, failed


def _candidates(fs: CgroupFs, mount: _Mount, own: Path) -> list[_Candidate]:
    """Where a parent for run cgroups could go, best first; stale parents swept on the way."""
    chain = [own, *[p for p in own.parents if p == mount.point or mount.point in p.parents]]
    out = []
    for i, d in enumerate(chain):
        sweep(fs, d)
        is_root = d == mount.point and mount.root == "/"
        if not (fs.may_write(d) and fs.may_write(d / "cgroup.procs")):
            continue
        offered = _words(fs, d / "cgroup.controllers") & set(WANTED)
        enabled = _words(fs, d / "cgroup.subtree_control") & set(WANTED)
        # Our own cgroup we may reshape (leaf step); an ancestor we do not: only what
        # its children already get, except at the root, which may always enable more.
        gain = offered if (i == 0 or is_root) else enabled
        if i == 0 and not fs.may_write(d / "cgroup.subtree_control"):
            gain = enabled
        out.append(_Candidate(d, i, frozenset(gain), is_root, own))
    out.sort(key=lambda c: (-len(c.gain), c.distance))
    return out


def _move_to_leaf(fs: CgroupFs, own: Path) -> tuple[Path, list[int]] | None:
    """Move every process of ``own`` we may move into its leaf child; None if some stay."""
    leaf = own / LEAF_NAME
    try:
        fs.mkdir(leaf)
    except FileExistsError:
        pass
    except OSError as exc:
        log.info("cgroup_leaf_unavailable", path=str(leaf), error=str(exc))
        return None
    moved: list[int] = []
    for _ in range(3):  # processes may fork while we move them
        left = [p for p in _procs(fs, own) if fs.may_move(p)]
        for pid in left:
            try:
                fs.write(leaf / "cgroup.procs", str(pid))
                moved.append(pid)
            except OSError as exc:
                if exc.errno != errno.ESRCH:
                    log.debug("cgroup_move_failed", pid=pid, error=str(exc))
        if not _procs(fs, own):
            return leaf, moved
    stay = _procs(fs, own)
    log.info("cgroup_leaf_incomplete", path=str(own), staying=stay[:20])
    for pid in moved:  # put things back as they were
        try:
            fs.write(own / "cgroup.procs", str(pid))
        except OSError:
            pass
    if not _procs(fs, leaf):
        try:
            fs.rmdir(leaf)
        except OSError:
            pass
    return None


def _apply(fs: CgroupFs, cand: _Candidate, name: str) -> _V2Choice | None:
    """Make ``cand`` real: enable its controllers, create our parent under it."""
    d = cand.where
    step = "own" if cand.distance == 0 else "ancestor"
    leaf: Path | None = None
    have, failed = _enable(fs, d, cand.gain)
    if cand.distance == 0 and errno.EBUSY in failed.values() and not cand.is_root:
        moved = _move_to_leaf(fs, d)
        if moved is not None:
            leaf = moved[0]
            step = "leaf"
            have, failed = _enable(fs, d, cand.gain)
    if failed:
        log.info("cgroup_controllers_unavailable", path=str(d),
                 errors={c: errno.errorcode.get(e, str(e)) for c, e in failed.items()})
    parent = d / name
    try:
        fs.mkdir(parent)
    except FileExistsError:
        pass
    except OSError as exc:
        log.info("cgroup_parent_unavailable", path=str(parent), error=str(exc))
        return None
    inner, _ = _enable(fs, parent, have & cand.gain)
    if cand.distance > 0:
        _keep_envelope(fs, cand.own, d, parent, inner)
    if not _joinable(fs, parent):
        _remove_tree(fs, parent)
        return None
    return _V2Choice(parent, frozenset(inner & set(WANTED)),
                     fs.exists(parent / "cgroup.kill"), step, leaf)


_CAP_FILES = {"memory": "memory.max", "pids": "pids.max", "cpu": "cpu.max"}


def _cap(ctrl: str, text: str) -> float | None:
    """A cap file's value as one number (cpu: CPUs), None for ``max`` or unreadable."""
    words = text.split()
    try:
        if ctrl == "cpu":
            return None if not words or words[0] == "max" else int(words[0]) / int(words[1])
        return None if not words or words[0] == "max" else float(int(words[0]))
    except (ValueError, IndexError):
        return None


def _keep_envelope(fs: CgroupFs, own: Path, above: Path, parent: Path, ctrls: set[str]) -> None:
    """Runs placed at an ancestor leave the cgroups between it and our own (a
    container's memory.max, say): carry their tightest caps over to ``parent``,
    so a run never gets more than the agent itself was given."""
    between = [own, *[p for p in own.parents if above in p.parents]]
    for ctrl in sorted(ctrls):
        name = _CAP_FILES[ctrl]
        found = [(v, fs.read(d / name).strip()) for d in between
                 if (v := _cap(ctrl, fs.read(d / name))) is not None]
        if not found:
            continue
        _v, text = min(found)
        try:
            fs.write(parent / name, text)
            log.info("cgroup_envelope_kept", path=str(parent / name), value=text)
        except OSError as exc:
            log.warning("cgroup_envelope_lost", path=str(parent / name), error=str(exc))


def _joinable(fs: CgroupFs, parent: Path) -> bool:
    """Whether our processes can really join a cgroup under ``parent`` (cgroup
    namespaces, permissions on the common ancestor): tried once, with a probe."""
    d = parent / f"probe-{uuid.uuid4().hex[:8]}"
    try:
        fs.mkdir(d)
    except OSError:
        return False
    try:
        return fs.try_join(d / "cgroup.procs")
    finally:
        for _ in range(100):  # the probe's exit empties the cgroup a moment later
            try:
                fs.rmdir(d)
                break
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    break
                fs.sleep(0.005)


def _plan_v2(fs: CgroupFs, mount: _Mount, own_path: str) -> _V2Choice | None:
    own = _join(mount, own_path)
    if own is None or not fs.is_dir(own):
        return None
    if own.name == LEAF_NAME and own != mount.point:
        own = own.parent  # a previous detect in this process (or our parent) made it
    cands = _candidates(fs, mount, own)
    name = parent_name(fs.pid())
    best: _V2Choice | None = None
    for i, cand in enumerate(cands):
        got = _apply(fs, cand, name)
        if got is None:
            continue
        if best is None or len(got.controllers) > len(best.controllers):
            if best is not None:
                _remove_tree(fs, best.parent)
            best = got
        elif got.parent != best.parent:
            _remove_tree(fs, got.parent)
        nxt = len(cands[i + 1].gain) if i + 1 < len(cands) else -1
        if len(best.controllers) >= nxt:
            break
    return best


# -- systemd: a delegated scope for an ordinary user -----------------------------------


def _systemd_scope(fs: CgroupFs) -> str | None:
    """Ask the user's systemd for a delegated scope holding this process.

    Returns our new cgroup path, or None (the reason is logged). The scope is
    made over D-Bus (``StartTransientUnit``, ``Delegate=yes``, ``PIDs=[ours]``)
    because the kernel lets nobody but root move a process out of a login
    session's scope into the user manager's subtree: a scope that held only a
    ``systemd-run`` child would be out of reach of our runs. The scope goes
    away by itself when its last process (this one) exits.
    """
    busctl = fs.which("busctl")
    if fs.which("systemd-run") is None or busctl is None:
        log.info("cgroup_systemd_scope_skipped", reason="systemd-run/busctl not found")
        return None
    unit = f"{parent_name(fs.pid())}.scope"
    argv = [busctl, "--user", "call", "org.freedesktop.systemd1", "/org/freedesktop/systemd1",
            "org.freedesktop.systemd1.Manager", "StartTransientUnit", "ssa(sv)a(sa(sv))",
            unit, "fail", "2", "PIDs", "au", "1", str(fs.pid()), "Delegate", "b", "true", "0"]
    rc, out = fs.run(argv, 10.0)
    if rc != 0:
        log.info("cgroup_systemd_scope_skipped", reason=f"busctl exited {rc}: {out[-500:]}")
        return None
    for _ in range(200):
        path = _own_paths(fs).get("")
        if path is not None and path.rstrip("/").endswith("/" + unit):
            log.info("cgroup_systemd_scope", unit=unit, path=path)
            return path
        fs.sleep(0.01)
    log.info("cgroup_systemd_scope_skipped", reason="this process did not appear in the scope")
    return None


# -- detection ----------------------------------------------------------------------


def _hints(fs: CgroupFs, v2m: _Mount | None, own_v2: str | None, got: set[str],
           v1: Mapping[str, Path], systemd: bool) -> dict[str, str]:
    """One line per missing facility: what would give it."""
    out: dict[str, str] = {}
    root_offers = _words(fs, v2m.point / "cgroup.controllers") if v2m is not None else set()
    for c in (*WANTED, "kill", "freeze"):
        if c in got or (c in v1 and c != "kill") or (c == "freeze" and "freezer" in v1):
            continue
        if v2m is None:
            out[c] = ("no cgroup2 file system mounted: mount -t cgroup2 none /sys/fs/cgroup "
                      "(or boot with systemd.unified_cgroup_hierarchy=1)")
        elif c in WANTED and c not in root_offers:
            out[c] = (f"the kernel gives the {c} controller to cgroup v1 here, not to cgroup2: "
                      "boot with cgroup_no_v1=all (or systemd.unified_cgroup_hierarchy=1)")
        elif c == "kill":
            out[c] = "cgroup.kill needs Linux 5.14 or later"
        elif fs.euid() != 0:
            out[c] = ("start under systemd-run --user --scope -p Delegate=yes, or run as root"
                      if not systemd else "run as root (the systemd scope did not delegate it)")
        elif own_v2 is not None:
            own = _join(v2m, own_v2)
            parent = own.parent if own is not None else v2m.point
            out[c] = (f"delegate the {c} controller to {own} "
                      f"(echo +{c} > {parent}/cgroup.subtree_control)")
        else:
            out[c] = "no writable cgroup2 directory reachable from this process's cgroup"
    return out


_created: dict[Path, CgroupFs] = {}


def detect(fs: CgroupFs | None = None, *, systemd: bool = True) -> CgroupHost:
    """Look at this host's cgroups and set up our parent cgroups (a few reads and mkdirs).

    ``fs`` replaces the real kernel (tests); ``systemd=False`` never asks
    systemd for a scope.
    """
    fs = fs if fs is not None else CgroupFs()
    own = _own_paths(fs)
    mounts = _mounts(fs)
    v2m = next((m for m in mounts if m.fstype == "cgroup2"), None)
    v1_ctrls = sorted({c for m in mounts if m.fstype == "cgroup" for c in m.opts} & {
        "memory", "pids", "cpu", "freezer"})
    mount_info: dict[str, object] = {
        "cgroup2": str(v2m.point) if v2m is not None else None,
        "cgroup1": v1_ctrls,
        "layout": ("hybrid" if v1_ctrls else "v2") if v2m is not None
        else ("v1" if v1_ctrls else "none"),
        "own": own.get(""),
        "euid": fs.euid(),
    }
    choice: _V2Choice | None = None
    used_systemd = False
    if v2m is not None and "" in own:
        choice = _plan_v2(fs, v2m, own[""])
        short = choice is None or not set(WANTED) <= choice.controllers
        offered = _words(fs, v2m.point / "cgroup.controllers") & set(WANTED)
        got = choice.controllers if choice is not None else frozenset()
        if short and systemd and fs.euid() != 0 and offered - got:
            path = _systemd_scope(fs)
            if path is not None:
                scoped = _plan_v2(fs, v2m, path)
                if scoped is not None and (choice is None
                                           or len(scoped.controllers) >= len(choice.controllers)):
                    if choice is not None and choice.parent != scoped.parent:
                        _remove_tree(fs, choice.parent)
                    choice = attrs.evolve(scoped, step="systemd-scope")
                    used_systemd = True
    v2_ctrls = choice.controllers if choice is not None else frozenset()
    v1: dict[str, Path] = {}
    for m in mounts:
        if m.fstype != "cgroup":
            continue
        for c in ("memory", "pids", "cpu", "freezer"):
            if c not in m.opts or c not in own or c in v1:
                continue
            base = _join(m, own[c])
            if base is None:
                continue
            sweep(fs, base)
            if c in v2_ctrls or (c == "freezer" and choice is not None
                                 and fs.exists(choice.parent / "cgroup.freeze")):
                continue
            d = base / parent_name(fs.pid())
            try:
                fs.mkdir(d)
            except FileExistsError:
                pass
            except OSError:
                continue
            v1[c] = d
    placement = choice.step if choice is not None else ("v1" if v1 else "none")
    got_v2 = set(v2_ctrls) | ({"kill"} if choice is not None and choice.kill else set())
    if choice is not None and fs.exists(choice.parent / "cgroup.freeze"):
        got_v2.add("freeze")
    h = CgroupHost(
        choice.parent if choice is not None else None, v2_ctrls,
        choice.kill if choice is not None else False, v1,
        placement=placement, mounts=mount_info,
        hints=_hints(fs, v2m, own.get(""), got_v2, v1, used_systemd),
        leaf=choice.leaf if choice is not None else None, fs=fs,
    )
    for d in h.parents():
        _created[d] = fs
    log.debug("cgroups_detected", kind=h.kind, placement=placement,
             v2=str(h.v2) if h.v2 else None, v2_controllers=sorted(v2_ctrls), v1=sorted(v1))
    return h


def _cleanup_created() -> None:
    for d, fs in list(_created.items()):
        if d.name == parent_name(fs.pid()):
            _remove_tree(fs, d)
        _created.pop(d, None)


atexit.register(_cleanup_created)

_host: CgroupHost | None = None


def host() -> CgroupHost:
    """This process's cgroup host, detected once."""
    global _host
    if _host is None:
        _host = detect()
    return _host


def describe_host() -> dict[str, object]:
    """For ``doctor``: the layout, where run cgroups go and each facility's mechanism.

    JSON-serializable: ``kind`` (``v2``, ``hybrid``, ``v2-partial``, ``v1``,
    ``none``), ``mounts`` (``layout``, ``cgroup2``, ``cgroup1``, ``own``,
    ``euid``), ``placement`` (``step``: ``own``, ``leaf``, ``ancestor``,
    ``systemd-scope``, ``v1`` or ``none``; ``path``; ``leaf``; ``v1``),
    ``mechanisms`` (memory/pids/cpu/kill/freeze -> ``cgroup2``, ``cgroup1``,
    ``rlimit-as`` or None) and ``hints`` (what would give each missing one).
    """
    return host().describe()


# -- one run's cgroups ---------------------------------------------------------------


class RunCgroup:
    """The cgroups of one run (one in v2 and/or one per v1 controller)."""

    def __init__(self, tag: str, *, fs: CgroupFs | None = None) -> None:
        self.tag = tag
        self.fs = fs if fs is not None else CgroupFs()
        self.dirs: list[Path] = []
        self.v2: Path | None = None
        self.v1: dict[str, Path] = {}
        self.enforced: set[str] = set()
        self.v2_kill = False

    def _setup(self, h: CgroupHost, limits: Limits) -> None:
        fs = self.fs
        if h.v2 is not None:
            d = h.v2 / self.tag
            fs.mkdir(d)
            self.v2, self.v2_kill = d, h.v2_kill
            self.dirs.append(d)
            if h.v2_kill:
                self.enforced.add("kill:cgroup2")
            if fs.exists(d / "cgroup.freeze"):
                self.enforced.add("freeze:cgroup2")
            if limits.memory is not None and "memory" in h.v2_controllers:
                fs.write(d / "memory.max", str(limits.memory))
                if fs.exists(d / "memory.swap.max"):
                    fs.write(d / "memory.swap.max", "0")
                if fs.exists(d / "memory.oom.group"):
                    fs.write(d / "memory.oom.group", "1")
                self.enforced.add("memory:cgroup2")
            if limits.pids is not None and "pids" in h.v2_controllers:
                fs.write(d / "pids.max", str(limits.pids))
                self.enforced.add("pids:cgroup2")
            if limits.cpu is not None and "cpu" in h.v2_controllers:
                quota = max(1000, int(limits.cpu * _CPU_PERIOD_US))
                fs.write(d / "cpu.max", f"{quota} {_CPU_PERIOD_US}")
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
            fs.mkdir(d)
            self.v1[c] = d
            self.dirs.append(d)
            if c == "memory" and limits.memory is not None:
                fs.write(d / "memory.limit_in_bytes", str(limits.memory))
                if fs.exists(d / "memory.memsw.limit_in_bytes"):
                    fs.write(d / "memory.memsw.limit_in_bytes", str(limits.memory))
                self.enforced.add("memory:cgroup1")
            elif c == "pids" and limits.pids is not None:
                fs.write(d / "pids.max", str(limits.pids))
                self.enforced.add("pids:cgroup1")
            elif c == "cpu" and limits.cpu is not None:
                fs.write(d / "cpu.cfs_period_us", str(_CPU_PERIOD_US))
                fs.write(d / "cpu.cfs_quota_us", str(max(1000, int(limits.cpu * _CPU_PERIOD_US))))
                self.enforced.add("cpu:cgroup1")
            elif c == "freezer" and "freeze:cgroup2" not in self.enforced:
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
            out.update(_procs(self.fs, d))
        return out

    def populated(self) -> bool:
        if self.v2 is not None:
            return _kv(self.fs, self.v2 / "cgroup.events").get("populated", 0) == 1
        return bool(self.pids())

    def oom_killed(self) -> bool:
        if self.v2 is not None and "memory:cgroup2" in self.enforced:
            return _kv(self.fs, self.v2 / "memory.events").get("oom_kill", 0) > 0
        mem = self.v1.get("memory")
        if mem is not None:
            return _kv(self.fs, mem / "memory.oom_control").get("oom_kill", 0) > 0
        return False

    def pids_limit_hit(self) -> bool:
        if self.v2 is not None and "pids:cgroup2" in self.enforced:
            return _kv(self.fs, self.v2 / "pids.events").get("max", 0) > 0
        p = self.v1.get("pids")
        if p is not None:
            return _kv(self.fs, p / "pids.events").get("max", 0) > 0
        return False

    def freeze(self, frozen: bool) -> bool:
        """Freeze or thaw every process; False when no freezer is available."""
        if self.v2 is not None and self.fs.exists(self.v2 / "cgroup.freeze"):
            self.fs.write(self.v2 / "cgroup.freeze", "1" if frozen else "0")
            return True
        fz = self.v1.get("freezer")
        if fz is not None:
            self.fs.write(fz / "freezer.state", "FROZEN" if frozen else "THAWED")
            return True
        return False

    def kill(self, *, wait: float = 5.0) -> None:
        """SIGKILL every process in the cgroups, whatever it forked; wait until empty."""
        if not self.pids():
            # Empty: nothing inside is left to fork, and only a write to cgroup.procs from
            # outside could add a process (the run's own process joined and has exited).
            return
        deadline = time.monotonic() + wait
        if self.v2 is not None and self.v2_kill:
            try:
                self.fs.write(self.v2 / "cgroup.kill", "1")
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
                    self.fs.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY:
                        log.warning("cgroup_remove_failed", path=str(d), error=str(exc))
                        break
                    time.sleep(0.01)
            else:
                log.warning("cgroup_remove_failed", path=str(d), error="still busy after 1 s")
            self.dirs.remove(d)


def cleanup_parents(dirs: Iterable[Path]) -> None:
    """Remove parent cgroups (kept for callers of the earlier API)."""
    fs = CgroupFs()
    for d in dirs:
        _remove_tree(fs, d)
