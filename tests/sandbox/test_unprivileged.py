"""Ordinary users: a real unprivileged user forks, commits and runs isolated.

CI runs as root, so each test runs a small script as the system user
``branchagent-test`` (created if missing) with ``setpriv``, its workspace in a
directory that user owns. The script runs in a private mount namespace that
root prepares for that run only (nothing on the host changes):

- directories on the way to this Python that the user may not enter (a
  pyenv under /root, 0700) are replaced, in that namespace only, by a 0755
  tmpfs holding just the needed entry;
- /dev/fuse is covered by a device node of our own: owned by the user
  (FUSE works for them) or by root, mode 0600 (FUSE does not), so both
  cases are tested whatever the host's own /dev/fuse mode is;
- /etc/fuse.conf can be covered to test ``user_allow_other``.

Everything the user does is real: user namespaces, setuid fusermount3 mounts,
the rlimit fallback. The script prints one JSON line that the test checks.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

USER = "branchagent-test"
REPO = Path(__file__).resolve().parents[2]
_PYTHONPATH = os.environ.get("PYTHONPATH", "")  # passed on: the user imports what we import

pytestmark = [
    pytest.mark.skipif(
        os.geteuid() != 0,
        reason="needs root to create the unprivileged user branchagent-test and run as it "
        "(CI runs as root); run the tests as root",
    ),
    pytest.mark.skipif(
        shutil.which("setpriv") is None or shutil.which("unshare") is None,
        reason="needs setpriv and unshare (util-linux): apt-get install util-linux",
    ),
]


@attrs.frozen
class User:
    name: str
    uid: int
    gid: int
    home: Path  # a fresh directory the user owns, with ``ws/`` (the workspace) in it


@pytest.fixture(scope="module")
def account() -> tuple[int, int]:
    import pwd

    try:
        pw = pwd.getpwnam(USER)
    except KeyError:
        if shutil.which("useradd") is None:
            pytest.skip("needs useradd (apt-get install passwd) to create the test user")
        res = subprocess.run(
            ["useradd", "--system", "--no-create-home", "--user-group",
             "--shell", "/usr/sbin/nologin", USER],
            capture_output=True, text=True, check=False)
        if res.returncode not in (0, 9):  # 9: made meanwhile by a parallel run
            pytest.fail(f"useradd {USER} failed: {res.stderr}")
        pw = pwd.getpwnam(USER)
    assert pw.pw_uid != 0
    return pw.pw_uid, pw.pw_gid


@pytest.fixture
def user(account: tuple[int, int]) -> Iterator[User]:
    uid, gid = account
    home = Path(tempfile.mkdtemp(prefix="branchagent-user-", dir="/tmp"))
    try:
        (home / "ws").mkdir()
        (home / "ws" / "f.txt").write_text("base\n")
        for p in (home, home / "ws", home / "ws" / "f.txt"):
            os.chown(p, uid, gid)
        home.chmod(0o755)
        yield User(USER, uid, gid, home)
    finally:
        shutil.rmtree(home, ignore_errors=True)


def _enterable(path: Path, uid: int, gid: int) -> bool:
    st = path.stat()
    if st.st_uid == uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid == gid:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def _blocked_dirs(u: User) -> dict[Path, set[str]]:
    """Directories the user cannot enter on the way to this Python, the venv and the repo,
    each with the entries in it that the user needs."""
    needed = {Path(os.path.realpath(sys.executable)), Path(sys.prefix), Path(sys.base_prefix),
              Path(sysconfig.get_paths()["stdlib"]), REPO,
              *(Path(p) for p in _PYTHONPATH.split(os.pathsep) if p and Path(p).exists())}
    out: dict[Path, set[str]] = {}
    for p in needed:
        p = Path(os.path.realpath(p))
        parts = p.parts
        for i in range(1, len(parts)):
            d = Path(*parts[:i])
            if not _enterable(d, u.uid, u.gid):
                below = [Path(*parts[:j]) for j in range(i + 1, len(parts))]
                if not all(_enterable(b, u.uid, u.gid) for b in below if b.is_dir()):
                    pytest.skip(f"{p} is out of reach of {u.name} at two levels; put the "
                                "venv and Python where other users may read them")
                out.setdefault(d, set()).add(parts[i])
                break
    return out


def _fuse_node(stage: Path, owner: tuple[int, int]) -> list[str]:
    """Shell lines covering /dev/fuse with a node of ours, mode 0600, owned by ``owner``."""
    try:
        rdev = os.stat("/dev/fuse").st_rdev
    except OSError:
        pytest.skip("needs /dev/fuse (modprobe fuse; in a container: --device /dev/fuse)")
    node = stage / "dev" / "fuse"
    return [
        f"mkdir -p {stage / 'dev'}",
        f"mount -t tmpfs -o mode=0755 tmpfs {stage / 'dev'}",
        f"mknod -m 0600 {node} c {os.major(rdev)} {os.minor(rdev)}",
        f"chown {owner[0]}:{owner[1]} {node}",
        f"mount --bind {node} /dev/fuse",
    ]


def run_as(
    u: User,
    body: str,
    *,
    fuse: str = "none",
    fuse_conf: str | None = None,
    no_user_namespaces: bool = False,
    timeout: float = 180,
) -> dict[str, Any]:
    """Run ``body`` (the inside of ``async def main(ws_path) -> dict``) as the user.

    ``fuse``: ``"user"`` (the user may open /dev/fuse), ``"root"`` (root only, 0600) or
    ``"none"`` (the host's /dev/fuse as it is). ``no_user_namespaces``: the script runs in a
    user namespace whose ``user.max_user_namespaces`` is 0, so the user cannot make one.
    """
    script = u.home / "script.py"
    script.write_text(
        "import json, os, sys, anyio\nimport branchagent as ba\n\n"
        "async def main(ws_path):\n" + textwrap.indent(textwrap.dedent(body), "    ")
        + "\n\nout = anyio.run(main, sys.argv[1])\n"
        "print('RESULT ' + json.dumps(out, sort_keys=True, default=sorted))\n"
    )
    stage = Path(tempfile.mkdtemp(prefix="branchagent-stage-", dir="/tmp"))
    lines = ["set -e"]
    for n, (d, entries) in enumerate(sorted(_blocked_dirs(u).items())):
        for e in sorted(entries):
            keep = stage / f"keep{n}-{e}"
            lines += [f"mkdir -p {keep}", f"mount --bind {shlex.quote(str(d / e))} {keep}"]
        lines.append(f"mount -t tmpfs -o mode=0755 tmpfs {shlex.quote(str(d))}")
        for e in sorted(entries):
            keep = stage / f"keep{n}-{e}"
            target = shlex.quote(str(d / e))
            lines += [f"mkdir {target}", f"mount --move {keep} {target}"]
    if fuse != "none":
        lines += _fuse_node(stage, (u.uid, u.gid) if fuse == "user" else (0, 0))
    if fuse_conf is not None:
        if not Path("/etc/fuse.conf").exists():
            pytest.skip("needs /etc/fuse.conf (apt-get install fuse3) to cover it")
        (stage / "fuse.conf").write_text(fuse_conf)
        lines.append(f"mount --bind {stage / 'fuse.conf'} /etc/fuse.conf")
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": str(u.home), "USER": u.name, "LOGNAME": u.name, "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        **({"PYTHONPATH": _PYTHONPATH} if _PYTHONPATH else {}),
    }
    become = ["setpriv", f"--reuid={u.uid}", f"--regid={u.gid}", "--clear-groups",
              "env", "-i", *(f"{k}={v}" for k, v in env.items()),
              sys.executable, str(script), str(u.home / "ws")]
    inner = shlex.join(become)
    r = w = -1
    if no_user_namespaces:
        # Root makes a user namespace mapping every uid to itself, sets its
        # max_user_namespaces to 0, then becomes the user in it (exec after the map is
        # written: a process keeps its capabilities in the namespace only across an exec).
        r, w = os.pipe()
        inner = ("read x; exec sh -c " + shlex.quote(
            "echo 0 > /proc/sys/user/max_user_namespaces && exec " + inner) + " </dev/null")
        lines.append("exec unshare --user sh -c " + shlex.quote(inner))
    else:
        lines.append("exec " + inner)
    argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", "\n".join(lines)]
    try:
        if no_user_namespaces:
            out = _run_mapped(argv, r, w, timeout)
        else:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                                 check=False, cwd="/")
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    results = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    said = f"the script as {u.name} failed (exit {out.returncode}):\n{out.stdout}\n{out.stderr}"
    assert out.returncode == 0, said
    assert results, said
    doc = json.loads(results[-1][len("RESULT "):])
    assert isinstance(doc, dict)
    return doc


def _run_mapped(argv: list[str], r: int, w: int,
                timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` whose last step is ``unshare --user``: map its namespace (uid and gid
    0-65535 to themselves) once it exists, then let it go on (it reads ``r`` on stdin)."""
    try:
        proc = subprocess.Popen(argv, stdin=r, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, cwd="/")
    finally:
        os.close(r)
    try:
        mine = os.readlink("/proc/self/ns/user")
        deadline = time.monotonic() + 30
        while True:
            try:
                if os.readlink(f"/proc/{proc.pid}/ns/user") != mine:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("the user namespace was not made: "
                                     + (proc.stderr.read() if proc.stderr else ""))
            time.sleep(0.01)
        for f in ("uid_map", "gid_map"):
            with open(f"/proc/{proc.pid}/{f}", "w") as fh:
                fh.write("0 0 65536\n")
        with contextlib.suppress(BrokenPipeError):  # it died: its stderr says why, below
            os.write(w, b"go\n")
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        os.close(w)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)


