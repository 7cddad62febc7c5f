"""Where run cgroups go: the placement steps of ``_cgroup.detect`` on fake cgroup
trees shaped like every layout we know of, and on this machine's real hierarchy.

The fake (:class:`FakeKernel`) is a temporary directory shaped like
/sys/fs/cgroup with fake /proc/self/cgroup and mountinfo texts. It keeps the
kernel rules the placement depends on: enabling a controller for a cgroup's
children fails with EBUSY while the cgroup holds processes (unless it is the
root: "no internal processes") and with ENOENT when the cgroup does not have the
controller; a process cannot join a cgroup that has controllers enabled for its
children; a child's controllers are its parent's ``subtree_control``; a
controller's files exist only where the controller is; an ordinary user may
only write inside the subtrees delegated to them, and move only their own
processes (and only when they may write the common ancestor's cgroup.procs).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import anyio
import pytest
import structlog

import branchagent as ba
from branchagent._sandbox import _cgroup
from branchagent._sandbox._cgroup import CgroupFs, CgroupHost

ALL = frozenset({"memory", "pids", "cpu"})
ME = 4242
_CTRL_FILES = {"memory": ("memory.max", "memory.swap.max", "memory.oom.group", "memory.events"),
               "pids": ("pids.max", "pids.events"), "cpu": ("cpu.max",)}


def _err(code: int, path: Path) -> OSError:
    return OSError(code, os.strerror(code), str(path))


class FakeKernel(CgroupFs):
    """A fake cgroup file system under ``base``; see the module docstring."""

    def __init__(self, base: Path, *, euid: int = 0, pid: int = ME) -> None:
        self.base = base
        self.v2: Path | None = None
        self.v1: dict[str, Path] = {}
        self._euid = euid
        self._pid = pid
        self.owned: list[Path] = []  # subtrees an ordinary user may write
        self.mine: set[int] = {pid}  # processes of our uid
        self.live: set[int] = {pid}
        self.tools: dict[str, str] = {}
        self.commands: list[list[str]] = []
        self.on_run: dict[str, tuple[int, str]] = {}
        self._next_pid = 50_000
        self.writable: Callable[[Path], bool] | None = None  # overrides the ownership rule
        self.confine: Path | None = None  # processes cannot be moved out of this subtree

    # -- building a tree ---------------------------------------------------------------

    def mount_v2(self, controllers: Sequence[str], *, subtree: Sequence[str] = ()) -> Path:
        root = self.base / "cgroup2"
        root.mkdir(parents=True)
        self._files(root, controllers, is_root=True)
        (root / "cgroup.subtree_control").write_text(" ".join(subtree))
        self.v2 = root
        return root

    def mount_v1(self, *controllers: str) -> None:
        for c in controllers:
            d = self.base / "v1" / c
            d.mkdir(parents=True)
            (d / "cgroup.procs").write_text(f"{self._pid}\n")
            self.v1[c] = d

    def cgroup(self, rel: str, *, subtree: Sequence[str] = (), procs: Sequence[int] = ()) -> Path:
        """A v2 cgroup at ``rel`` (parents first), with processes and enabled controllers."""
        assert self.v2 is not None
        d = self.v2 / rel
        assert d.parent.is_dir(), "create parents first"
        d.mkdir()
        self._files(d, _words(d.parent / "cgroup.subtree_control"), is_root=False)
        (d / "cgroup.subtree_control").write_text(" ".join(subtree))
        for p in procs:
            self._remove_pid(p)
            _add(d / "cgroup.procs", p)
            self.live.add(p)
        return d

    def _files(self, d: Path, controllers: Sequence[str] | set[str], *, is_root: bool) -> None:
        (d / "cgroup.controllers").write_text(" ".join(sorted(controllers)))
        (d / "cgroup.subtree_control").write_text("")
        (d / "cgroup.procs").write_text("")
        if not is_root:
            (d / "cgroup.type").write_text("domain")
            (d / "cgroup.kill").write_text("")
            (d / "cgroup.freeze").write_text("0")
            (d / "cgroup.events").write_text("populated 0\nfrozen 0\n")

    # -- what the agent reads ----------------------------------------------------------

    def where(self, pid: int) -> Path | None:
        assert self.v2 is not None
        for d in [self.v2, *self.v2.rglob("*")]:
            if (d / "cgroup.procs").is_file() and pid in _ints(d / "cgroup.procs"):
                return d
        return None

    def proc_self_cgroup(self) -> str:
        lines = []
        for i, c in enumerate(sorted(self.v1), start=1):
            lines.append(f"{i}:{c}:/")
        if self.v2 is not None:
            d = self.where(self._pid)
            assert d is not None
            rel = d.relative_to(self.v2).as_posix()
            lines.append("0::/" + ("" if rel == "." else rel))
        return "\n".join(lines) + "\n"

    def mountinfo(self) -> str:
        lines = ["22 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw"]
        if self.v2 is not None:
            lines.append(f"30 22 0:26 / {self.v2} rw,nosuid - cgroup2 cgroup2 rw,nsdelegate")
        for i, (c, d) in enumerate(sorted(self.v1.items())):
            lines.append(f"{40 + i} 22 0:{40 + i} / {d} rw,nosuid - cgroup cgroup rw,{c}")
        return "\n".join(lines) + "\n"

    def pid(self) -> int:
        return self._pid

    def euid(self) -> int:
        return self._euid

    def alive(self, pid: int) -> bool:
        return pid in self.live

    def which(self, name: str) -> str | None:
        return self.tools.get(name)

    def sleep(self, seconds: float) -> None:
        pass

    def may_write(self, path: Path) -> bool:
        if self.writable is not None:
            return self.writable(path)
        return self._euid == 0 or any(path == o or o in path.parents for o in self.owned)

    def may_move(self, pid: int) -> bool:
        return self._euid == 0 or pid in self.mine

    def run(self, argv: Sequence[str], timeout: float) -> tuple[int, str]:
        self.commands.append(list(argv))
        rc, out = self.on_run.get(Path(argv[0]).name, (127, "not found"))
        hook = getattr(self, "systemd", None)
        if rc == 0 and hook is not None:
            hook(argv)
        return rc, out

    # -- the kernel's rules ----------------------------------------------------------

    def _in_v2(self, path: Path) -> bool:
        return self.v2 is not None and (path == self.v2 or self.v2 in path.parents)

    def _is_root(self, d: Path) -> bool:
        return d == self.v2 or d in self.v1.values()

    def mkdir(self, path: Path) -> None:
        if path.exists():
            raise FileExistsError(errno.EEXIST, "exists", str(path))
        if not (path.parent / "cgroup.procs").is_file():
            raise _err(errno.ENOENT, path)
        if not self.may_write(path.parent):
            raise _err(errno.EACCES, path)
        path.mkdir()
        if self._in_v2(path):
            self._files(path, _words(path.parent / "cgroup.subtree_control"), is_root=False)
            if self._euid != 0:
                self.owned.append(path)  # mkdir makes the user the owner
        else:
            (path / "cgroup.procs").write_text("")

    def rmdir(self, path: Path) -> None:
        if not path.is_dir():
            raise FileNotFoundError(errno.ENOENT, "no such cgroup", str(path))
        if not self.may_write(path.parent):
            raise _err(errno.EACCES, path)
        if _ints(path / "cgroup.procs") or any(p.is_dir() for p in path.iterdir()):
            raise _err(errno.EBUSY, path)
        for f in path.iterdir():
            f.unlink()
        path.rmdir()
        self.owned = [o for o in self.owned if o != path]

    def exists(self, path: Path) -> bool:
        d, name = path.parent, path.name
        if self._in_v2(d):
            ctrl = name.split(".")[0]
            if ctrl in _CTRL_FILES:
                return (d / "cgroup.procs").is_file() and not self._is_root(d) and \
                    ctrl in _words(d / "cgroup.controllers")
        return path.exists()

    def write(self, path: Path, value: str) -> None:
        d, name = path.parent, path.name
        if not self.may_write(path):
            raise _err(errno.EACCES, path)
        if name == "cgroup.procs":
            self._move(int(value), d)
        elif not self._in_v2(d):  # v1: any control file
            path.write_text(value)
        elif name == "cgroup.subtree_control":
            for tok in value.split():
                ctrl = tok.lstrip("+-")
                if ctrl not in _words(d / "cgroup.controllers"):
                    raise _err(errno.ENOENT, path)
                if tok.startswith("+") and _ints(d / "cgroup.procs") and not self._is_root(d):
                    raise _err(errno.EBUSY, path)
                have = _words(path)
                have = have | {ctrl} if tok.startswith("+") else have - {ctrl}
                path.write_text(" ".join(sorted(have)))
        else:
            if not self.exists(path):
                raise _err(errno.ENOENT, path)
            path.write_text(value)

    def _move(self, pid: int, dst: Path) -> None:
        if pid not in self.live:
            raise _err(errno.ESRCH, dst)
        if self.confine is not None and self.confine not in [dst, *dst.parents]:
            raise _err(errno.ENOENT, dst)
        if self._in_v2(dst):
            if _words(dst / "cgroup.subtree_control") and not self._is_root(dst):
                raise _err(errno.EBUSY, dst)
            src = self.where(pid)
            assert src is not None
            if self._euid != 0:
                common = next(p for p in [src, *src.parents] if p == dst or p in dst.parents)
                if not (self.may_move(pid) and self.may_write(common / "cgroup.procs")):
                    raise _err(errno.EACCES, dst)
            self._remove_pid(pid, v2_only=True)
        else:
            for f in dst.parents:
                if f in self.v1.values():
                    for q in [f, *f.rglob("*")]:
                        if (q / "cgroup.procs").is_file():
                            _discard(q / "cgroup.procs", pid)
        _add(dst / "cgroup.procs", pid)

    def _remove_pid(self, pid: int, *, v2_only: bool = False) -> None:
        if self.v2 is not None:
            for q in [self.v2, *self.v2.rglob("*")]:
                if (q / "cgroup.procs").is_file():
                    _discard(q / "cgroup.procs", pid)

    def try_join(self, procs: Path) -> bool:
        child = self._next_pid
        self._next_pid += 1
        here = self.where(self._pid) if self._in_v2(procs) else None
        self.live.add(child)
        self.mine.add(child)
        if here is not None:
            _add(here / "cgroup.procs", child)
        try:
            self.write(procs, str(child))
        except OSError:
            return False
        finally:
            self._remove_pid(child)
            _discard(procs, child)
            self.live.discard(child)
        return True


def _words(path: Path) -> set[str]:
    return set(path.read_text().split()) if path.is_file() else set()


def _ints(path: Path) -> list[int]:
    return [int(t) for t in path.read_text().split()] if path.is_file() else []


def _add(path: Path, pid: int) -> None:
    path.write_text("".join(f"{p}\n" for p in [*_ints(path), pid]))


def _discard(path: Path, pid: int) -> None:
    path.write_text("".join(f"{p}\n" for p in _ints(path) if p != pid))


def leftovers(k: FakeKernel) -> list[str]:
    roots = [r for r in (k.v2, *k.v1.values()) if r is not None]
    return sorted(str(p) for r in roots for p in r.rglob("branchagent-[0-9]*"))


def run_dir(h: CgroupHost, limits: ba.Limits) -> tuple[_cgroup.RunCgroup, Path]:
    rc = h.create(limits)
    assert rc is not None
    assert rc.v2 is not None
    return rc, rc.v2


LIMITS = ba.Limits(memory="64M", pids=32, cpu=0.25)


# -- the layouts ---------------------------------------------------------------------


def test_own_cgroup_at_the_root_is_used_directly(tmp_path: Path) -> None:
    """Step 1: our cgroup can enable controllers as it is (here: it is the root)."""
    k = FakeKernel(tmp_path)
    root = k.mount_v2(["cpu", "memory", "pids", "io"])
    _add(root / "cgroup.procs", ME)
    h = _cgroup.detect(k)
    assert h.placement == "own"
    assert h.v2 == root / f"branchagent-{ME}"
    assert h.v2_controllers == ALL
    assert h.kind == "v2"
    rc, d = run_dir(h, LIMITS)
    assert rc.enforced == {"memory:cgroup2", "pids:cgroup2", "cpu:cgroup2",
                           "kill:cgroup2", "freeze:cgroup2"}
    assert (d / "memory.max").read_text() == str(64 << 20)
    assert (d / "pids.max").read_text() == "32"
    assert (d / "cpu.max").read_text() == "25000 100000"
    # The run's process can join it: the kernel would refuse if the parent held processes.
    k.live.add(777)
    _add(root / "cgroup.procs", 777)
    k.write(d / "cgroup.procs", "777")
    assert k.where(777) == d
    _discard(d / "cgroup.procs", 777)
    rc.remove()
    h.cleanup()
    assert leftovers(k) == []


def test_busy_own_cgroup_with_controllers_moves_its_processes_to_a_leaf(tmp_path: Path) -> None:
    """Step 2, the container-init pattern: as root every process of ours moves."""
    k = FakeKernel(tmp_path)
    k.mount_v2(["cpu", "memory", "pids"], subtree=["cpu", "memory", "pids"])
    others = [101, 102, 103]
    own = k.cgroup("box", procs=[ME, *others])
    h = _cgroup.detect(k)
    assert h.placement == "leaf"
    assert h.leaf == own / "branchagent-leaf"
    assert sorted(_ints(own / "branchagent-leaf" / "cgroup.procs")) == sorted([ME, *others])
    assert _ints(own / "cgroup.procs") == []
    assert _words(own / "cgroup.subtree_control") == ALL
    assert h.v2 == own / f"branchagent-{ME}"
    assert h.v2_controllers == ALL
    # Detected again (the agent now lives in the leaf): the same place, nothing new.
    assert "branchagent-leaf" in k.proc_self_cgroup()
    again = _cgroup.detect(k)
    assert (again.v2, again.v2_controllers, again.placement) == (h.v2, ALL, "own")
    h.cleanup()
    assert leftovers(k) == []
    assert (own / "branchagent-leaf").is_dir(), "the leaf holds the agent: it stays"


def test_leaf_is_undone_when_some_processes_cannot_move(tmp_path: Path) -> None:
    """Not root: another user's process stays, so the controllers cannot be enabled;
    what was moved goes back, and the best remaining place is used."""
    k = FakeKernel(tmp_path, euid=1000)
    k.mount_v2(["cpu", "memory", "pids"], subtree=["cpu", "memory", "pids"])
    own = k.cgroup("box", procs=[ME, 555, 556])
    k.owned.append(own)
    k.mine.add(555)  # 556 belongs to someone else
    h = _cgroup.detect(k, systemd=False)
    assert sorted(_ints(own / "cgroup.procs")) == sorted([ME, 555, 556])
    assert not (own / "branchagent-leaf").exists()
    assert _words(own / "cgroup.subtree_control") == set()
    # Our own cgroup still gives kill and freeze, never a limit it does not have.
    assert h.placement == "own"
    assert h.v2_controllers == frozenset()
    rc, d = run_dir(h, LIMITS)
    assert rc.enforced == {"kill:cgroup2", "freeze:cgroup2"}
    assert not (d / "memory.max").exists()
    mech = h.describe()["mechanisms"]
    assert mech == {"memory": "rlimit-as", "pids": None, "cpu": None,
                    "kill": "cgroup2", "freeze": "cgroup2"}
    rc.remove()
    h.cleanup()


def test_undelegated_container_climbs_to_the_root(tmp_path: Path) -> None:
    """Step 3, the measured pure-v2 host: our cgroup and its parent only have memory."""
    k = FakeKernel(tmp_path)
    root = k.mount_v2(["cpuset", "cpu", "io", "memory", "hugetlb", "pids"],
                      subtree=["cpuset", "cpu", "io", "memory", "hugetlb", "pids"])
    k.cgroup("process_api", subtree=["memory"])
    own = k.cgroup("process_api/abc", procs=[ME, 11, 12, 13, 14, 15])
    h = _cgroup.detect(k)
    assert h.placement == "ancestor"
    assert h.v2 == root / f"branchagent-{ME}"
    assert h.v2_controllers == ALL
    # Nothing of the process manager's was touched.
    assert sorted(_ints(own / "cgroup.procs")) == sorted([ME, 11, 12, 13, 14, 15])
    assert _words(own / "cgroup.subtree_control") == set()
    assert _words(root / "process_api" / "cgroup.subtree_control") == {"memory"}
    rc, d = run_dir(h, LIMITS)
    assert {"memory:cgroup2", "pids:cgroup2", "cpu:cgroup2", "kill:cgroup2"} <= rc.enforced
    assert (d / "cpu.max").read_text() == "25000 100000"
    assert h.describe()["hints"] == {}
    rc.remove()
    h.cleanup()
    assert leftovers(k) == []


def test_runs_placed_at_an_ancestor_keep_the_agents_own_caps(tmp_path: Path) -> None:
    """Leaving the container's cgroup must not leave its memory.max or pids.max behind."""
    k = FakeKernel(tmp_path)
    root = k.mount_v2(["cpu", "memory", "pids"], subtree=["cpu", "memory", "pids"])
    k.cgroup("pm", subtree=["memory", "pids"])
    (root / "pm" / "memory.max").write_text("max\n")
    (root / "pm" / "pids.max").write_text("500\n")
    own = k.cgroup("pm/box", procs=[ME, 5])
    (own / "memory.max").write_text("1073741824\n")
    (own / "pids.max").write_text("max\n")
    h = _cgroup.detect(k)
    assert h.placement == "ancestor"
    assert h.v2 is not None
    assert (h.v2 / "memory.max").read_text() == "1073741824"
    assert (h.v2 / "pids.max").read_text() == "500"
    assert not (h.v2 / "cpu.max").exists()  # nothing capped cpu on the way: left alone
    h.cleanup()


