"""Test-only launcher of the FUSE filesystem process with a fault hook installed.

``python tests/_fuse_fault.py SPEC --root ... --state ...`` installs the hook
``SPEC`` (see :func:`install_fault_hook`) into :mod:`branchagent._journal`,
then runs the server's own ``main`` with the remaining arguments. The shipped
server reads no hook from anywhere: tests inject this one by starting the server
through it, with ``FuseBackend(server=fault_server(SPEC))``.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path

#: Crash tests pass the spec to their agent processes in this variable (tests only).
FAULT_ENV = "BRANCHAGENT_FUSE_FAULT"
LAUNCHER = Path(__file__).resolve()

log = logging.getLogger("branchagent.fuse")


def fault_server(spec: str | None) -> list[str] | None:
    """The command that starts the filesystem process with fault ``spec`` (None: none)."""
    return None if not spec else [sys.executable, os.fspath(LAUNCHER), spec]


def _publish(path: str, text: str) -> None:
    """Write ``path`` whole: a test polling for it never reads it half-written."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def install_fault_hook(spec: str) -> None:
    """Act at the ``n``-th journal step of this process.

    ``spec`` is ``kill:<n>`` (SIGKILL this process there), ``mark:<n>:<file>``
    (write the step's name into ``<file>`` and go on), or ``wait:<n>:<file>``
    (write ``<file>.reached``, then wait up to a minute for ``<file>`` to exist).
    """
    from branchagent import _journal

    action, _, rest = spec.partition(":")
    count, _, arg = rest.partition(":")
    target = int(count)
    if action not in ("kill", "mark", "wait") or target < 1 or (action != "kill" and not arg):
        raise ValueError(f"bad fault hook {spec!r}")
    seen = [0]

    def hook(step: str) -> None:
        seen[0] += 1
        if seen[0] != target:
            return
        log.warning("fault hook: %s at journal step %d (%s)", action, target, step)
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "mark":
            _publish(arg, step)
        else:
            _publish(arg + ".reached", step)
            deadline = time.monotonic() + 60
            while not os.path.exists(arg) and time.monotonic() < deadline:
                time.sleep(0.01)

    _journal.FAULT_HOOK = hook


def main(argv: list[str]) -> None:
    from branchagent._backends.fuse import _server

    install_fault_hook(argv[0])
    _server.main(argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