# -- copy backend ---------------------------------------------------------------------------


def test_copy_backend_fork_write_commit(user: User) -> None:
    out = run_as(user, """
        from pathlib import Path
        async with ba.open_workspace(ws_path, backend="copy") as ws:
            b1 = await ws.fork()
            (b1.path / "f.txt").write_text("b1\\n")
            b2 = await b1.fork()
            (b2.path / "new.txt").write_text("b2\\n")
            base_before = Path(ws_path, "f.txt").read_text()
            await b2.commit()
            await b1.commit()
        return {"uid": os.geteuid(), "base_before": base_before,
                "f": Path(ws_path, "f.txt").read_text(),
                "new": Path(ws_path, "new.txt").read_text(),
                "new_uid": Path(ws_path, "new.txt").stat().st_uid,
                "entries": sorted(os.listdir(ws_path))}
    """)
    assert out["uid"] == user.uid
    assert out["base_before"] == "base\n"
    assert (out["f"], out["new"]) == ("b1\n", "b2\n")
    assert out["new_uid"] == user.uid
    assert out["entries"] == ["f.txt", "new.txt"]


def test_overlay_backend_as_user_says_it_needs_root(user: User) -> None:
    out = run_as(user, """
        try:
            async with ba.open_workspace(ws_path, backend="overlay"):
                return {"opened": True}
        except ba.BackendUnavailable as exc:
            return {"opened": False, "error": str(exc),
                    "entries": sorted(os.listdir(os.path.dirname(ws_path)))}
    """)
    assert out["opened"] is False
    assert "needs root" in out["error"]
    assert "backend='fuse'" in out["error"]
    assert ".ws.branchagent" not in out["entries"], "a refused open must change nothing"


