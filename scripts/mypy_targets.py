"""Print the [tool.mypy] files of pyproject.toml that mypy can check now.

mypy refuses a configured directory that is missing (an empty directory is
not in a fresh clone) or holds no .py files yet, so those are left out, and
named on stderr.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path


def _has_python(path: Path) -> bool:
    if path.is_file():
        return True
    return any(path.rglob("*.py")) or any(path.rglob("*.pyi"))


def main() -> int:
    with open("pyproject.toml", "rb") as f:
        files: list[str] = tomllib.load(f)["tool"]["mypy"]["files"]
    keep = [p for p in files if Path(p).exists() and _has_python(Path(p))]
    skipped = [p for p in files if p not in keep]
    if skipped:
        print(f"mypy: nothing to check yet in {', '.join(skipped)}", file=sys.stderr)
    print(" ".join(keep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
