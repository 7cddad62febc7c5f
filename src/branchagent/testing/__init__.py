"""The conformance suite every storage backend passes: :func:`check_backend`.

A backend (the built-in ``copy``, ``fuse`` and ``overlay``, or a third-party
one) is correct when a workspace opened on it behaves like a plain in-memory
model of snapshot isolation. Use it from a plain (sync) test function::

    from branchagent.testing import check_backend

    def test_my_backend() -> None:
        check_backend(MyBackend)  # a zero-argument callable returning a fresh Backend

It runs two kinds of checks and raises ``AssertionError`` on the first failure:

- *targeted checks* (:func:`backend_checks`): one async function per rule of
  the contract (first commit wins, conflicts change nothing, symlinks are
  never followed, modes and mtimes survive a commit, ...);
- a *model check* (:func:`check_model`): a hypothesis state machine that forks
  (nested), edits files in every way a tool does, writes into the base behind
  the workspace's back, commits and aborts at random, and compares after every
  step every open branch and the base with a plain dict model.

Each check can be run on its own, so a test suite can give each its own test
(``tests/workspace/test_conformance.py`` does). Needs hypothesis (``branchagent[test]``).

The model, written independently of the backends' own code:

- a fork sees its parent exactly as at the fork; later changes in the parent
  are invisible to it, and its own writes are invisible to everyone else;
- committing C into P (the base for a top-level branch), with S = P at C's
  fork: C-changed / P-changed are the paths whose type, content and mode (or
  link target) differ between S and C / S and P now. They conflict on a path
  changed on both sides to different entries (both deleted is the same), and
  on a path changed on one side below a path the other side changed into
  something that is not a directory (unless both deleted the path: say both
  ran ``rm -rf d``). A conflict raises ``ConflictError`` and
  changes nothing; otherwise C's entries replace P's on C-changed paths, C is
  COMMITTED, P's other open children and C's open descendants INVALIDATED;
- an abort closes the branch and its open descendants, and changes no tree.
"""

from __future__ import annotations

from ._checks import backend_checks
from ._harness import SEED, BackendFactory, Check
from ._machine import MODEL_SEED, BackendStateMachine, check_model
from ._model import Node, read_tree, write_tree
from ._suite import check_backend

# Public names of the single module this package was, kept importable though not in
# __all__: each targeted check on its own (backend_checks() maps names to them), the
# model's rules and its constants. `X as X` marks each as re-exported (mypy --strict).
# isort: off
from ._checks import (
    check_base_unchanged_before_commit as check_base_unchanged_before_commit,
    check_branch_context_manager as check_branch_context_manager,
    check_changes_kinds as check_changes_kinds,
    check_closed_branch_operations as check_closed_branch_operations,
    check_conflict_changes_nothing as check_conflict_changes_nothing,
    check_delete_then_recreate as check_delete_then_recreate,
    check_diff as check_diff,
    check_directory_rename as check_directory_rename,
    check_empty_directories as check_empty_directories,
    check_first_commit_wins as check_first_commit_wins,
    check_invalid_names as check_invalid_names,
    check_invalidation as check_invalidation,
    check_modes_and_mtimes as check_modes_and_mtimes,
    check_nested_commits as check_nested_commits,
    check_reopen_keeps_branches as check_reopen_keeps_branches,
    check_resolve_escapes as check_resolve_escapes,
    check_sibling_isolation as check_sibling_isolation,
    check_symlinks_preserved as check_symlinks_preserved,
    check_usage as check_usage,
    check_workspace_exit as check_workspace_exit,
)
from ._harness import OUTSIDE as OUTSIDE
from ._machine import MAX_LEVELS as MAX_LEVELS, MAX_OPEN as MAX_OPEN
from ._model import (
    DIR_MODES as DIR_MODES,
    FILE_MODES as FILE_MODES,
    Tree as Tree,
    model_changed as model_changed,
    model_conflicts as model_conflicts,
)
# isort: on

__all__ = [
    "BackendFactory",
    "BackendStateMachine",
    "Check",
    "MODEL_SEED",
    "Node",
    "SEED",
    "backend_checks",
    "check_backend",
    "check_model",
    "read_tree",
    "write_tree",
]