def test_nearest_ancestor_wins_a_tie(tmp_path: Path) -> None:
    k = FakeKernel(tmp_path)
    root = k.mount_v2(["cpu", "memory", "pids"], subtree=["cpu", "memory", "pids"])
    k.cgroup("a", subtree=["cpu", "memory", "pids"])
    k.cgroup("a/b", subtree=["memory"])
    k.cgroup("a/b/c", procs=[ME, 9])
    h = _cgroup.detect(k)
    assert (h.placement, h.v2) == ("ancestor", root / "a" / f"branchagent-{ME}")
    assert h.v2_controllers == ALL
    h.cleanup()


def test_the_root_may_enable_what_it_offers(tmp_path: Path) -> None:
    """The root is exempt from the no-internal-processes rule: it enables pids itself."""
    k = FakeKernel(tmp_path)
    root = k.mount_v2(["cpu", "memory", "pids"], subtree=["memory"])
    _add(root / "cgroup.procs", 1)
    k.live.add(1)
    k.cgroup("svc", procs=[ME, 7])
    h = _cgroup.detect(k)
    assert (h.placement, h.v2_controllers) == ("ancestor", ALL)
    assert _words(root / "cgroup.subtree_control") == ALL
    h.cleanup()


def test_a_place_our_processes_cannot_join_is_not_used(tmp_path: Path) -> None:
    """The root offers everything, but the kernel refuses to move our processes out of
    our subtree (a cgroup namespace, say): the join probe finds it out, so the next
    best place is used and nothing is claimed at the root."""
    k = FakeKernel(tmp_path)
    root = k.mount_v2(["cpu", "memory", "pids"], subtree=["memory"])
    own = k.cgroup("ns", procs=[ME, 70])
    k.confine = own
    h = _cgroup.detect(k)
    assert h.placement == "leaf"
    assert h.v2 == own / f"branchagent-{ME}"
    assert h.v2_controllers == {"memory"}
    assert [p.name for p in root.iterdir() if p.name.startswith(("branchagent-", "probe-"))] \
        == []
    assert [p.name for p in h.v2.iterdir() if p.is_dir()] == []  # the probe is gone
    rc, _ = run_dir(h, LIMITS)
    assert rc.enforced == {"memory:cgroup2", "kill:cgroup2", "freeze:cgroup2"}
    rc.remove()
    h.cleanup()


