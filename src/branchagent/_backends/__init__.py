"""Backend registry: built-ins and plugins through the ``branchagent.backends`` entry points."""

from __future__ import annotations

from importlib.metadata import entry_points

from .._branch import Backend
from ..exceptions import BackendNotFound

__all__ = ["available_backends", "load_backend"]

GROUP = "branchagent.backends"

_INSTALL_HINTS = {
    "fuse": "the FUSE backend needs pyfuse3 (pip install 'branchagent[fuse]', which builds "
    "against libfuse3: apt-get install fuse3 libfuse3-dev pkg-config); backend='copy' "
    "works anywhere",
    "overlay": "the overlay backend is not built yet in this version; use backend='copy'",
}


def available_backends() -> list[str]:
    """Names registered in the ``branchagent.backends`` entry-point group."""
    return sorted({ep.name for ep in entry_points(group=GROUP)})


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
