"""Backend registry: built-ins and plugins through the ``branchagent.backends`` entry points."""

from __future__ import annotations

from importlib.metadata import entry_points

from .._branch import Backend
from .._log import get_logger
from ..exceptions import BackendNotFound, BackendUnavailable

__all__ = ["available_backends", "default_backend", "load_backend"]

log = get_logger("branchagent.workspace")

GROUP = "branchagent.backends"

_INSTALL_HINTS = {
    "fuse": "the FUSE backend needs pyfuse3 (pip install 'branchagent[fuse]', which builds "
    "against libfuse3: apt-get install fuse3 libfuse3-dev pkg-config); backend='copy' "
    "works anywhere",
}


def available_backends() -> list[str]:
    """Names registered in the ``branchagent.backends`` entry-point group."""
    return sorted({ep.name for ep in entry_points(group=GROUP)})


def default_backend() -> str:
    """``"fuse"`` where it can work for this user on this host, else ``"copy"``.

    The reason for falling back (pyfuse3 missing, /dev/fuse not accessible to this user,
    fusermount3 not setuid, ...) is logged, with its fix. A backend asked for by name is
    never replaced: ``open_workspace(path, backend="fuse")`` raises that reason instead.
    """
    from .fuse._backend import check_available  # no pyfuse3 import: only looks

    try:
        check_available()
    except BackendUnavailable as exc:
        log.warning("backend_fallback", wanted="fuse", chosen="copy", reason=str(exc))
        return "copy"
    return "fuse"


def load_backend(name: str) -> Backend:
    """Instantiate the backend registered under ``name``."""
    matches = [ep for ep in entry_points(group=GROUP) if ep.name == name]
    if not matches:
        hint = _INSTALL_HINTS.get(name, f"registered backends: {', '.join(available_backends())}")
        raise BackendNotFound(f"no backend named {name!r}: {hint}")
    factory = matches[0].load()
    backend = factory()
    if not isinstance(backend, Backend):
        raise BackendNotFound(f"entry point {name!r} ({matches[0].value}) is not a Backend")
    return backend