def test_v1_only(tmp_path: Path) -> None:
    k = FakeKernel(tmp_path)
    k.mount_v1("memory", "pids", "cpu", "freezer")
    h = _cgroup.detect(k)
    assert (h.kind, h.placement, h.v2) == ("v1", "v1", None)
    assert set(h.v1) == {"memory", "pids", "cpu", "freezer"}
    rc = h.create(LIMITS)
    assert rc is not None
    assert rc.enforced == {"memory:cgroup1", "pids:cgroup1", "cpu:cgroup1", "freeze:cgroup1"}
    assert (rc.v1["cpu"] / "cpu.cfs_quota_us").read_text() == "25000"
    d = h.describe()
    assert d["mechanisms"] == {"memory": "cgroup1", "pids": "cgroup1", "cpu": "cgroup1",
                               "kill": None, "freeze": "cgroup1"}
    hints = d["hints"]
    assert isinstance(hints, dict)
    assert set(hints) == {"kill"}
    rc.remove()
    h.cleanup()
    assert leftovers(k) == []


def test_hybrid_like_this_machine(tmp_path: Path) -> None:
    """v2 with hugetlb only (kill and freeze from there), limits from v1."""
    k = FakeKernel(tmp_path)
    root = k.mount_v2(["hugetlb"])
    _add(root / "cgroup.procs", ME)
    k.mount_v1("memory", "pids", "cpu", "freezer")
    h = _cgroup.detect(k)
    assert (h.kind, h.placement) == ("hybrid", "own")
    assert h.v2_controllers == frozenset()
    assert set(h.v1) == {"memory", "pids", "cpu"}  # the v2 freezer is used instead
    rc = h.create(LIMITS)
    assert rc is not None
    assert rc.enforced == {"memory:cgroup1", "pids:cgroup1", "cpu:cgroup1",
                           "kill:cgroup2", "freeze:cgroup2"}
    assert len(rc.procs_files()) == 4
    hints = h.describe()["hints"]
    assert hints == {}
    rc.remove()
    h.cleanup()
    assert leftovers(k) == []


