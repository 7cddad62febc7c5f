"""Sparse copy-up records: a layer's file that holds only some of its bytes.

A file of at least ``SPARSE_MIN`` bytes is copied up into a layer *sparse*:
the layer's file has the right size but no data, and a :class:`Sparse` record
says which ``CHUNK``-sized chunks it holds; the rest is read from the file
below (itself perhaps sparse, after a nested fork). Records are kept in the
layer's ``sparse.log`` (see ``._layers.Layer``) so a restarted filesystem
process reads such a file as before.
"""

from __future__ import annotations

import hashlib
import os
from typing import TYPE_CHECKING

from ..._fileops import copy_range

if TYPE_CHECKING:
    from ._layers import Layer

__all__ = ["CHUNK", "Sparse", "hash_sparse"]

#: Sparse copy-up granule: a write fills at most this much around each end.
CHUNK = 1 << 16


class Sparse:
    """A file of a layer that holds only some of its bytes; the rest read from below.

    Byte ``i`` of the file's content is in the layer's own (real) file when
    ``i >= limit`` or its chunk (``i // CHUNK``) is in ``present``; otherwise it
    is byte ``i`` of ``lower``'s content (another :class:`Sparse` when the file
    below is itself sparse, else the real file ``lower_real``). ``limit`` starts
    at the size below and only shrinks (a truncate). Once every chunk under
    ``limit`` is present the record is dropped (``done``) and the real file is the
    whole content. Every change is logged before the call that needs it returns.
    """

    __slots__ = ("_fd", "done", "layer", "limit", "lower", "lower_lid", "lower_path",
                 "lower_real", "path", "present")

    def __init__(self, layer: Layer, path: str, lower_lid: str | None, lower_path: str,
                 lower_real: str, limit: int) -> None:
        self.layer = layer
        self.path = path
        self.lower_lid = lower_lid
        self.lower_path = lower_path
        self.lower_real = lower_real
        self.lower: Sparse | None = None  # linked after loading (see Store.load)
        self.limit = limit
        self.present: set[int] = set()
        self.done = False
        self._fd: int | None = None

    def __repr__(self) -> str:
        return f"<Sparse {self.layer.id}:{self.path} limit={self.limit} have={len(self.present)}>"

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _lower_fd(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.lower_real, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        return self._fd

    def _nchunks(self) -> int:
        return -(-self.limit // CHUNK)

    def _from_lower(self, off: int, size: int) -> bytes:
        lower = self.lower
        fd = self._lower_fd()
        if lower is not None and not lower.done:
            data = lower.read(fd, off, size)
        else:
            data = os.pread(fd, size, off)
        if len(data) < size:  # (the file below shrank behind our back: zeros, not garbage)
            data += bytes(size - len(data))
        return data

    def read(self, fd: int, off: int, size: int) -> bytes:
        """``size`` bytes of the content at ``off``; ``fd`` is this layer's real file."""
        end = min(off + size, os.fstat(fd).st_size)
        parts: list[bytes] = []
        pos = off
        while pos < end:
            c = pos // CHUNK
            if pos >= self.limit or c in self.present:
                stop = pos  # a run of chunks held here
                while stop < end and (stop >= self.limit or stop // CHUNK in self.present):
                    stop = (stop // CHUNK + 1) * CHUNK
                stop = min(stop, end)
                parts.append(os.pread(fd, stop - pos, pos))
            else:
                stop = min((c + 1) * CHUNK, end, self.limit)
                parts.append(self._from_lower(pos, stop - pos))
            pos = stop
        return b"".join(parts)

    def write(self, fd: int, off: int, buf: bytes) -> int:
        """Write ``buf`` at ``off`` (filling the chunks it covers only partly first)."""
        end = off + len(buf)
        first, last = off // CHUNK, (end - 1) // CHUNK
        filled = []
        for c in {first, last}:
            if c not in self.present and c * CHUNK < self.limit and not (
                    off <= c * CHUNK and end >= (c + 1) * CHUNK):
                self._fill(fd, c)
                filled.append(c)
        n = os.pwrite(fd, buf, off)
        whole = [c for c in range(-(-off // CHUNK), (off + n) // CHUNK)
                 if c not in self.present and c * CHUNK < self.limit]
        self._mark(filled + whole)
        return n

    def _fill(self, fd: int, c: int) -> None:
        start = c * CHUNK
        stop = min(start + CHUNK, self.limit)
        data = self._from_lower(start, stop - start)
        view = memoryview(data)
        pos = start
        while view:
            n = os.pwrite(fd, view, pos)
            view, pos = view[n:], pos + n

    def _mark(self, chunks: list[int]) -> None:
        if not chunks:
            return
        self.present.update(chunks)
        self.layer.log_sparse(["c", self.path, sorted(chunks)])
        if len(self.present) >= self._nchunks() and all(
                c in self.present for c in range(self._nchunks())):
            self._finish()

    def truncated(self, size: int) -> None:
        """The real file was just cut (or grown) to ``size``. Logged after the cut: the real
        file is never shorter than ``limit`` otherwise, so after a crash in between the
        record's limit is lowered to the file's size on load (:meth:`Layer.drop_missing`)."""
        if size < self.limit:
            self.limit = size
            self.present = {c for c in self.present if c * CHUNK < size}
            self.layer.log_sparse(["t", self.path, size])
            if all(c in self.present for c in range(self._nchunks())):
                self._finish()

    def fill(self) -> None:
        """Copy in every missing chunk (keeping the file's times); the record is dropped."""
        if self.done:
            return
        real = self.layer.real(self.path)
        st = os.lstat(real)
        fd = os.open(real, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            plain = self.lower is None or self.lower.done  # below is a whole file
            n = self._nchunks()
            c = 0
            while c < n:
                if c in self.present:
                    c += 1
                    continue
                end = c + 1
                while end < n and end not in self.present:
                    end += 1
                if plain:  # a run of missing chunks: one in-kernel copy
                    start = c * CHUNK
                    copy_range(self._lower_fd(), fd, start, min(end * CHUNK, self.limit) - start)
                else:
                    for k in range(c, end):
                        self._fill(fd, k)
                c = end
        finally:
            os.close(fd)
        os.utime(real, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
        self._finish()

    def _finish(self) -> None:
        self.done = True
        self.close()
        if self.layer.sparse.get(self.path) is self:
            del self.layer.sparse[self.path]
        self.layer.log_sparse(["m", self.path])


# -- layers ----------------------------------------------------------------------------------


def hash_sparse(real: str, sp: Sparse) -> str:
    """:func:`hash_file` of a sparse file's content (without filling it)."""
    h = hashlib.blake2b(digest_size=16)
    fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        off = 0
        while chunk := (sp.read(fd, off, 1 << 20) if not sp.done else os.pread(fd, 1 << 20, off)):
            h.update(chunk)
            off += len(chunk)
    finally:
        os.close(fd)
    return h.hexdigest()
