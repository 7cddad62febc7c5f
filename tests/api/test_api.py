"""The public surface: __all__, the exception tree drawn in its docstring, backend selection."""

from __future__ import annotations

import inspect
import os
import re
import types
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

import pytest

import branchagent as ba
from branchagent import exceptions
from branchagent._backends.copy import CopyBackend

# -- __all__ -------------------------------------------------------------------------


def test_all_names_exist() -> None:
    missing = [name for name in ba.__all__ if not hasattr(ba, name)]
    assert missing == []


def test_all_is_sorted_and_unique() -> None:
    assert list(ba.__all__) == sorted(set(ba.__all__))


def test_every_public_attribute_is_in_all() -> None:
    public = {
        name
        for name, value in vars(ba).items()
        if not name.startswith("_")
        and not isinstance(value, types.ModuleType)
        and type(value).__module__ != "__future__"  # `from __future__ import annotations`
    }
    assert public - set(ba.__all__) == set()


def test_exceptions_all_matches_module() -> None:
    defined = {
        name
        for name, value in vars(exceptions).items()
        if inspect.isclass(value) and issubclass(value, BaseException)
        and value.__module__ == exceptions.__name__
    }
    assert set(exceptions.__all__) == defined
    assert list(exceptions.__all__) == sorted(exceptions.__all__)
    # Every exception is re-exported at the top level, as the same object.
    for name in defined:
        assert getattr(ba, name) is getattr(exceptions, name), name
        assert name in ba.__all__


# -- the exception tree --------------------------------------------------------------

_TREE_LINE = re.compile(r"^(?P<prefix>[ │├└─]*)(?P<name>[A-Za-z]\w*)\s*(?:\((?P<builtin>\w+)\))?$")


def _parse_tree(doc: str) -> dict[str, tuple[str | None, str | None]]:
    """``{name: (parent, builtin)}`` from the box drawing in ``doc``."""
    lines = doc.split("::", 1)[1].splitlines()
    body = [line for line in lines if line.strip()]
    indent = len(body[0]) - len(body[0].lstrip())
    tree: dict[str, tuple[str | None, str | None]] = {}
    stack: list[str] = []
    for line in body:
        if len(line) - len(line.lstrip()) < indent and line.lstrip()[0] not in "│├└":
            break  # prose after the drawing
        m = _TREE_LINE.match(line[indent:].rstrip())
        assert m is not None, f"cannot parse tree line {line!r}"
        depth, rem = divmod(len(m["prefix"]), 4)
        assert rem == 0, f"misaligned tree line {line!r}"
        del stack[depth:]
        assert len(stack) == depth, f"tree line {line!r} skips a level"
        parent = stack[-1] if stack else None
        tree[m["name"]] = (parent, m["builtin"])
        stack.append(m["name"])
    return tree


def test_docstring_tree_parses() -> None:
    assert exceptions.__doc__ is not None
    tree = _parse_tree(exceptions.__doc__)
    assert tree["BranchAgentError"] == (None, None)
    assert tree["BranchInvalidated"] == ("BranchClosed", None)
    assert tree["CommitFailed"] == ("BackendError", "OSError")


def test_docstring_tree_matches_the_classes() -> None:
    assert exceptions.__doc__ is not None
    tree = _parse_tree(exceptions.__doc__)
    ours = {name: getattr(exceptions, name) for name in exceptions.__all__}
    assert set(tree) == set(ours), "the drawing and the module define different exceptions"
    for name, (parent, builtin) in tree.items():
        cls = ours[name]
        own_bases = [b for b in cls.__bases__ if b in ours.values()]
        other_bases = [b.__name__ for b in cls.__bases__ if b not in ours.values()]
        if parent is None:
            assert own_bases == [], name
            assert other_bases == ["Exception"], name
        else:
            assert own_bases == [ours[parent]], f"{name}: drawn under {parent}, is {own_bases}"
            assert other_bases == ([builtin] if builtin else []), (
                f"{name}: drawn with builtin {builtin}, subclasses {other_bases}"
            )


@pytest.mark.parametrize(
    ("name", "builtin"),
    [
        ("WorkspaceClosed", RuntimeError),
        ("WorkspaceLocked", BlockingIOError),
        ("WorkspaceCorrupt", RuntimeError),
        ("BackendNotFound", LookupError),
        ("BackendUnavailable", RuntimeError),
        ("CommitFailed", OSError),
        ("InvalidBranchName", ValueError),
        ("BranchExists", FileExistsError),
        ("BranchNotFound", LookupError),
        ("BranchClosed", RuntimeError),
        ("BranchInvalidated", RuntimeError),
        ("PathEscapeError", ValueError),
        ("IsolationUnavailable", RuntimeError),
        ("StrategyNotFound", LookupError),
    ],
)
def test_leaves_subclass_builtins(name: str, builtin: type[BaseException]) -> None:
    cls = getattr(ba, name)
    assert issubclass(cls, ba.BranchAgentError)
    assert issubclass(cls, builtin)


