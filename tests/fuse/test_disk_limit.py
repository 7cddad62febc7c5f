"""Disk limits per branch (``Limits(disk=)``, ``disk_limit=``) and ``Branch.usage()``.

Real FUSE mounts and real processes. The accounting rule these tests rely on
(docs/design.md, "Disk limits"): a branch's bytes are the apparent sizes of the
regular files its own layers hold plus its symlinks' target lengths, exactly,
with no block rounding; a write that would pass the limit is cut short at the
limit and the next one fails with EDQUOT, so a writer that keeps going ends
with the branch holding exactly ``limit`` bytes.
"""

from __future__ import annotations

import errno
import os
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
from structlog.testing import capture_logs

import branchagent as ba
from _support import requires_fuse, tree_state
from branchagent._backends.fuse import FuseBackend
from branchagent._sandbox._run import isolation_available

pytestmark = pytest.mark.anyio
needs_isolation = pytest.mark.skipif(
    not isolation_available(),
    reason="needs private mount and PID namespaces (unshare --mount --pid): not permitted here",
)

KIB = 1 << 10
MIB = 1 << 20
QUOTA_ERRNOS = (errno.EDQUOT, errno.ENOSPC)

#: Writes ``argv[1]`` bytes of random data to ``argv[2]`` in 256 KiB os.write() calls,
#: a plain open()/write() like any tool; prints what it wrote and the errno it got.
WRITER = textwrap.dedent("""
    import os, sys
    want, path = int(sys.argv[1]), sys.argv[2]
    done, err = 0, 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        while done < want:
            try:
                n = os.write(fd, os.urandom(min(256 << 10, want - done)))
            except OSError as exc:
                err = exc.errno
                break
            done += n
    finally:
        os.close(fd)
    print(done, err)
""")


def writer(size: int, path: str) -> list[str]:
    return [sys.executable, "-c", WRITER, str(size), path]


def wrote(r: ba.RunResult) -> tuple[int, int]:
    assert r.returncode == 0, r
    done, err = r.stdout.split()
    return int(done), int(err)


def errno_of(fn: Callable[[], object]) -> int:
    """The errno ``fn()`` failed with (0: it did not)."""
    try:
        fn()
    except OSError as exc:
        return exc.errno or -1
    return 0


def append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def write_chunks(path: Path, chunk: bytes, count: int) -> None:
    """A plain buffered open()/write() loop (the error may come from a write or the close)."""
    with open(path, "wb") as f:
        for _ in range(count):
            f.write(chunk)


@asynccontextmanager
async def fuse_ws(repo: Path, **kw: object) -> AsyncIterator[ba.Workspace]:
    async with ba.open_workspace(repo, backend=FuseBackend(), state_dir=repo.parent / "state",
                                 **kw) as ws:  # type: ignore[arg-type]
        yield ws


# -- input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "exc", "message"),
    [
        ("lots", ba.InvalidLimits, "Limits.disk: cannot read 'lots' as a size"),
        (-1, ba.InvalidLimits, "Limits.disk: size must be positive, got -1"),
        (0, ba.InvalidLimits, "Limits.disk: size must be positive, got 0"),
        ("0M", ba.InvalidLimits, "Limits.disk: size must be positive, got '0M'"),
        (True, ba.InvalidLimits, "Limits.disk: a size must be an int or a string .*not a bool"),
        (1.5, ba.InvalidLimits, "Limits.disk: a size must be an int or a string .*not 1.5"),
    ],
)
def test_bad_disk_limits_are_refused(value: object, exc: type[Exception], message: str) -> None:
    with pytest.raises(exc, match=message):
        ba.Limits(disk=value)  # type: ignore[arg-type]


