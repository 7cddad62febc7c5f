"""Kernel overlayfs: a branch is an overlay mount, so work inside it runs at kernel speed.

A top-level branch mounts the base as its only lower layer, with an empty upper
layer of its own. A child of branch ``P`` gets a frozen copy of ``P``'s upper
layer as a new lower layer (only what ``P`` changed is copied: whiteouts,
opaque and redirected directories included), stacked on ``P``'s own lower
layers, so ``P``'s later writes never show in the child. Reads and writes in a
branch go through the kernel (no FUSE server, no user-space copy); a fork costs
a mount plus the copy of the parent's changes.

Commits work as in :mod:`branchagent._backends.copy`: the parent's manifest at
the fork is kept, a commit compares it with both sides to find conflicts, and
the journal of :mod:`branchagent._journal` moves the branch's changes into the
parent (through the parent's mount when the parent is a branch).

What keeps the layers valid (overlayfs forbids changes to a lower layer while it
is mounted): a frozen layer is never written after it is made; the base
changes only by a commit into it, which invalidates every other open branch
(they all descend from the base's other children), or by writes from outside
the workspace, which this backend does not isolate (``isolates_outside_writes``
is False: a top-level branch may see them, as on the FUSE backend). A commit
into branch ``P`` writes ``P``'s upper layer through ``P``'s mount, which is
how an upper layer is meant to change; ``P``'s children are built on frozen
copies, not on that layer.

Needs root in the agent's mount namespace (``mount(2)`` of overlayfs), overlayfs
in the kernel, and a state directory on a filesystem that can hold an upper
layer (not overlayfs itself, nor FUSE): :meth:`OverlayBackend.open` mounts a
probe and raises :class:`~branchagent.exceptions.BackendUnavailable` naming
what is missing. Mounts live as long as the workspace is open; a reopen
mounts the branches again from their layers, which stay on disk, and one left
mounted by an agent that died is used as it is.

Layout under the state directory::

    overlay/branches/<name>/tree/            the mount point (Branch.path)
    overlay/branches/<name>/upper/           the branch's own changes
    overlay/branches/<name>/work/            overlayfs's work directory
    overlay/branches/<name>/lowers.json      its lower layers, top first
    overlay/branches/<name>/manifest.json    the parent's manifest at the fork
    overlay/branches/<name>/parent.json      the parent's name (null: the base)
    overlay/layers/<id>/                     frozen layers (removed when unused)
    journal/                                 commit transactions
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import stat
import uuid
from collections.abc import Sequence
from pathlib import Path

import anyio
import anyio.to_thread

from .. import _journal
from .._log import get_logger
from ..exceptions import BackendUnavailable
from .copy import CopyBackend, _make_writable_and_remove

__all__ = ["OverlayBackend", "check_available"]

log = get_logger("branchagent.workspace")

_MNT_DETACH = 2
#: Extended attributes overlayfs keeps meaning in for a lower layer; the others of its
#: own (origin, impure, index records) refer to the layer they were written in.
_KEEP_OVERLAY_XATTRS = ("trusted.overlay.opaque", "trusted.overlay.redirect")
_MOUNT_OPTIONS = "redirect_dir=on,index=off,metacopy=off,xino=off"

_libc: ctypes.CDLL | None = None


def _c() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _libc


def _escape(path: Path) -> str:
    """A path as one item of overlayfs's option string (``\\``, ``:`` and ``,`` escaped)."""
    out = os.fspath(path)
    for ch in ("\\", ":", ","):
        out = out.replace(ch, "\\" + ch)
    return out


def _mount(lowers: Sequence[Path], upper: Path, work: Path, target: Path) -> None:
    data = (f"lowerdir={':'.join(_escape(p) for p in lowers)},upperdir={_escape(upper)},"
            f"workdir={_escape(work)},{_MOUNT_OPTIONS}")
    if len(data) >= 4096:
        raise OSError(errno.E2BIG, f"{len(lowers)} lower layers make the mount options longer "
                      "than a page")
    rc = _c().mount(b"overlay", os.fsencode(target), b"overlay", ctypes.c_ulong(0),
                    data.encode())
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mounting overlayfs on {target}: {os.strerror(err)}")


def _umount(target: Path) -> None:
    """Detach ``target`` (lazily: processes still inside keep their view until they go)."""
    rc = _c().umount2(os.fsencode(target), _MNT_DETACH)
    if rc != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):  # not mounted (any more)
            raise OSError(err, f"unmounting {target}: {os.strerror(err)}")


def _mounted(target: Path) -> bool:
    try:
        return os.path.ismount(target)
    except OSError:
        return False