def test_no_cgroups_at_all(tmp_path: Path) -> None:
    k = FakeKernel(tmp_path)
    h = _cgroup.detect(k)
    assert (h.kind, h.placement, h.v2, h.v1) == ("none", "none", None, {})
    assert h.create(LIMITS) is None
    d = h.describe()
    assert d["mechanisms"] == {"memory": "rlimit-as", "pids": None, "cpu": None,
                               "kill": None, "freeze": None}
    hints = d["hints"]
    assert isinstance(hints, dict)
    assert set(hints) == {"memory", "pids", "cpu", "kill", "freeze"}
    assert "mount -t cgroup2" in hints["pids"]
    json.dumps(d)


def test_hint_names_the_parent_to_delegate_from(tmp_path: Path) -> None:
    """Root, but the controller is nowhere reachable except where we cannot go."""
    k = FakeKernel(tmp_path)
    k.mount_v2(["memory", "pids"], subtree=["memory"])
    k.cgroup("ns", subtree=["memory"])
    own = k.cgroup("ns/me", procs=[ME, 8])
    k.writable = lambda path: own == path or own in path.parents
    h = _cgroup.detect(k)
    assert h.v2_controllers == {"memory"}
    hints = h.describe()["hints"]
    assert isinstance(hints, dict)
    assert hints["pids"] == (f"delegate the pids controller to {own} "
                             f"(echo +pids > {own.parent}/cgroup.subtree_control)")
    assert "cgroup v1" in hints["cpu"]  # the kernel has no v2 cpu
    h.cleanup()


