"""Copying files: reflink (FICLONE), ``copy_file_range``, and plain reads as the fallback.

One module for both backends: the copy backend copies whole trees
(:func:`copy_file`, keeping holes), the FUSE backend copies files up into a
layer and fills the chunks of sparse copies (:func:`copy_data`,
:func:`copy_range`, :func:`copy_metadata`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from collections.abc import Callable

__all__ = ["Reflinks", "tree_usage", "copy_data", "copy_file", "copy_metadata", "copy_range",
           "copy_sparse_data", "copy_xattrs_fd"]

FICLONE = 0x40049409
#: FICLONE failed because this filesystem (or this pair of files) has no reflinks.
_NO_CLONE = (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY, errno.ENOSYS)
#: copy_file_range cannot work here: copy with plain reads and writes.
_NO_RANGE = (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)
_SLOW_CHUNK = 1 << 20
_AS_ROOT = os.geteuid() == 0


class Reflinks:
    """Whether to try FICLONE: cleared at the first filesystem that has no reflinks (a
    failure across two filesystems, EXDEV, leaves it set: other pairs may have them)."""

    __slots__ = ("ok",)

    def __init__(self) -> None:
        self.ok = True

    def clone(self, sfd: int, dfd: int) -> bool:
        """Make ``dfd`` share ``sfd``'s data; False when it cannot (then copy instead)."""
        if not self.ok:
            return False
        try:
            fcntl.ioctl(dfd, FICLONE, sfd)
        except OSError as exc:
            if exc.errno in _NO_CLONE and exc.errno != errno.EXDEV:
                self.ok = False
            return False
        return True


def _copy_slow(sfd: int, dfd: int, off: int, count: int) -> int:
    data = os.pread(sfd, min(count, _SLOW_CHUNK), off)
    view = memoryview(data)
    pos = off
    while view:
        n = os.pwrite(dfd, view, pos)
        view, pos = view[n:], pos + n
    return len(data)


def copy_range(sfd: int, dfd: int, off: int, count: int) -> int:
    """Copy ``count`` bytes at ``off`` of ``sfd`` to the same offset of ``dfd`` (in the
    kernel where it can); return how many were copied (fewer past the end of the source:
    the rest of a sparse file's range stays a hole, which reads as zeros)."""
    done = 0
    while done < count:
        try:
            n = os.copy_file_range(sfd, dfd, count - done, off + done, off + done)
        except OSError as exc:
            if exc.errno not in _NO_RANGE:
                raise
            n = 0
        if n == 0:  # no copy_file_range here, or the end of the source: a plain read says
            n = _copy_slow(sfd, dfd, off + done, count - done)
            if n == 0:
                break
        done += n
    return done


def copy_sparse_data(sfd: int, dfd: int, size: int) -> None:
    """Copy ``size`` bytes, keeping holes (SEEK_DATA/SEEK_HOLE): sparse stays sparse."""
    pos = 0
    while pos < size:
        try:
            data = os.lseek(sfd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break  # only a hole is left
            data = pos  # no SEEK_DATA on this filesystem
        try:
            hole = os.lseek(sfd, data, os.SEEK_HOLE)
        except OSError:
            hole = size
        end = min(hole, size)
        if data < end and copy_range(sfd, dfd, data, end - data) < end - data:
            break  # the source shrank
        pos = hole
    os.ftruncate(dfd, size)


def copy_xattrs_fd(sfd: int, dfd: int) -> None:
    """Copy extended attributes between open files (those this user may not set are
    skipped; other errors raise)."""
    try:
        names = os.listxattr(sfd)
    except OSError:
        return
    for name in names:
        try:
            os.setxattr(dfd, name, os.getxattr(sfd, name))
        except OSError as exc:  # e.g. security.* without privilege, or no xattrs there
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EACCES):
                raise


def copy_file(src: str, dst: str, st: os.stat_result, *, reflinks: Reflinks,
              as_root: bool) -> None:
    """Copy one regular file into new file ``dst`` with its data (reflink when possible,
    holes kept), xattrs, owner, mode and times. A handful of syscalls per file."""
    sfd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            if st.st_size and not reflinks.clone(sfd, dfd):
                copy_sparse_data(sfd, dfd, st.st_size)
            copy_xattrs_fd(sfd, dfd)
            if as_root:
                os.fchown(dfd, st.st_uid, st.st_gid)
            os.fchmod(dfd, stat.S_IMODE(st.st_mode))  # after chown, which clears set-id bits
            os.utime(dfd, ns=(st.st_atime_ns, st.st_mtime_ns))
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)


#: Reflinks between layers and the base, for the life of the filesystem process.
_LAYER_REFLINKS = Reflinks()


def copy_data(src: str, dst: str, size: int | None) -> None:
    """Copy a regular file's bytes into new file ``dst``: all of them (reflink when
    possible), or the first ``size`` (then ``dst`` is ``size`` long, a hole past the end
    of ``src``). No metadata: see :func:`copy_metadata`."""
    sfd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            if size == 0:
                return
            if size is None and _LAYER_REFLINKS.clone(sfd, dfd):
                return
            total = os.fstat(sfd).st_size
            done = copy_range(sfd, dfd, 0, total if size is None else min(size, total))
            if size is not None and size > done:
                os.ftruncate(dfd, size)
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)


def copy_metadata(src: str | None, dst: str, st: os.stat_result, *,
                  keep_mtime: bool = True) -> None:
    """Give ``dst`` the xattrs (from ``src``; what cannot be set is skipped), owner (as
    root), mode and times of ``st``. Symlinks are not followed."""
    if src is not None:
        try:
            names = os.listxattr(src, follow_symlinks=False)
        except OSError:
            names = []
        for n in names:
            with contextlib.suppress(OSError):
                os.setxattr(dst, n, os.getxattr(src, n, follow_symlinks=False),
                            follow_symlinks=False)
    if _AS_ROOT:
        with contextlib.suppress(OSError):
            os.lchown(dst, st.st_uid, st.st_gid)
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(dst, stat.S_IMODE(st.st_mode))
    if keep_mtime:
        os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def tree_usage(
    tree: str, skip: Callable[[str, os.stat_result, str], bool] | None = None
) -> tuple[int, int]:
    """(bytes, entries) the non-directory entries under ``tree`` hold.

    Bytes are apparent sizes of regular files (a hard-linked file once) plus symlink
    target lengths. ``skip(rel, st, path)`` leaves an entry out (``rel`` is its
    '/'-separated path under ``tree``).
    """
    total = files = 0
    seen: set[int] = set()
    stack = [tree]
    while stack:
        try:
            it = os.scandir(stack.pop())
        except (FileNotFoundError, NotADirectoryError):
            continue
        with it:
            for de in it:
                try:
                    st = de.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    stack.append(de.path)
                    continue
                if skip is not None and skip(
                        os.path.relpath(de.path, tree).replace(os.sep, "/"), st, de.path):
                    continue
                files += 1
                if st.st_nlink > 1 and stat.S_ISREG(st.st_mode):
                    if st.st_ino in seen:
                        continue
                    seen.add(st.st_ino)
                if stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
                    total += st.st_size
    return total, files
