"""One exception tree: every exception class defined anywhere in the package is a
:class:`~branchagent.BranchAgentError`, and the errors of llm, serve and the CLI are
the tree's own classes, re-exported where they always were."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import types
from collections.abc import Iterator

import pytest

import branchagent as ba
import branchagent_strategies
from branchagent import exceptions


def _modules() -> Iterator[types.ModuleType]:
    """Every module of branchagent and branchagent_strategies that imports here (a module
    that needs an optional dependency this environment lacks is skipped; ``__main__``
    modules would run)."""
    for pkg in (ba, branchagent_strategies):
        yield pkg
        for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            if info.name.rpartition(".")[2] == "__main__":
                continue
            try:
                yield importlib.import_module(info.name)
            except ImportError as exc:
                if (exc.name or "").partition(".")[0] in ("branchagent", "branchagent_strategies"):
                    raise
                continue  # an optional dependency (pyfuse3, starlette, ...) is missing


def _defined_exceptions() -> dict[str, type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    for mod in _modules():
        for value in vars(mod).values():
            if (inspect.isclass(value) and issubclass(value, BaseException)
                    and value.__module__ == mod.__name__):
                found[f"{value.__module__}.{value.__qualname__}"] = value
    return found


def _stands_in_for_user_code(name: str) -> bool:
    # The conformance kit raises private exceptions *as a user's code would*, to check
    # that a branch aborts on an error that is not ours; those must not be ours.
    return name.startswith("branchagent.testing") and name.rpartition(".")[2].startswith("_")


def test_the_walk_finds_every_part_of_the_tree() -> None:
    found = _defined_exceptions()
    assert "branchagent.exceptions.BranchAgentError" in found
    assert "branchagent.exceptions.UsageError" in found
    assert len(found) >= len(exceptions.__all__)


def test_every_exception_defined_in_the_package_is_a_branchagent_error() -> None:
    outside = sorted(name for name, cls in _defined_exceptions().items()
                     if not issubclass(cls, ba.BranchAgentError)
                     and not _stands_in_for_user_code(name))
    assert outside == [], "exceptions outside the BranchAgentError tree"


def test_every_exception_is_defined_in_the_exceptions_module() -> None:
    elsewhere = sorted(name for name, cls in _defined_exceptions().items()
                       if cls.__module__ != exceptions.__name__
                       and not _stands_in_for_user_code(name))
    assert elsewhere == [], "the tree is drawn in branchagent.exceptions: define them there"


def test_llm_serve_and_cli_reexport_the_tree_s_classes() -> None:
    from branchagent import cli, llm, serve
    from branchagent.llm import _errors

    for mod in (llm, _errors):
        assert mod.LLMError is exceptions.LLMError
        assert mod.ApplyError is exceptions.ApplyError
        assert mod.SourceError is exceptions.SourceError
    assert serve.ServeError is exceptions.ServeError
    assert cli.UsageError is exceptions.UsageError


@pytest.mark.parametrize(
    ("cls", "parent", "builtin"),
    [
        (exceptions.LLMError, ba.BranchAgentError, None),
        (exceptions.ApplyError, exceptions.LLMError, ValueError),
        (exceptions.SourceError, exceptions.LLMError, RuntimeError),
        (exceptions.ServeError, ba.BranchAgentError, None),
        (exceptions.UsageError, ba.BranchAgentError, ValueError),
    ],
)
def test_new_members_of_the_tree(cls: type[BaseException], parent: type[BaseException],
                                 builtin: type[BaseException] | None) -> None:
    assert issubclass(cls, parent)
    if builtin is not None:
        assert issubclass(cls, builtin)


def test_serve_error_keeps_its_fields() -> None:
    exc = exceptions.ServeError(502, "upstream failed", "upstream_error")
    assert (exc.status, exc.message, exc.type, exc.code) == (
        502, "upstream failed", "upstream_error", "upstream_error")
    assert str(exc) == "upstream failed"
    assert exceptions.ServeError(400, "bad", "invalid_request_error", "invalid_request"
                                 ).code == "invalid_request"
