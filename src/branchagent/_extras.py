"""Optional dependencies: which of an extra's modules this interpreter lacks.

Each extra of the package names what it brings (``fuse``: pyfuse3; ``serve``:
starlette, uvicorn and httpx; ``llm``: openai). A feature that needs one asks
:func:`missing_modules` first and says, in one line, which extra to install.
"""

from __future__ import annotations

import importlib.util

__all__ = ["missing_modules"]


def missing_modules(*names: str) -> list[str]:
    """Those of the top-level modules *names* that cannot be imported here (only looks)."""
    missing = []
    for name in names:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    return missing