def test_isolated_run_on_copy_backend(user: User) -> None:
    out = run_as(user, """
        from pathlib import Path
        async with ba.open_workspace(ws_path, backend="copy") as ws:
            b = await ws.fork()
            r = await b.run(["sh", "-c",
                "pwd; cat f.txt; echo run > $W/f.txt; echo made > $W/made.txt; echo $$;"
                "grep ' /sys/fs/cgroup' /proc/self/mountinfo"],
                env={"W": ws_path})
            seen = {"branch_f": (b.path / "f.txt").read_text(),
                    "base_f": Path(ws_path, "f.txt").read_text(),
                    "base_made": Path(ws_path, "made.txt").exists()}
            await b.commit()
        return {"r": [r.returncode, r.stdout, r.stderr, r.isolated], **seen,
                "after_f": Path(ws_path, "f.txt").read_text(),
                "after_made_uid": Path(ws_path, "made.txt").stat().st_uid}
    """)
    rc, stdout, stderr, isolated = out["r"]
    assert (rc, isolated) == (0, True), stderr
    pwd, cat, pid, *cgroup_mounts = stdout.splitlines()
    assert pwd == str(user.home / "ws")  # the branch, at the workspace's own path
    assert cat == "base"
    assert pid == "1"  # its own PID namespace
    # The cgroup tree is read-only in there: the topmost mount at each path (the last
    # listed) is "ro", so the run cannot move itself out of a cgroup the user delegates.
    top = {ln.split()[4]: ln.split()[5].split(",") for ln in cgroup_mounts}
    if Path("/sys/fs/cgroup").is_dir():
        assert "/sys/fs/cgroup" in top
    assert all("ro" in opts for opts in top.values()), top
    assert out["branch_f"] == "run\n"  # writes to the workspace path landed in the branch
    assert out["base_f"] == "base\n"  # ... not in the base
    assert out["base_made"] is False
    assert out["after_f"] == "run\n"  # until the commit
    assert out["after_made_uid"] == user.uid  # root in its namespace, the user on disk


