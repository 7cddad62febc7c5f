"""The default backend: a pyfuse3 copy-on-write filesystem served by its own process.

One mount per workspace (``<state>/fuse/mnt``); each branch is a directory
``@<id>`` in it. See ``_layers`` (copy-on-write layers), ``_store`` (forks and
commits), ``_fs`` (the pyfuse3 handlers), ``_server`` (the process) and
``_backend`` (the agent side). Importing this package does not import pyfuse3:
``FuseBackend.open`` says what is missing when FUSE cannot run here.
"""

from __future__ import annotations

from ._backend import FuseBackend

__all__ = ["FuseBackend"]