def test_disk_sizes_read_like_memory() -> None:
    assert ba.Limits().disk is None
    assert ba.Limits(disk="1G").disk == 1 << 30
    assert ba.Limits(disk="1.5M").disk == 3 * MIB // 2
    assert ba.Limits(disk=4096).disk == 4096


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_bad_workspace_and_fork_disk_limits_are_refused(repo: Path) -> None:
    before = tree_state(repo)
    with pytest.raises(ValueError, match="disk_limit: cannot read 'lots' as a size"):
        async with ba.open_workspace(repo, backend="copy", disk_limit="lots"):
            pytest.fail("opened with a bad disk limit")
    with pytest.raises(ValueError, match="disk_limit: size must be positive"):
        async with ba.open_workspace(repo, backend="copy", disk_limit=0):
            pytest.fail("opened with a zero disk limit")
    async with ba.open_workspace(repo, backend="copy") as ws:
        with pytest.raises(ValueError, match="disk_limit: size must be positive"):
            await ws.fork(disk_limit=-5)
        assert ws.branches() == []
    assert tree_state(repo) == before


# -- usage: both backends ---------------------------------------------------------------------


async def test_a_fresh_branch_costs_nothing(repo: Path, backend_name: str) -> None:
    async with ba.open_workspace(repo, backend=backend_name,
                                 state_dir=repo.parent / "state") as ws:
        b = await ws.fork()
        assert await b.usage() == ba.Usage(bytes=0, files=0)
        c = await b.fork()
        assert await c.usage() == ba.Usage(bytes=0, files=0)


async def test_usage_counts_what_the_branch_wrote(repo: Path, backend_name: str) -> None:
    async with ba.open_workspace(repo, backend=backend_name,
                                 state_dir=repo.parent / "state") as ws:
        b = await ws.fork()
        (b.path / "data.bin").write_bytes(b"x" * 10_000)
        (b.path / "new").mkdir()  # directories cost nothing
        (b.path / "new" / "ln").symlink_to("data.bin")  # its target's length
        append(b.path / "README.md", b"more\n")  # changed: counted at its whole size
        (b.path / "run.sh").unlink()  # a deletion costs nothing
        u = await b.usage()
        assert u == ba.Usage(bytes=10_000 + len("data.bin") + len("# demo\nmore\n"), files=3)
        (b.path / "data.bin").unlink()
        assert (await b.usage()).bytes == len("data.bin") + len("# demo\nmore\n")
        # A sibling and the base hold none of it.
        s = await ws.fork()
        assert await s.usage() == ba.Usage(bytes=0, files=0)


async def test_copy_backend_cannot_hold_a_disk_limit(repo: Path) -> None:
    before = tree_state(repo)
    with pytest.raises(ba.BackendUnavailable, match=r"backend 'copy' cannot enforce a "
                       r"per-branch disk limit \(open_workspace\(disk_limit='1G'\)\)"):
        async with ba.open_workspace(repo, backend="copy", disk_limit="1G"):
            pytest.fail("the copy backend accepted a disk limit it cannot enforce")
    async with ba.open_workspace(repo, backend="copy") as ws:
        with pytest.raises(ba.BackendUnavailable, match="backend 'copy' cannot enforce"):
            await ws.fork(disk_limit="1M")
        b = await ws.fork()
        with capture_logs() as logs:
            r = await b.run(writer(3 * MIB, "big.bin"), limits=ba.Limits(disk="1M"),
                            isolate=False)
        assert wrote(r) == (3 * MIB, 0)  # nothing stopped it: and the result says so
        assert "disk" in r.not_enforced
        assert not any(e.startswith("disk") for e in r.enforced)
        warned = [e for e in logs if e["event"] == "limits_not_enforced"
                  and "disk" in e["limits"]]
        assert warned
        assert warned[0]["backend"] == "copy"
        assert (await b.usage()).bytes == 3 * MIB
        assert (await b.usage()).disk_limit is None
    assert tree_state(repo) == before


# -- enforcement: FUSE ------------------------------------------------------------------------


