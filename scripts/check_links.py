"""Check that every internal link of a built site resolves.

Usage: ``python scripts/check_links.py SITE_DIR`` (``make docs`` runs it on ``site/``).

Every ``href`` and ``src`` in every ``.html`` file under SITE_DIR is read; one that
names another scheme or host (``https:``, ``mailto:``, ``//host``) is external and
skipped. An internal one must name a file in the site (a directory counts when it holds
``index.html``), and its ``#fragment``, if any, an ``id`` (or ``name``) in the page it
names. Exit status 0 when every link resolves; 1 with one line per broken link
(``page: link: why``); 2 for a bad SITE_DIR.
"""

from __future__ import annotations

import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

__all__ = ["broken_links", "main"]


class _Page(HTMLParser):
    """The links (href, src) and the anchors (id, name) of one HTML page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.links: list[str] = []
        self.anchors: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for key, value in attrs:
            if value is None:
                continue
            if key in ("href", "src"):
                self.links.append(value)
            elif key == "id" or (key == "name" and tag == "a"):
                self.anchors.add(value)


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8", errors="replace"))
    page.close()
    return page


def _target(site: Path, page: Path, path: str) -> Path | None:
    """The file an internal link's path names, or None when there is none."""
    base = site if path.startswith("/") else page.parent
    candidate = (base / unquote(path.lstrip("/"))).resolve()
    if not candidate.is_relative_to(site):
        return None
    if candidate.is_dir():
        candidate = candidate / "index.html"
    return candidate if candidate.is_file() else None


def broken_links(site: Path) -> list[str]:
    """One ``page: link: why`` line per internal link of *site* that does not resolve."""
    site = site.resolve()
    pages: dict[Path, _Page] = {}

    def parsed(path: Path) -> _Page:
        if path not in pages:
            pages[path] = _parse(path)
        return pages[path]

    broken: list[str] = []
    for html in sorted(site.rglob("*.html")):
        for link in parsed(html).links:
            parts = urlsplit(link)
            if parts.scheme or parts.netloc:
                continue  # external (https:, mailto:, data:, //host)
            where = f"{html.relative_to(site)}: {link}"
            target = html if not parts.path else _target(site, html, parts.path)
            if target is None:
                broken.append(f"{where}: no such file in the site")
                continue
            fragment = unquote(parts.fragment)
            if fragment and target.suffix == ".html" and fragment not in parsed(target).anchors:
                broken.append(f"{where}: no anchor #{fragment} in {target.relative_to(site)}")
    return broken


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not Path(args[0]).is_dir():
        print("usage: check_links.py SITE_DIR (a built site: run `mkdocs build` first)",
              file=sys.stderr)
        return 2
    site = Path(args[0])
    broken = broken_links(site)
    for line in broken:
        print(line)
    pages = sum(1 for _ in site.rglob("*.html"))
    if broken:
        print(f"check_links: {len(broken)} broken internal link(s) in {site}", file=sys.stderr)
        return 1
    print(f"check_links: every internal link of {pages} pages resolves", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
