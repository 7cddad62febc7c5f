"""The package's layers: no module imports a layer above its own, and no import cycle appears.

Every module of ``branchagent`` and ``branchagent_strategies`` is read with ``ast``
(nothing is imported), and every import it makes is collected: ``import x.y``,
``from x import y``, relative ones (``from . import y``, ``from ..m import y``), and
those inside functions. ``from p import name`` counts as importing the module
``p.name`` when there is one, else ``p``; a module that does not exist counts as
nothing (the import fails when it runs, and other tests see that). Importing a
submodule does not count as importing the packages above it (Python runs their
``__init__`` too, but a layer map that counted it would put every module above the
root package's re-exports).

Imports under ``if TYPE_CHECKING:`` are exempt from both rules: they never run, and
they only name types for annotations (a protocol naming what ``Branch.run`` returns,
the strategy kit naming ``Workspace``). Every other import, function-local ones
included, runs and is checked.

A module belongs to the layer whose prefix names it or a package above it (the
longest prefix wins); the root package ``branchagent`` itself is matched exactly, so
a new module placed nowhere fails :func:`test_every_module_has_a_layer` until it is
added to :data:`LAYERS`.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from pathlib import Path

import attrs

REPO = Path(__file__).resolve().parents[2]
PACKAGES = {
    "branchagent": REPO / "src" / "branchagent",
    "branchagent_strategies": REPO / "strategies" / "branchagent_strategies",
}
#: Matched exactly, not as a prefix: the facade that re-exports everything.
ROOT = "branchagent"

#: Lowest first. A module may import its own layer and those below it, never one above.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("values", (
        "branchagent._log",
        "branchagent._extras",
        "branchagent.exceptions",
        "branchagent._limits",
        "branchagent._events",
        "branchagent._types",
        "branchagent._rwlock",
    )),
    ("branch model", (
        "branchagent._protocols",
        "branchagent._branch",
        "branchagent._manifest",
        "branchagent._diff",
        "branchagent._journal",
        "branchagent._fileops",
        "branchagent._merge",
    )),
    ("sandbox", ("branchagent._sandbox",)),
    ("backends", ("branchagent._backends",)),
    # What this host can do (FUSE, cgroups): the workspace asks it which backend to default to.
    ("doctor", ("branchagent._doctor",)),
    # A session is a process in a branch, made and ended by the workspace.
    ("workspace", ("branchagent._workspace", "branchagent._session")),
    ("strategy kit", ("branchagent.strategy",)),
    ("llm", ("branchagent.llm",)),
    ("built-in strategies", ("branchagent_strategies",)),
    ("facade", (ROOT,)),
    ("serve", ("branchagent.serve",)),
    ("cli", ("branchagent.cli", "branchagent.__main__")),
    # The conformance suite: it drives the whole public API, and no shipped module may
    # import it (it needs hypothesis, a test-only dependency).
    ("testing", ("branchagent.testing",)),
]

# Allow-lists of what the tree held when this test was written (the end of issue 12's
# work), so that the test fails on anything NEW. Each entry must still be true
# (test_allow_lists_are_not_stale): when one is fixed, delete it here, so these lists only
# ever shrink. Do not add to them.

#: (importer, imported): a lower layer importing an upper one. Empty: the built-ins import
#: Branch / BranchState from branchagent.strategy (not the facade), llm.solve finds
#: BestOfN / Speculate through the registry (get_strategy), and the facade imports the
#: built-ins lazily (its __getattr__), so neither package's import needs the other's.
KNOWN_UPWARD: set[tuple[str, str]] = set()
#: Import cycles (strongly connected components of the module graph), by their modules.
#: Empty: the kit's private modules form a DAG (_root, holding the option checks and the
#: AbstractStrategy that _candidates recognises, is below _values, _candidates, _executor,
#: _arena, _base and _registry).
KNOWN_CYCLES: list[frozenset[str]] = []


@attrs.frozen
class Import:
    importer: str
    imported: str
    file: Path
    line: int
    type_checking: bool

    def where(self) -> str:
        return f"{self.file.relative_to(REPO)}:{self.line}"


def _modules() -> dict[str, Path]:
    """Every module of the packages by dotted name (a package is its ``__init__.py``)."""
    out: dict[str, Path] = {}
    for top, root in PACKAGES.items():
        for path in sorted(root.rglob("*.py")):
            parts = [top, *path.relative_to(root).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement, anywhere, and whether only TYPE_CHECKING runs it."""
    stack: list[tuple[ast.AST, bool]] = [(tree, False)]
    while stack:
        node, tc = stack.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node, tc
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend((child, True) for child in node.body)
            stack.extend((child, tc) for child in node.orelse)
        else:
            stack.extend((child, tc) for child in ast.iter_child_nodes(node))


