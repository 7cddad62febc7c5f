"""Sparse copy-up on the FUSE backend: a few bytes written into a large file copy a chunk.

A file of 1 MiB or more below a branch's top layer is copied up as an empty
file of the same size plus a record of which 64 KiB chunks it holds; the rest
is read from below (see ``_sparse.Sparse``). These tests check the content
seen through the mount against a model, through forks, truncates, renames,
hard links, a restart of the filesystem process, nested and base commits.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

import branchagent as ba
from _support import requires_fuse
from branchagent._backends.fuse import FuseBackend
from branchagent._backends.fuse._sparse import CHUNK

pytestmark = [pytest.mark.anyio, requires_fuse]

MiB = 1 << 20


@pytest.fixture
def anyio_backend() -> str:
    return "trio"  # the filesystem is what is tested here, not the agent's event loop


def _layer_copies(state: Path, name: str) -> list[os.stat_result]:
    """Every file called ``name`` in the layers of the FUSE store."""
    out = []
    for d, _dirs, files in os.walk(state / "fuse" / "layers"):
        if name in files:
            out.append(os.stat(os.path.join(d, name)))
    return out


def _pwrite(path: Path, off: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        assert os.pwrite(fd, data, off) == len(data)
    finally:
        os.close(fd)


@pytest.fixture
def big(repo: Path) -> bytearray:
    data = bytearray(random.Random(7).randbytes(8 * MiB))
    (repo / "big.bin").write_bytes(data)
    return data


async def test_small_write_into_a_large_file_copies_a_chunk(repo: Path, big: bytearray) -> None:
    state = repo.parent / "state"
    async with ba.open_workspace(repo, backend=FuseBackend(), state_dir=state) as ws:
        b = await ws.fork("edit")
        _pwrite(b.path / "big.bin", 3 * MiB + 5, b"HELLO")
        (copy,) = _layer_copies(state, "big.bin")
        assert copy.st_size == 8 * MiB
        assert copy.st_blocks * 512 <= CHUNK + 4096, "more than one chunk was copied up"
        want = bytearray(big)
        want[3 * MiB + 5:3 * MiB + 10] = b"HELLO"
        assert (b.path / "big.bin").read_bytes() == want
        assert (repo / "big.bin").read_bytes() == big
        (change,) = await b.changes()
        assert change.path == "big.bin"
        loser = await ws.fork("loser")
        _pwrite(loser.path / "big.bin", 0, b"X" * 10)
        await loser.abort()
        await b.commit()
    assert (repo / "big.bin").read_bytes() == want


async def test_chains_truncates_and_nested_commits(repo: Path, big: bytearray) -> None:
    async with ba.open_workspace(repo, backend=FuseBackend(),
                                 state_dir=repo.parent / "state") as ws:
        a = await ws.fork("a")
        _pwrite(a.path / "big.bin", 3 * MiB + 5, b"HELLO")
        mine = bytearray(big)
        mine[3 * MiB + 5:3 * MiB + 10] = b"HELLO"
        c = await a.fork("c")  # freezes a's sparse file: c's copy-up reads through it
        _pwrite(c.path / "big.bin", 7 * MiB - 3, b"WORLDWORLD")
        theirs = bytearray(mine)
        theirs[7 * MiB - 3:7 * MiB + 7] = b"WORLDWORLD"
        assert (c.path / "big.bin").read_bytes() == theirs
        assert (a.path / "big.bin").read_bytes() == mine
        os.truncate(c.path / "big.bin", 5 * MiB + 1)
        os.truncate(c.path / "big.bin", 6 * MiB)  # the regrown tail reads zeros, not old bytes
        theirs = theirs[:5 * MiB + 1] + bytes(MiB - 1)
        assert (c.path / "big.bin").read_bytes() == theirs
        await c.commit()
        assert (a.path / "big.bin").read_bytes() == theirs
        await a.commit()
    assert (repo / "big.bin").read_bytes() == theirs


async def test_sparse_files_survive_a_restart(repo: Path, big: bytearray) -> None:
    state = repo.parent / "state"
    want = bytearray(big)
    async with ba.open_workspace(repo, backend=FuseBackend(), state_dir=state,
                                 keep_branches=True) as ws:
        b = await ws.fork("kept")
        _pwrite(b.path / "big.bin", MiB + 1, b"abc")
        want[MiB + 1:MiB + 4] = b"abc"
    async with ba.open_workspace(repo, backend=FuseBackend(), state_dir=state,
                                 keep_branches=True) as ws:
        (b,) = ws.branches()
        assert (b.path / "big.bin").read_bytes() == want
        _pwrite(b.path / "big.bin", 6 * MiB - 2, b"defg")
        want[6 * MiB - 2:6 * MiB + 2] = b"defg"
    async with ba.open_workspace(repo, backend=FuseBackend(), state_dir=state) as ws:
        (b,) = ws.branches()
        assert (b.path / "big.bin").read_bytes() == want
        await b.commit()
    assert (repo / "big.bin").read_bytes() == want


async def test_rename_link_truncating_open_and_fork_with_open_writer(
        repo: Path, big: bytearray) -> None:
    (repo / "d").mkdir()
    (repo / "d" / "other.bin").write_bytes(big[::-1])
    (repo / "w.bin").write_bytes(big[: 2 * MiB])
    (repo / "t.bin").write_bytes(big[: 2 * MiB])
    async with ba.open_workspace(repo, backend=FuseBackend(),
                                 state_dir=repo.parent / "state") as ws:
        b = await ws.fork("b")
        _pwrite(b.path / "big.bin", 10, b"renamed")
        os.rename(b.path / "big.bin", b.path / "moved.bin")
        _pwrite(b.path / "d" / "other.bin", 2 * MiB, b"in a dir")
        os.rename(b.path / "d", b.path / "e")
        moved = bytearray(big)
        moved[10:17] = b"renamed"
        other = bytearray(big[::-1])
        other[2 * MiB:2 * MiB + 8] = b"in a dir"
        assert (b.path / "moved.bin").read_bytes() == moved
        assert (b.path / "e" / "other.bin").read_bytes() == other
        os.link(b.path / "moved.bin", b.path / "linked.bin")
        _pwrite(b.path / "linked.bin", 4 * MiB, b"both names")
        moved[4 * MiB:4 * MiB + 10] = b"both names"
        assert (b.path / "moved.bin").read_bytes() == moved
        # A writer holding the file open while a child is forked keeps writing its branch.
        w_want = bytearray(big[: 2 * MiB])
        with open(b.path / "w.bin", "r+b") as f:  # noqa: ASYNC230 - served elsewhere
            f.seek(100)
            f.write(b"before")
            f.flush()
            w_want[100:106] = b"before"
            child = await b.fork("child")
            f.seek(MiB + 100)
            f.write(b"after")
            f.flush()
        at_fork = bytes(w_want)
        w_want[MiB + 100:MiB + 105] = b"after"
        assert (b.path / "w.bin").read_bytes() == w_want
        assert (child.path / "w.bin").read_bytes() == at_fork
        await child.abort()
        with open(b.path / "e" / "other.bin", "r+b") as f:  # noqa: ASYNC230 - elsewhere
            f.truncate(0)  # (a setattr through the open file)
            f.write(b"short")
        _pwrite(b.path / "t.bin", 10, b"sparse now")
        with open(b.path / "t.bin", "wb") as f:  # noqa: ASYNC230 - an open with O_TRUNC
            f.write(b"cut")
        await b.commit()
    assert (repo / "moved.bin").read_bytes() == moved
    assert (repo / "linked.bin").read_bytes() == moved
    assert (repo / "e" / "other.bin").read_bytes() == b"short"
    assert (repo / "w.bin").read_bytes() == w_want
    assert (repo / "t.bin").read_bytes() == b"cut"
    assert not (repo / "big.bin").exists()
    assert not (repo / "d").exists()


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_random_writes_truncates_and_forks_match_a_model(
        repo: Path, big: bytearray, seed: int) -> None:
    """Random pwrite/truncate/read/fork sequences against an in-memory model."""
    rnd = random.Random(seed)
    async with ba.open_workspace(repo, backend=FuseBackend(),
                                 state_dir=repo.parent / "state") as ws:
        b = await ws.fork("m")
        model = bytearray(big)
        snapshots: list[tuple[ba.Branch, bytes]] = []
        for _step in range(40):
            path = b.path / "big.bin"
            op = rnd.random()
            if op < 0.55:
                off = rnd.randrange(0, len(model) + CHUNK)
                data = rnd.randbytes(rnd.choice([1, 100, CHUNK - 1, CHUNK, 3 * CHUNK + 7]))
                _pwrite(path, off, data)
                if off > len(model):
                    model.extend(bytes(off - len(model)))
                model[off:off + len(data)] = data
            elif op < 0.7:
                size = rnd.randrange(0, 9 * MiB)
                os.truncate(path, size)
                model = model[:size] + bytes(max(0, size - len(model)))
            elif op < 0.8 and len(snapshots) < 3:
                child = await b.fork()
                snapshots.append((child, bytes(model)))
            else:
                off = rnd.randrange(0, len(model) + 1)
                n = rnd.randrange(0, 2 * MiB)
                with open(path, "rb") as f:  # noqa: ASYNC230 - served elsewhere
                    f.seek(off)
                    assert f.read(n) == model[off:off + n]
        assert (b.path / "big.bin").read_bytes() == model
        for kid, seen in snapshots:
            assert (kid.path / "big.bin").read_bytes() == seen
            await kid.abort()
        await b.commit()
    assert (repo / "big.bin").read_bytes() == model