@requires_fuse
@needs_isolation
@pytest.mark.parametrize("isolate", [True, False])
async def test_a_writer_past_the_limit_gets_edquot_and_the_branch_lives_on(
        repo: Path, isolate: bool) -> None:
    before = tree_state(repo)
    async with fuse_ws(repo) as ws:
        b = await ws.fork()
        sibling = await ws.fork()
        (sibling.path / "sib.txt").write_text("sibling\n")
        lim = ba.Limits(disk="1M", timeout=60)
        r = await b.run(writer(4 * MIB, "fill.bin"), limits=lim, isolate=isolate)
        done, err = wrote(r)
        assert err in QUOTA_ERRNOS, r
        assert done == MIB  # cut short at the limit, then refused
        assert "disk:fuse" in r.enforced
        assert "disk" not in r.not_enforced
        assert await b.usage() == ba.Usage(bytes=MIB, files=1)
        assert (b.path / "fill.bin").stat().st_size == MIB
        # At the limit: even an append of two bytes is refused (head says why; dash says EIO).
        r = await b.run(["sh", "-c", "head -c 2 /dev/zero >> fill.bin"], limits=lim,
                        isolate=isolate)
        assert r.returncode != 0
        assert "quota" in r.stderr.lower(), r
        # Usable: delete, and the freed bytes count again (within one run: one limit).
        r = await b.run(["sh", "-c", 'rm fill.bin && exec "$@"', "sh",
                         *writer(512 * KIB, "b.bin")], limits=lim, isolate=isolate)
        assert wrote(r) == (512 * KIB, 0)
        assert await b.usage() == ba.Usage(bytes=512 * KIB, files=1)
        # The cap was the run's: without it the branch grows again.
        assert (await b.usage()).disk_limit is None
        r = await b.run(writer(2 * MIB, "b.bin"), isolate=isolate)
        assert wrote(r) == (2 * MIB, 0)
        assert (await b.usage()).bytes == 512 * KIB + 2 * MIB
        # The sibling and the base are untouched.
        assert tree_state(repo) == before
        assert (sibling.path / "sib.txt").read_text() == "sibling\n"
        assert await sibling.usage() == ba.Usage(bytes=len("sibling\n"), files=1)
        await b.abort()
        assert b.state is ba.BranchState.ABORTED
        await sibling.abort()
    assert tree_state(repo) == before


@requires_fuse
async def test_workspace_limit_holds_for_every_branch_and_plain_writes(repo: Path) -> None:
    before = tree_state(repo)
    async with fuse_ws(repo, disk_limit="256K") as ws:
        assert ws.disk_limit == 256 * KIB
        b = await ws.fork()
        assert (await b.usage()).disk_limit == 256 * KIB
        # A plain open().write() from this very process, through the mount.
        assert errno_of(lambda: write_chunks(b.path / "out.bin", bytes(64 * KIB), 8)
                        ) in QUOTA_ERRNOS
        assert await b.usage() == ba.Usage(bytes=256 * KIB, files=1, disk_limit=256 * KIB)
        # Growth by truncate, a symlink: refused; a shrink gives room back.
        assert errno_of(lambda: os.truncate(b.path / "out.bin", 10 << 30)) == errno.EDQUOT
        assert errno_of(lambda: os.symlink("x" * 100, b.path / "ln")) == errno.EDQUOT
        os.truncate(b.path / "out.bin", 100 * KIB)
        (b.path / "more.bin").write_bytes(b"m" * (156 * KIB))
        assert (await b.usage()).bytes == 256 * KIB
        # Opening with O_TRUNC gives the bytes back at once.
        (b.path / "out.bin").write_bytes(b"")
        assert (await b.usage()).bytes == 156 * KIB
        # A per-branch limit replaces the workspace's.
        big = await ws.fork(disk_limit="1M")
        (big.path / "f.bin").write_bytes(b"f" * (700 * KIB))
        assert await big.usage() == ba.Usage(bytes=700 * KIB, files=1, disk_limit=MIB)
        # A run's smaller limit holds while it runs, the branch's own again after.
        r = await big.run(["sh", "-c", "head -c 200000 /dev/zero > g.bin"],
                          limits=ba.Limits(disk=800 * KIB), isolate=False)
        assert r.returncode != 0
        assert "quota" in r.stderr.lower(), r
        assert (await big.usage()).disk_limit == MIB
        (big.path / "g.bin").write_bytes(b"g" * (324 * KIB))
        assert (await big.usage()).bytes == MIB
    assert tree_state(repo) == before