def test_every_exception_is_a_branchagent_error() -> None:
    for name in exceptions.__all__:
        assert issubclass(getattr(exceptions, name), ba.BranchAgentError), name
    assert issubclass(ba.BranchInvalidated, ba.BranchClosed)
    assert issubclass(ba.BranchClosed, ba.BranchError)
    assert issubclass(ba.ConflictError, ba.BranchError)


def test_exceptions_carry_their_details() -> None:
    err = ba.ConflictError("both changed", ("a", "b/c"))
    assert err.paths == ("a", "b/c")
    assert ba.ConflictError("x").paths == ()
    failed = ba.CommitFailed(28, "commit rolled back", "/ws/f")
    assert failed.errno == 28
    assert failed.filename == "/ws/f"
    assert isinstance(failed, OSError)


# -- backend selection ---------------------------------------------------------------


def _listing(path: Path) -> set[str]:
    return {os.path.relpath(os.path.join(d, n), path)
            for d, dirs, files in os.walk(path) for n in [*dirs, *files]}


@pytest.mark.anyio
async def test_default_backend_missing_says_what_to_do(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Where pyfuse3 is not installed the default backend has no entry point: simulate that.
    import branchagent._backends as registry

    def without_fuse(*, group: str) -> list[EntryPoint]:
        return [ep for ep in entry_points(group=group) if ep.name != "fuse"]

    monkeypatch.setattr(registry, "entry_points", without_fuse)
    before_ws, before_parent = _listing(repo), set(os.listdir(repo.parent))
    with pytest.raises(ba.BackendNotFound) as info:
        async with ba.open_workspace(repo):
            pytest.fail("opened a workspace with a backend that does not exist")
    assert isinstance(info.value, LookupError)
    msg = str(info.value)
    assert "'fuse'" in msg
    assert "backend='copy'" in msg
    assert "pyfuse3" in msg
    assert _listing(repo) == before_ws
    assert set(os.listdir(repo.parent)) == before_parent


@pytest.mark.anyio
async def test_default_backend_is_fuse_where_it_is_installed(repo: Path) -> None:
    if "fuse" not in ba.available_backends():
        pytest.skip("the fuse backend is not installed: pip install 'branchagent[fuse]'")
    async with ba.open_workspace(repo) as ws:
        assert ws.backend.name == "fuse"


@pytest.mark.anyio
async def test_unknown_backend_lists_the_registered_ones(repo: Path) -> None:
    before_parent = set(os.listdir(repo.parent))
    with pytest.raises(ba.BackendNotFound) as info:
        async with ba.open_workspace(repo, backend="no-such-backend"):
            pytest.fail("opened a workspace with a backend that does not exist")
    msg = str(info.value)
    assert "'no-such-backend'" in msg
    for name in ba.available_backends():
        assert name in msg
    assert set(os.listdir(repo.parent)) == before_parent


@pytest.mark.anyio
async def test_not_a_backend_is_refused(repo: Path) -> None:
    with pytest.raises(ba.BackendNotFound, match="Backend instance"):
        async with ba.open_workspace(repo, backend=object()):  # type: ignore[arg-type]
            pytest.fail("opened a workspace with a non-backend")


def test_copy_backend_is_registered() -> None:
    assert "copy" in ba.available_backends()
    assert isinstance(ba.load_backend("copy"), CopyBackend)
    with pytest.raises(ba.BackendNotFound):
        ba.load_backend("no-such-backend")


@pytest.mark.anyio
async def test_backend_instance_is_accepted(repo: Path, tmp_path: Path) -> None:
    backend = CopyBackend()
    assert isinstance(backend, ba.Backend)
    async with ba.open_workspace(repo, backend=backend, state_dir=tmp_path / "state") as ws:
        assert ws.backend is backend
        assert ws.state_dir == tmp_path / "state"
        async with ws.branch() as b:
            (b.path / "new.txt").write_text("hello\n")
    assert (repo / "new.txt").read_text() == "hello\n"


@pytest.mark.anyio
async def test_workspace_must_be_a_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        async with ba.open_workspace(tmp_path / "missing", backend="copy"):
            pytest.fail("opened a missing directory")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileNotFoundError):
        async with ba.open_workspace(tmp_path / "file", backend="copy"):
            pytest.fail("opened a file as a workspace")