def check_available() -> None:
    """Raise :class:`BackendUnavailable` naming what this host lacks (cheap: no mount)."""
    if os.geteuid() != 0:
        raise BackendUnavailable(
            "the overlay backend needs root (it mounts overlayfs in the agent's own mount "
            "namespace); as an ordinary user use backend='fuse' (or 'copy')")
    try:
        with open("/proc/filesystems") as f:
            known = any(line.split()[-1:] == ["overlay"] for line in f)
    except OSError:
        known = False
    if not known:
        raise BackendUnavailable("the overlay backend needs overlayfs, which is not in "
                                 "/proc/filesystems (modprobe overlay)")


def _copy_xattrs(src: str, dst: str) -> None:
    try:
        names = os.listxattr(src, follow_symlinks=False)
    except OSError:
        return
    for name in names:
        if name.startswith("trusted.overlay.") and name not in _KEEP_OVERLAY_XATTRS:
            continue
        try:
            os.setxattr(dst, name, os.getxattr(src, name, follow_symlinks=False),
                        follow_symlinks=False)
        except OSError as exc:
            if name in _KEEP_OVERLAY_XATTRS:
                raise  # without it the frozen layer would show a different tree
            log.debug("overlay_xattr_skipped", path=dst, xattr=name, error=str(exc))