@requires_fuse
async def test_a_copy_up_counts_at_the_files_whole_size(repo: Path) -> None:
    (repo / "big.bin").write_bytes(os.urandom(3 * MIB))  # copied up sparse: counted whole
    before = tree_state(repo)
    async with fuse_ws(repo) as ws:
        small = await ws.fork(disk_limit="2M")
        assert errno_of(lambda: append(small.path / "big.bin", b"x")) == errno.EDQUOT
        assert await small.usage() == ba.Usage(bytes=0, files=0, disk_limit=2 * MIB)
        # A chmod copies up too.
        assert errno_of(lambda: os.chmod(small.path / "big.bin", 0o600)) == errno.EDQUOT
        # Truncating to nothing copies nothing: allowed.
        (small.path / "big.bin").write_bytes(b"new")
        assert await small.usage() == ba.Usage(bytes=3, files=1, disk_limit=2 * MIB)
        roomy = await ws.fork(disk_limit="4M")
        append(roomy.path / "big.bin", b"x")
        assert (await roomy.usage()).bytes == 3 * MIB + 1
        await small.abort()
        await roomy.abort()
    assert tree_state(repo) == before


@requires_fuse
async def test_a_file_removed_while_open_counts_until_closed(repo: Path) -> None:
    async with fuse_ws(repo) as ws:
        b = await ws.fork(disk_limit="1M")
        fd = os.open(b.path / "held.bin", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            assert os.write(fd, b"h" * (600 * KIB)) == 600 * KIB
            os.unlink(b.path / "held.bin")
            assert (await b.usage()).bytes == 600 * KIB
            # The space is still taken.
            assert errno_of(lambda: (b.path / "other.bin").write_bytes(b"o" * (600 * KIB))
                            ) == errno.EDQUOT
            os.unlink(b.path / "other.bin")
        finally:
            os.close(fd)
        for _ in range(500):  # the kernel sends the release after close() returns
            if not (await b.usage()).bytes:
                break
            await anyio.sleep(0.01)
        assert (await b.usage()).bytes == 0
        (b.path / "other.bin").write_bytes(b"o" * (600 * KIB))
        assert (await b.usage()).bytes == 600 * KIB


@requires_fuse
async def test_nested_branches_count_their_own_bytes(repo: Path) -> None:
    """A child's bytes are its own while it is open; once committed they are the
    parent's (the commit is never refused, even past the parent's limit)."""
    async with fuse_ws(repo) as ws:
        parent = await ws.fork(disk_limit="1M")
        (parent.path / "p.bin").write_bytes(b"p" * (300 * KIB))
        child = await parent.fork()
        # (A fork copies the parent's files still open for writing up into its new top
        # layer, and the kernel may not have sent the release of p.bin yet: then the
        # parent holds p.bin twice, frozen and copied. Hence the parent's own figure.)
        held = await parent.usage()
        assert held.bytes in (300 * KIB, 600 * KIB), held
        assert await child.usage() == ba.Usage(bytes=0, files=0, disk_limit=MIB)  # inherited
        (child.path / "c.bin").write_bytes(b"c" * (800 * KIB))
        assert (await child.usage()).bytes == 800 * KIB
        assert await parent.usage() == held  # the child's bytes are not the parent's
        # The child's own limit holds.
        assert errno_of(lambda: (child.path / "d.bin").write_bytes(b"d" * (300 * KIB))
                        ) == errno.EDQUOT
        os.unlink(child.path / "d.bin")
        await child.commit()
        after = await parent.usage()
        assert after.bytes == held.bytes + 800 * KIB  # past its limit: no growth now
        assert after.bytes > MIB
        assert errno_of(lambda: (parent.path / "q.bin").write_bytes(b"q")) == errno.EDQUOT
        os.unlink(parent.path / "q.bin")
        os.unlink(parent.path / "c.bin")
        (parent.path / "q.bin").write_bytes(b"q" * (100 * KIB))
        assert await parent.usage() == ba.Usage(bytes=held.bytes + 100 * KIB,
                                                files=held.files + 1, disk_limit=MIB)
        await parent.commit()
    assert (repo / "q.bin").stat().st_size == 100 * KIB
    assert (repo / "p.bin").stat().st_size == 300 * KIB