# -- an ordinary user under systemd ---------------------------------------------------


def systemd_user(tmp_path: Path) -> tuple[FakeKernel, Path]:
    """A login session: our cgroup is root's; the user manager's subtree is ours."""
    k = FakeKernel(tmp_path, euid=1000)
    k.mount_v2(["cpu", "memory", "pids", "io"], subtree=["cpu", "memory", "pids"])
    k.cgroup("user.slice", subtree=["cpu", "memory", "pids"])
    k.cgroup("user.slice/user-1000.slice", subtree=["cpu", "memory", "pids"])
    k.cgroup("user.slice/user-1000.slice/session-3.scope", procs=[ME, 300])
    mgr = k.cgroup("user.slice/user-1000.slice/user@1000.service",
                   subtree=["cpu", "memory", "pids"])
    k.cgroup("user.slice/user-1000.slice/user@1000.service/app.slice",
             subtree=["cpu", "memory", "pids"])
    k.owned.append(mgr)
    k.mine.add(300)
    return k, mgr / "app.slice"


def test_ordinary_user_gets_a_delegated_systemd_scope(tmp_path: Path) -> None:
    k, app = systemd_user(tmp_path)
    k.tools = {"systemd-run": "/usr/bin/systemd-run", "busctl": "/usr/bin/busctl"}
    k.on_run = {"busctl": (0, "o \"/org/freedesktop/systemd1/job/42\"")}
    unit = f"branchagent-{ME}.scope"

    def systemd(argv: list[str]) -> None:
        # What the user manager does: make the unit's cgroup (the user's), move the pids.
        assert argv[1:3] == ["--user", "call"]
        assert unit in argv
        assert "Delegate" in argv
        scope = app / unit
        scope.mkdir()
        k._files(scope, _words(app / "cgroup.subtree_control"), is_root=False)
        pids = argv[argv.index("au") + 2: argv.index("Delegate")]
        for p in pids:
            k._remove_pid(int(p))
            _add(scope / "cgroup.procs", int(p))

    k.systemd = systemd  # type: ignore[attr-defined]
    h = _cgroup.detect(k)
    scope = app / unit
    assert h.placement == "systemd-scope"
    assert h.v2 == scope / f"branchagent-{ME}"
    assert h.v2_controllers == ALL
    assert h.leaf == scope / "branchagent-leaf"
    assert k.where(ME) == scope / "branchagent-leaf"
    assert k.where(300) == app.parent.parent / "session-3.scope"  # only we moved
    rc, _ = run_dir(h, LIMITS)
    assert {"memory:cgroup2", "pids:cgroup2", "cpu:cgroup2"} <= rc.enforced
    rc.remove()
    h.cleanup()


