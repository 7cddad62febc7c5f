"""Probe the run limits on this host through the public API (copy backend, no FUSE).

Meant for a pure cgroup v2 host, run as root: ``python scripts/pure_v2_probe.py``.
It prints what the host is (kernel, Python, our cgroup, the root's controllers),
``describe_host()`` (where run cgroups go, each facility's mechanism), then one
line per probe with PASS/FAIL and the figures:

- memory: a growing bytearray at ``Limits(memory="64M")``;
- pids: 400 background sleeps at ``Limits(pids=32)``;
- cpu: a 2 s busy loop at ``Limits(cpu=0.25)`` (CPU-seconds of the loop, from its own rusage);
- disk: a 128 MB file at ``Limits(disk="32M")``, when ``Limits`` has ``disk``
  (a backend matter, not a cgroup one: only reported, never expected).

On a pure v2 host each limit must hold *through cgroup v2*. Elsewhere (hybrid,
v1, none) the mechanism is only reported (INFO when a limit is honestly
reported as not enforced), and a probe fails when a limit is
claimed but does not hold, or is neither enforced nor reported as not enforced.
Exits 1 when any probe fails.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import tempfile
from pathlib import Path

import anyio
import attrs
import structlog

import branchagent as ba
from branchagent._sandbox._cgroup import describe_host

HOG = ("b = bytearray()\n"
       "for _ in range(1024):\n"
       "    b += b'x' * (1 << 20)\n"
       "print('survived', len(b) >> 20, 'MiB')\n")
FORKS = ("import subprocess\n"
         "n = 0\n"
         "for _ in range(400):\n"
         "    try:\n"
         "        subprocess.Popen(['sleep', '30'])\n"
         "    except OSError:\n"
         "        break\n"
         "    n += 1\n"
         "print(n)\n")
# CPU time of the loop alone: the interpreter's start-up is left out (under emulation
# it alone costs more than the loop is allowed).
BUSY = ("import resource, time\n"
        "r0 = resource.getrusage(resource.RUSAGE_SELF)\n"
        "t = time.monotonic()\n"
        "while time.monotonic() - t < 2.0:\n"
        "    pass\n"
        "r = resource.getrusage(resource.RUSAGE_SELF)\n"
        "print(f'{r.ru_utime + r.ru_stime - r0.ru_utime - r0.ru_stime:.3f}')\n")
FILL = ("import errno, os\n"
        "n = 0\n"
        "try:\n"
        "    with open('fill.bin', 'wb') as f:\n"
        "        for _ in range(128):\n"
        "            f.write(b'\\1' * (1 << 20)); f.flush(); os.fsync(f.fileno()); n += 1\n"
        "except OSError as e:\n"
        "    print(n, errno.errorcode.get(e.errno, e.errno)); raise SystemExit(0)\n"
        "print(n, 'ok')\n")


def host_text() -> list[str]:
    lines = [f"kernel {platform.release()}  python {platform.python_version()}  "
             f"euid {os.geteuid()}"]
    cg = Path("/proc/self/cgroup").read_text()
    lines.append("/proc/self/cgroup: " + " | ".join(cg.split()))
    d = describe_host()
    mounts = d["mounts"]
    assert isinstance(mounts, dict)
    v2 = mounts.get("cgroup2")
    own = mounts.get("own")
    if isinstance(v2, str) and isinstance(own, str):
        ours = Path(v2) / own.lstrip("/")
        procs = (ours / "cgroup.procs").read_text().split() if ours.is_dir() else []
        ctrls = (ours / "cgroup.controllers").read_text().strip() if ours.is_dir() else "?"
        lines.append(f"our cgroup {ours}: controllers [{ctrls}], {len(procs)} processes")
        root_sub = (Path(v2) / "cgroup.subtree_control").read_text().strip()
        lines.append(f"root {v2}: subtree_control [{root_sub}]")
    else:
        lines.append("no cgroup2 mount")
    return lines


def mechanism(r: ba.RunResult, what: str) -> str:
    got = sorted(e for e in r.enforced if e.split(":")[0] == what)
    if got:
        return ",".join(got)
    return "NOT ENFORCED (reported)" if what in r.not_enforced else "NOT ENFORCED (unreported)"


def verdict(held: bool, mech: str, what: str, pure_v2: bool) -> str:
    claimed = not mech.startswith("NOT ENFORCED")
    if pure_v2:
        return "PASS" if held and f"{what}:cgroup2" in mech else "FAIL"
    # Elsewhere, report the mechanism; fail on a claim that did not hold, or on silence.
    if not held and mech == "NOT ENFORCED (reported)":
        return "INFO"
    return "PASS" if held and claimed else "FAIL"


async def probes(pure_v2: bool) -> list[str]:
    out: list[str] = []
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        repo.mkdir()
        (repo / "README").write_text("probe\n")
        async with ba.open_workspace(repo, backend="copy") as ws:
            b = await ws.fork("probe")

            r = await b.run([py, "-c", HOG], isolate=False,
                            limits=ba.Limits(memory="64M", timeout=60))
            held = r.killed == "memory" or (r.returncode != 0 and "MemoryError" in r.stderr)
            m = mechanism(r, "memory")
            out.append(f"{verdict(held, m, 'memory', pure_v2)} memory 64M: killed={r.killed} "
                       f"rc={r.returncode} {r.stdout.strip()!r} via {m}")

            r = await b.run([py, "-c", FORKS], isolate=False,
                            limits=ba.Limits(pids=32, timeout=60))
            started = int(r.stdout.split()[0]) if r.stdout.split() else -1
            held = 0 <= started < 32
            m = mechanism(r, "pids")
            out.append(f"{verdict(held, m, 'pids', pure_v2)} pids 32: {started} of 400 sleeps "
                       f"started, rc={r.returncode} via {m}")

            r = await b.run([py, "-c", BUSY], isolate=False,
                            limits=ba.Limits(cpu=0.25, timeout=60))
            used = float(r.stdout.strip() or "nan")
            held = used <= 0.8  # 0.25 CPU over 2 s is 0.5 CPU-s; unlimited is 2.0
            m = mechanism(r, "cpu")
            out.append(f"{verdict(held, m, 'cpu', pure_v2)} cpu 0.25: {used:.2f} CPU-s in a "
                       f"2 s busy loop (expect ~0.50) via {m}")

            if "disk" in attrs.fields_dict(ba.Limits):
                try:
                    r = await b.run([py, "-c", FILL], isolate=False,
                                    limits=ba.Limits(disk="32M", timeout=60))  # type: ignore[call-arg,unused-ignore]
                except ba.BranchError as exc:  # a backend may refuse the limit outright
                    out.append(f"INFO disk 32M: refused by the copy backend: {exc}")
                else:
                    words = r.stdout.split()
                    mib = int(words[0]) if words else -1
                    held = 0 <= mib <= 33 and "ok" not in words
                    m = mechanism(r, "disk")
                    out.append(f"{verdict(held, m, 'disk', False)} disk 32M: wrote {mib} MiB "
                               f"({' '.join(words[1:])}) via {m}")
            else:
                out.append("SKIP disk: Limits has no disk field")
            await b.abort()
    return out


def main() -> int:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    for line in host_text():
        print(line)
    d = describe_host()
    print("describe_host() =", json.dumps(d, indent=2))
    mounts = d["mounts"]
    assert isinstance(mounts, dict)
    pure_v2 = mounts.get("layout") == "v2"
    print("host is " + ("PURE cgroup v2: expecting cgroup2 mechanisms" if pure_v2
                        else "not pure v2: mechanisms are reported"))
    lines = anyio.run(probes, pure_v2)
    for line in lines:
        print(line)
    return 1 if any(line.startswith("FAIL") for line in lines) else 0


if __name__ == "__main__":
    sys.exit(main())