def test_limits_are_reported_truthfully(user: User) -> None:
    out = run_as(user, """
        from branchagent._sandbox import _cgroup
        limits = ba.Limits(memory="256M", pids=64, cpu=0.5, timeout=60)
        cg = _cgroup.host().create(limits)
        offered = sorted(cg.enforced) if cg is not None else []
        if cg is not None:
            cg.remove()
        hog = [sys.executable, "-c", "b = bytearray(1 << 30); print('got 1 GiB')"]
        async with ba.open_workspace(ws_path, backend="copy") as ws:
            b = await ws.fork()
            r = await b.run(hog, limits=limits)
            small = await b.run([sys.executable, "-c", "print(len(bytearray(1 << 20)))"],
                                limits=limits)
        return {"offered": offered, "enforced": sorted(r.enforced),
                "not_enforced": sorted(r.not_enforced), "hog": [r.returncode, r.stdout],
                "small": [small.returncode, small.stdout]}
    """)
    offered, enforced, not_enforced = (set(out[k]) for k in
                                       ("offered", "enforced", "not_enforced"))
    claimed_cgroup = {e for e in enforced if "cgroup" in e.split(":", 1)[-1]}
    assert claimed_cgroup <= offered  # no cgroup limit claimed that the host does not offer
    have = {e.split(":")[0] for e in offered}
    for what in ("memory", "pids", "cpu"):
        if what in have:
            assert any(e.startswith(what + ":cgroup") for e in enforced)
        elif what == "memory":
            assert "memory:rlimit-as" in enforced
        else:
            assert what in not_enforced
            assert not any(e.startswith(what) for e in enforced)
    assert "timeout" in enforced
    # What is claimed holds: a 1 GiB allocation under a 256M limit fails, 1 MiB works.
    assert out["hog"][0] != 0
    assert "got 1 GiB" not in out["hog"][1]
    assert out["small"] == [0, f"{1 << 20}\n"]


def test_isolation_unavailable_names_the_setting(user: User) -> None:
    out = run_as(user, """
        async with ba.open_workspace(ws_path, backend="copy") as ws:
            b = await ws.fork()
            try:
                await b.run(["true"])
            except ba.IsolationUnavailable as exc:
                err = str(exc)
            else:
                err = None
            r = await b.run(["true"], isolate=False)
        return {"err": err, "unisolated": [r.returncode, r.isolated]}
    """, no_user_namespaces=True)
    err = out["err"]
    assert isinstance(err, str), "isolate=True worked without user namespaces"
    assert "user namespace" in err
    assert "user.max_user_namespaces = 0" in err
    assert "sysctl -w user.max_user_namespaces=" in err
    assert "isolate=False" in err
    assert out["unisolated"] == [0, False]


# -- FUSE backend -----------------------------------------------------------------------------