@pytest.mark.parametrize(("tools", "on_run", "reason"), [
    ({}, {}, "not found"),
    ({"systemd-run": "/bin/systemd-run", "busctl": "/bin/busctl"},
     {"busctl": (1, "Failed to connect to bus: No medium found")}, "No medium found"),
])
def test_systemd_scope_is_skipped_cleanly_with_the_reason_logged(
    tmp_path: Path, tools: dict[str, str], on_run: dict[str, tuple[int, str]], reason: str
) -> None:
    k, _app = systemd_user(tmp_path)
    k.tools, k.on_run = tools, on_run
    with structlog.testing.capture_logs() as logs:
        h = _cgroup.detect(k)
    skipped = [e for e in logs if e["event"] == "cgroup_systemd_scope_skipped"]
    assert len(skipped) == 1
    assert reason in skipped[0]["reason"]
    assert h.placement == "none"  # nothing of the session's is ours
    assert k.where(ME) == k.v2 / "user.slice/user-1000.slice/session-3.scope"  # type: ignore[operator]
    hints = h.describe()["hints"]
    assert isinstance(hints, dict)
    assert "systemd-run --user --scope -p Delegate=yes" in hints["pids"]


def test_root_never_asks_systemd(tmp_path: Path) -> None:
    k = FakeKernel(tmp_path)
    k.mount_v2(["memory"], subtree=["memory"])
    k.cgroup("x", procs=[ME])
    k.tools = {"systemd-run": "/bin/systemd-run", "busctl": "/bin/busctl"}
    _cgroup.detect(k).cleanup()
    assert k.commands == []