def freeze_layer(src: Path, dst: Path) -> None:
    """Copy upper layer ``src`` to a new directory ``dst``, exactly as overlayfs reads it:
    whiteouts (0/0 character devices), opaque and redirected directories, modes,
    owners, times, xattrs; regular files by reflink where the filesystem has them."""
    from .._fileops import Reflinks, copy_file

    reflinks = Reflinks()
    dirs: list[tuple[str, os.stat_result]] = []
    os.mkdir(dst, 0o700)
    dirs.append((os.fspath(dst), os.stat(src)))
    _copy_xattrs(os.fspath(src), os.fspath(dst))
    stack = [(os.fspath(src), os.fspath(dst))]
    while stack:
        s_dir, d_dir = stack.pop()
        with os.scandir(s_dir) as it:
            for de in it:
                d = os.path.join(d_dir, de.name)
                st = de.stat(follow_symlinks=False)
                mode = st.st_mode
                if stat.S_ISDIR(mode):
                    os.mkdir(d, 0o700)
                    _copy_xattrs(de.path, d)
                    dirs.append((d, st))
                    stack.append((de.path, d))
                    continue
                if stat.S_ISREG(mode):
                    copy_file(de.path, d, st, reflinks=reflinks, as_root=True)
                    continue
                if stat.S_ISLNK(mode):
                    os.symlink(os.readlink(de.path), d)
                elif stat.S_ISFIFO(mode):
                    os.mkfifo(d, stat.S_IMODE(mode))
                elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
                    os.mknod(d, mode, st.st_rdev)  # a whiteout: c 0 0
                else:
                    continue  # sockets: not tracked
                _copy_xattrs(de.path, d)
                os.lchown(d, st.st_uid, st.st_gid)
                os.utime(d, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
    for d, st in reversed(dirs):
        os.chmod(d, stat.S_IMODE(st.st_mode))
        os.lchown(d, st.st_uid, st.st_gid)
        os.utime(d, ns=(st.st_atime_ns, st.st_mtime_ns))


class OverlayBackend(CopyBackend):
    """Branches as kernel overlay mounts; commits as on the copy backend. See the module
    docstring."""

    name = "overlay"
    disk_limits: str | None = None
    #: A top-level branch's lower layer is the live base.
    isolates_outside_writes = False
    keeps_branches = False
    #: Each branch is a mount of its own (sessions cannot fork here: see _session.py).
    mount_per_branch = True

    def __init__(self) -> None:
        super().__init__()
        self._lowers: dict[str, list[Path]] = {}

    @staticmethod
    def check_available() -> None:
        """What this host lacks for the backend (root, overlayfs), as BackendUnavailable;
        ``open_workspace`` asks before it creates anything."""
        check_available()

    # -- layout ----------------------------------------------------------------------------

    def _top(self) -> Path:
        return self._require()[1] / "overlay"

    def _branch_dir(self, name: str) -> Path:
        return self._top() / "branches" / name

    @property
    def views_root(self) -> Path:
        """The directory holding every branch's view (sessions bind views from here)."""
        return self._top() / "branches"

    def exists(self, name: str) -> bool:
        d = self._branch_dir(name)
        return (d / "upper").is_dir() and (d / "manifest.json").is_file()

    def _lowers_of(self, name: str) -> list[Path]:
        lowers = self._lowers.get(name)
        if lowers is None:
            raw = json.loads((self._branch_dir(name) / "lowers.json").read_bytes())
            lowers = [Path(p) for p in raw]
            self._lowers[name] = lowers
        return lowers

    def _mount_branch(self, name: str) -> None:
        d = self._branch_dir(name)
        if not _mounted(d / "tree"):
            _mount(self._lowers_of(name), d / "upper", d / "work", d / "tree")

    # -- Backend protocol -----------------------------------------------------------------

    async def open(self, root: Path, state_dir: Path) -> None:
        check_available()
        self._root, self._state = root, state_dir

        def run() -> None:
            top = state_dir / "overlay"
            (top / "branches").mkdir(parents=True, exist_ok=True)
            (top / "layers").mkdir(parents=True, exist_ok=True)
            _journal.recover(state_dir / "journal")
            self._probe(top)
            for d in sorted((top / "branches").iterdir()):
                if self.exists(d.name):
                    self._mount_branch(d.name)  # left mounted by an agent that died: kept
                else:  # a commit's leftovers (its upper layer went with the commit)
                    _umount(d / "tree")
                    _make_writable_and_remove(d)
            self._drop_unused_layers()

        try:
            await anyio.to_thread.run_sync(run)
        except BaseException:
            self._root = self._state = None
            raise

    def _probe(self, top: Path) -> None:
        """Mount a throwaway overlay in the state directory: the reason it cannot, named."""
        probe = top / f".probe-{uuid.uuid4().hex[:8]}"
        try:
            for sub in ("lower", "upper", "work", "tree"):
                (probe / sub).mkdir(parents=True)
            try:
                _mount([probe / "lower"], probe / "upper", probe / "work", probe / "tree")
            except OSError as exc:
                raise BackendUnavailable(
                    f"the overlay backend cannot mount overlayfs with its layers in {top} "
                    f"({exc.strerror}); an upper layer cannot live on overlayfs, FUSE or NFS: "
                    "put the state directory (state_dir=) on a local disk, or use "
                    "backend='fuse'") from exc
            _umount(probe / "tree")
        finally:
            _make_writable_and_remove(probe)

    def _create_sync(self, name: str, parent: str | None) -> Path:
        root, _ = self._require()
        d = self._branch_dir(name)
        d.mkdir(parents=True)
        try:
            manifest = self._scan(parent)
            for sub in ("upper", "work", "tree"):
                (d / sub).mkdir()
            if parent is None:
                lowers = [root]
            else:
                layer = self._top() / "layers" / uuid.uuid4().hex
                freeze_layer(self._branch_dir(parent) / "upper", layer)
                lowers = [layer, *self._lowers_of(parent)]
            (d / "lowers.json").write_text(json.dumps([os.fspath(p) for p in lowers]))
            data = json.dumps({p: e.to_json() for p, e in manifest.items()})
            (d / "manifest.json").write_text(data)
            (d / "parent.json").write_text(json.dumps(parent))
            self._lowers[name] = lowers
            _mount(lowers, d / "upper", d / "work", d / "tree")
        except BaseException:
            self._lowers.pop(name, None)
            _umount(d / "tree")
            _make_writable_and_remove(d)
            self._drop_unused_layers()
            raise
        self._manifests[name] = manifest
        self._parents[name] = parent
        return d / "tree"

    def _released_by_commit(self, name: str) -> list[Path]:
        """The upper layer only: the journal must not walk into the mount (every base
        file it deleted there would become a whiteout); :meth:`_release` unmounts and
        removes the rest, or the next :meth:`open` does after a crash."""
        return [self._branch_dir(name) / "upper"]

    def _release(self, name: str) -> None:
        d = self._branch_dir(name)
        _umount(d / "tree")
        self._lowers.pop(name, None)
        super()._release(name)
        self._drop_unused_layers()

    def _drop_unused_layers(self) -> None:
        """Remove the frozen layers no branch stacks any more."""
        top = self._top()
        used: set[str] = set()
        for d in (top / "branches").iterdir():
            try:
                used.update(json.loads((d / "lowers.json").read_bytes()))
            except (OSError, ValueError):
                continue
        for layer in (top / "layers").iterdir():
            if os.fspath(layer) not in used:
                _make_writable_and_remove(layer)

    async def aclose(self) -> None:
        if self._state is not None:
            top = self._top()

            def run() -> None:
                for d in (top / "branches").iterdir():
                    _umount(d / "tree")

            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(run)
        self._lowers.clear()
        await super().aclose()