needs_fuse = pytest.mark.skipif(
    shutil.which("fusermount3") is None or not os.path.exists("/dev/fuse"),
    reason="needs FUSE: /dev/fuse and fusermount3 (apt-get install fuse3; modprobe fuse)",
)

_FUSE_BODY = """
    from pathlib import Path
    async with ba.open_workspace(ws_path, backend="fuse") as ws:
        mnt = str(ws.backend.mountpoint)
        opts = [ln.split(" - ")[1].split()[2] for ln in open("/proc/self/mountinfo")
                if ln.split()[4] == mnt]
        b = await ws.fork()
        (b.path / "direct.txt").write_text("direct\\n")
        r = await b.run(["sh", "-c", "pwd; cat f.txt direct.txt; echo run > $W/f.txt",],
                        env={"W": ws_path})
        seen = {"branch_f": (b.path / "f.txt").read_text(),
                "base_f": Path(ws_path, "f.txt").read_text()}
        c = await b.fork()
        (c.path / "nested.txt").write_text("nested\\n")
        await c.commit()
        await b.commit()
    return {"r": [r.returncode, r.stdout, r.stderr, r.isolated], "opts": opts, **seen,
            "after": {n: Path(ws_path, n).read_text() for n in sorted(os.listdir(ws_path))},
            "uid": os.geteuid()}
"""


def _check_fuse_run(u: User, out: dict[str, Any]) -> list[str]:
    rc, stdout, stderr, isolated = out["r"]
    assert (rc, isolated) == (0, True), stderr
    assert stdout.splitlines() == [str(u.home / "ws"), "base", "direct"]
    assert out["branch_f"] == "run\n"
    assert out["base_f"] == "base\n"
    assert out["after"] == {"f.txt": "run\n", "direct.txt": "direct\n",
                            "nested.txt": "nested\n"}
    assert out["uid"] == u.uid
    opts = out["opts"]
    assert len(opts) == 1, f"the FUSE mount was not seen: {opts}"
    assert f"user_id={u.uid}" in opts[0].split(",")
    return list(opts[0].split(","))


@needs_fuse
def test_fuse_backend_as_user(user: User) -> None:
    out = run_as(user, _FUSE_BODY, fuse="user", fuse_conf="# no user_allow_other\n")
    opts = _check_fuse_run(user, out)
    # Without user_allow_other, the mount is the user's alone; their isolated run, in a
    # user namespace of their own, still reaches it (the checks above).
    assert "allow_other" not in opts


@needs_fuse
def test_fuse_backend_as_user_with_user_allow_other(user: User) -> None:
    out = run_as(user, _FUSE_BODY, fuse="user", fuse_conf="user_allow_other\n")
    assert "allow_other" in _check_fuse_run(user, out)


@needs_fuse
def test_fuse_backend_without_dev_fuse_access_says_so(user: User) -> None:
    out = run_as(user, """
        from branchagent._backends import default_backend
        from structlog.testing import capture_logs
        try:
            async with ba.open_workspace(ws_path, backend="fuse"):
                pass
        except ba.BackendUnavailable as exc:
            err = str(exc)
        else:
            err = None
        with capture_logs() as logs:
            chosen = default_backend()
        # Not asked for by name: the workspace opens on the copy backend and works.
        with capture_logs() as opened_logs:
            async with ba.open_workspace(ws_path) as ws:
                used = ws.backend.name
                async with ws.branch() as b:
                    (b.path / "by-default.txt").write_text("ok")
        committed = open(os.path.join(ws_path, "by-default.txt")).read()
        return {"err": err, "chosen": chosen, "used": used, "committed": committed,
                "fallback_logged": [e.get("chosen") for e in opened_logs
                                    if e["event"] == "backend_fallback"],
                "logs": [{k: v for k, v in e.items() if k in ("event", "reason")}
                         for e in logs]}
    """, fuse="root")
    err = out["err"]
    assert isinstance(err, str), "the FUSE backend opened without access to /dev/fuse"
    assert f"/dev/fuse is not accessible to user {USER!r} (uid {user.uid})" in err
    assert "mode 0600" in err
    assert "chmod 0666 /dev/fuse" in err
    assert "backend='copy'" in err
    assert out["chosen"] == "copy"
    assert out["logs"] == [{"event": "backend_fallback", "reason": err}]
    assert out["used"] == "copy"
    assert out["committed"] == "ok"
    assert out["fallback_logged"] == ["copy"]