# -- nothing left behind ----------------------------------------------------------------


def test_parents_of_dead_agents_are_swept_at_detect(tmp_path: Path) -> None:
    k = FakeKernel(tmp_path)
    root = k.mount_v2(["cpu", "memory", "pids"], subtree=["cpu", "memory", "pids"])
    k.mount_v1("memory")
    _add(root / "cgroup.procs", ME)
    dead = k.cgroup("branchagent-999", subtree=["memory"])
    k.live.discard(999)
    k.cgroup("branchagent-999/run-aaaa")
    v1_dead = k.v1["memory"] / "branchagent-999"
    v1_dead.mkdir()
    (v1_dead / "cgroup.procs").write_text("")
    alive = k.cgroup("branchagent-1000")
    k.live.add(1000)
    busy = k.cgroup("branchagent-998")
    k.cgroup("branchagent-998/run-bbbb", procs=[31337])  # a leaked run still running
    k.live.discard(998)
    other = k.cgroup("branchagent-notapid")
    with structlog.testing.capture_logs() as logs:
        h = _cgroup.detect(k)
    assert not dead.exists()
    assert not v1_dead.exists()
    assert [d.is_dir() for d in (alive, busy, other)] == [True, True, True]
    assert (busy / "run-bbbb").is_dir()
    swept = [e for e in logs if e["event"] == "cgroup_stale_removed"]
    assert [str(dead)] in [e["paths"] for e in swept]
    h.cleanup()


def test_describe_is_json_serializable_and_complete(tmp_path: Path) -> None:
    k = FakeKernel(tmp_path)
    k.mount_v2(["cpu", "memory", "pids"], subtree=["cpu", "memory", "pids"])
    k.cgroup("box", procs=[ME])
    h = _cgroup.detect(k)
    d = json.loads(json.dumps(h.describe()))
    assert d["kind"] == "v2"
    assert d["placement"]["step"] == "leaf"
    assert d["placement"]["path"] == str(k.v2 / "box" / f"branchagent-{ME}")  # type: ignore[operator]
    assert d["mounts"]["layout"] == "v2"
    assert set(d["mechanisms"]) == {"memory", "pids", "cpu", "kill", "freeze"}
    h.cleanup()


# -- this machine's real hierarchy ----------------------------------------------------


def _real() -> CgroupHost:
    return _cgroup.host()


