"""MkDocs hooks: fill documentation from the source at build time.

``<!-- branchagent:exception-tree -->`` in a page becomes the tree drawn in
the docstring of ``src/branchagent/exceptions.py`` (the one place it is
maintained), as a code block. The source is parsed, not imported, so the
docs build needs nothing but the file.
"""

from __future__ import annotations

import ast
import logging
import textwrap
from pathlib import Path
from typing import Any

log = logging.getLogger("mkdocs.hooks.branchagent")

ROOT = Path(__file__).resolve().parent.parent
EXCEPTIONS = ROOT / "src" / "branchagent" / "exceptions.py"
MARKER = "<!-- branchagent:exception-tree -->"


def exception_tree() -> str:
    """The indented literal block after the first ``::`` of the exceptions docstring."""
    doc = ast.get_docstring(ast.parse(EXCEPTIONS.read_text(encoding="utf-8"))) or ""
    lines = doc.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.rstrip().endswith("::")) + 1
    except StopIteration:
        raise ValueError(f"no '::' literal block in the docstring of {EXCEPTIONS}") from None
    block: list[str] = []
    for line in lines[start:]:
        if line.strip() and not line.startswith((" ", "\t")):
            break
        block.append(line)
    text = textwrap.dedent("\n".join(block)).strip("\n")
    if not text:
        raise ValueError(f"empty exception tree in the docstring of {EXCEPTIONS}")
    return text


def on_page_markdown(markdown: str, **_kwargs: Any) -> str:
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, f"```text\n{exception_tree()}\n```")