_SESSION_BODY = """
    from pathlib import Path
    async with ba.open_workspace(ws_path, backend={backend!r}) as ws:
        b = await ws.fork()
        s = await b.session()
        await s.exec("import os\\nstate = ['root']\\nopen('f.txt', 'w').write('parent\\\\n')")
        c = await s.fork()
        await c.exec("state.append('child')\\nopen('f.txt', 'w').write('child\\\\n')\\n"
                     "open('made.txt', 'w').write('c\\\\n')")
        g = await c.fork()
        await g.exec("state.append('grandchild')")
        seen = {{
            "states": [await x.eval("state") for x in (s, c, g)],
            "cwd": await c.eval("os.getcwd()"),
            "uid_inside": await c.eval("os.geteuid()"),
            "parent_f": await s.eval("open('f.txt').read()"),
            "child_f": await c.eval("open('f.txt').read()"),
            "grandchild_f": await g.eval("open('f.txt').read()"),
            "base_f": Path(ws_path, "f.txt").read_text(),
        }}
        pids = [s.pid, c.pid, g.pid]
        await c.branch.commit()
        seen["closed"] = [s.closed, c.closed, g.closed]
        # c followed its files into b: its memory, b's files, its writes into b
        seen["moved"] = [c.branch is b, await c.eval("state"), await c.eval("os.getcwd()"),
                         await c.eval("open('made.txt').read()")]
        await c.exec("open('after.txt', 'w').write('a\\\\n')")
        seen["after_in_b"] = await s.eval("open('after.txt').read()")
        await b.commit()
        seen["closed2"] = [s.closed, c.closed]
        seen["s_after"] = [s.branch.parent is None, await s.eval("state"),
                           await s.eval("open('after.txt').read()")]
        await s.close()
    seen["alive"] = [os.path.exists(f"/proc/{{p}}") for p in pids]
    seen["after_f"] = Path(ws_path, "f.txt").read_text()
    seen["made_uid"] = Path(ws_path, "made.txt").stat().st_uid
    return seen
"""


def _check_sessions(u: User, out: dict[str, Any]) -> None:
    assert out["states"] == [["root"], ["root", "child"], ["root", "child", "grandchild"]]
    assert out["cwd"] == str(u.home / "ws")  # the branch at the workspace's own path
    assert out["uid_inside"] == 0  # root in its own user namespace, the user on disk
    assert (out["parent_f"], out["child_f"]) == ("parent\n", "child\n")
    assert out["grandchild_f"] == "child\n"
    assert out["base_f"] == "base\n"
    # committed: c follows into b, g (c's child) was invalidated
    assert out["closed"] == [False, False, True]
    assert out["moved"] == [True, ["root", "child"], str(u.home / "ws"), "c\n"]
    assert out["after_in_b"] == "a\n"
    # b committed into the base: s moves to a new top-level branch; c, a fork that
    # followed one commit already, ends
    assert out["closed2"] == [False, True]
    assert out["s_after"] == [True, ["root"], "a\n"]
    assert out["alive"] == [False, False, False]
    assert out["after_f"] == "child\n"
    assert out["made_uid"] == u.uid


def test_sessions_fork_as_user_on_copy_backend(user: User) -> None:
    """Rootless sessions: the session runs in the user's own user namespace, and each
    fork makes a nested one to take its branch's view."""
    _check_sessions(user, run_as(user, _SESSION_BODY.format(backend="copy")))


@needs_fuse
def test_sessions_fork_as_user_on_fuse_backend(user: User) -> None:
    out = run_as(user, _SESSION_BODY.format(backend="fuse"), fuse="user",
                 fuse_conf="# no user_allow_other\n")
    _check_sessions(user, out)