needs_root_cgroups = pytest.mark.skipif(
    os.geteuid() != 0 or _real().kind == "none",
    reason="needs root and a usable cgroup hierarchy",
)
needs_hybrid = pytest.mark.skipif(
    os.geteuid() != 0 or _real().mounts.get("layout") != "hybrid"
    or not {"memory", "pids", "cpu"} <= set(_real().v1),
    reason="needs root on a hybrid host with v1 memory/pids/cpu (like the dev machine)",
)


def _branchagent_dirs(pid: int) -> list[Path]:
    h = _real()
    roots = [p.parent for p in h.parents()]
    return [r / f"branchagent-{pid}" for r in roots if (r / f"branchagent-{pid}").exists()]


@needs_hybrid
@pytest.mark.anyio
async def test_real_hybrid_run_gets_cgroup1_limits_and_cgroup2_kill(repo: Path) -> None:
    async with ba.open_workspace(repo, backend="copy") as ws:
        b = await ws.fork()
        r = await b.run(["sh", "-c", "cat /proc/self/cgroup"], isolate=False,
                        limits=ba.Limits(memory="256M", pids=64, cpu=0.5))
    assert r.returncode == 0
    assert {"memory:cgroup1", "pids:cgroup1", "cpu:cgroup1", "kill:cgroup2"} <= set(r.enforced)
    assert not r.not_enforced
    # It really ran in them: its /proc/self/cgroup names a run cgroup in v1 memory and v2.
    lines = dict(line.split(":", 2)[1:] for line in r.stdout.splitlines())
    assert f"/branchagent-{os.getpid()}/run-" in lines["memory"]
    assert lines[""].startswith(f"/branchagent-{os.getpid()}/run-")
    left = [d for p in _real().parents() for d in p.iterdir() if d.name.startswith("run-")]
    assert left == []


_CHILD = """
import os, signal, sys, anyio, branchagent as ba
from branchagent._sandbox import _cgroup
async def main():
    async with ba.open_workspace(sys.argv[1], backend="copy") as ws:
        b = await ws.fork()
        r = await b.run(["true"], isolate=False, limits=ba.Limits(memory="64M", pids=16))
        assert r.returncode == 0, r
anyio.run(main)
print("AGENT", os.getpid(), *(p for p in _cgroup.host().parents() if p.is_dir()), flush=True)
if sys.argv[2] == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
"""


def _agent(repo: Path, how: str) -> tuple[int, list[Path]]:
    res = subprocess.run([sys.executable, "-c", _CHILD, str(repo), how], capture_output=True,
                         text=True, timeout=120, check=False)
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("AGENT ")]
    assert line, res.stdout[-3000:] + res.stderr[-3000:]
    first, *parents = line[0].split()[1:]
    return int(first), [Path(p) for p in parents]


@needs_root_cgroups
@pytest.mark.anyio
async def test_real_runs_cancelled_at_any_point_leave_no_cgroup(repo: Path) -> None:
    """A run cancelled at any instant, before its process started too (while the sandbox
    is still being set up), leaves no run cgroup behind."""
    async with ba.open_workspace(repo, backend="copy") as ws:
        b = await ws.fork()
        for i in range(60):
            with anyio.move_on_after(i * 0.0004):
                await b.run(["true"], isolate=i % 2 == 0, limits=ba.Limits(memory="64M"))
    left = [d for p in _real().parents() if p.is_dir() for d in p.iterdir()
            if d.name.startswith("run-")]
    assert left == []


@needs_root_cgroups
def test_real_agent_leaves_no_cgroup_at_exit(repo: Path) -> None:
    _, parents = _agent(repo, "exit")
    assert parents, "the agent had parent cgroups while it ran"
    assert [p for p in parents if p.exists()] == []


@needs_root_cgroups
def test_real_agent_killed_with_sigkill_is_swept_at_the_next_detect(repo: Path) -> None:
    pid, parents = _agent(repo, "kill")
    assert parents
    assert all(p.is_dir() for p in parents), "kill -9 left them (no atexit)"
    try:
        os.kill(pid, 0)
        pytest.skip("the killed agent's pid is in use again")
    except ProcessLookupError:
        pass
    _cgroup.detect()
    assert [p for p in parents if p.exists()] == []


@needs_root_cgroups
def test_real_stale_dir_with_an_empty_child_is_swept(tmp_path: Path) -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()
    dead = proc.pid
    h = _real()
    made = []
    for p in h.parents():
        d = p.parent / f"branchagent-{dead}"
        d.mkdir()
        (d / "run-stale").mkdir()
        made.append(d)
    _cgroup.detect()
    assert [d for d in made if d.exists()] == []