def _imports(modules: Mapping[str, Path]) -> list[Import]:
    out: list[Import] = []
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node, tc in _import_nodes(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package
                    for _ in range(node.level - 1):
                        anchor = anchor.rpartition(".")[0]
                    base = f"{anchor}.{base}" if base else anchor
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    names.append(sub if sub in modules else base)
            for name in names:
                if name in modules and name != module:
                    out.append(Import(module, name, path, node.lineno, tc))
    return out


def _layer(module: str) -> int | None:
    best: tuple[int, int] | None = None  # (prefix length, layer index)
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            matches = module == prefix or (prefix != ROOT and module.startswith(prefix + "."))
            if matches and (best is None or len(prefix) > best[0]):
                best = (len(prefix), index)
    return None if best is None else best[1]


def _upward(imports: list[Import]) -> list[Import]:
    out = []
    for imp in imports:
        low, high = _layer(imp.importer), _layer(imp.imported)
        if not imp.type_checking and low is not None and high is not None and high > low:
            out.append(imp)
    return out


def _cycles(imports: list[Import]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan), runtime imports."""
    graph: dict[str, set[str]] = {}
    for imp in imports:
        graph.setdefault(imp.importer, set())
        graph.setdefault(imp.imported, set())
        if not imp.type_checking:
            graph[imp.importer].add(imp.imported)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[frozenset[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        # Iterative: (node, its successors still to visit).
        work: list[tuple[str, Iterator[str]]] = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            for succ in successors:
                if succ not in index:
                    index[succ] = low[succ] = len(index)
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(sorted(graph[succ]))))
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        out.append(frozenset(component))
    return out


def _describe_cycle(component: frozenset[str], imports: list[Import]) -> str:
    edges = sorted({f"{i.importer} -> {i.imported} ({i.where()})" for i in imports
                    if not i.type_checking and i.importer in component
                    and i.imported in component})
    return "\n  ".join([", ".join(sorted(component)) + ":", *edges])


# -- the tests --------------------------------------------------------------------------------


def test_every_module_has_a_layer() -> None:
    unplaced = sorted(m for m in _modules() if _layer(m) is None)
    assert not unplaced, f"modules in no layer (add them to LAYERS): {unplaced}"


def test_no_lower_layer_imports_an_upper_one() -> None:
    found = sorted({
        f"  {imp.where()}: {imp.importer} ({LAYERS[_layer(imp.importer) or 0][0]}) imports "
        f"{imp.imported} ({LAYERS[_layer(imp.imported) or 0][0]})"
        for imp in _upward(_imports(_modules()))
        if (imp.importer, imp.imported) not in KNOWN_UPWARD})
    assert not found, "imports of an upper layer:\n" + "\n".join(found)


def test_no_new_import_cycle() -> None:
    imports = _imports(_modules())
    new = [c for c in _cycles(imports) if not any(c <= known for known in KNOWN_CYCLES)]
    assert not new, "import cycles:\n" + "\n".join(
        "  " + _describe_cycle(c, imports) for c in new)


def test_allow_lists_are_not_stale() -> None:
    """A fixed entry must leave its allow-list, so that it cannot come back unnoticed."""
    imports = _imports(_modules())
    upward = {(imp.importer, imp.imported) for imp in _upward(imports)}
    cycles = _cycles(imports)
    fixed = [f"KNOWN_UPWARD {pair}" for pair in sorted(KNOWN_UPWARD - upward)]
    fixed += [f"KNOWN_CYCLES {sorted(known)}" for known in KNOWN_CYCLES
              if not any(known <= c for c in cycles)]
    assert not fixed, "fixed, so delete from the allow-list: " + "; ".join(fixed)


def test_the_checker_sees_what_it_should(tmp_path: Path) -> None:
    """The parser and Tarjan on a small made-up package: relative, function-local,
    TYPE_CHECKING and ``from . import x`` imports, and a cycle."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from . import a\n")
    (pkg / "a.py").write_text("def f():\n    from .b import g\n")
    (pkg / "b.py").write_text(
        "from typing import TYPE_CHECKING\nimport pkg.c\nif TYPE_CHECKING:\n    from . import d\n"
        "def g(): ...\n")
    (pkg / "c.py").write_text("from pkg import a\n")
    (pkg / "d.py").write_text("import os\n")
    modules = {"pkg": pkg / "__init__.py", **{f"pkg.{n}": pkg / f"{n}.py" for n in "abcd"}}
    got = {(i.importer, i.imported, i.type_checking) for i in _imports(modules)}
    assert got == {("pkg", "pkg.a", False), ("pkg.a", "pkg.b", False),
                   ("pkg.b", "pkg.c", False), ("pkg.b", "pkg.d", True),
                   ("pkg.c", "pkg.a", False)}
    assert _cycles(_imports(modules)) == [frozenset({"pkg.a", "pkg.b", "pkg.c"})]
