"""Random exec / fork / commit / abort / close sequences on real sessions, against a model.

The model holds each session's variables and branch and each branch's files (a commit
moves the committed branch's sessions into its parent: a session started fresh
always, a fork once). After every step,
each live session's variables and each open branch's files (read from disk) must
match it, each session the model says ended must be closed with its process gone,
and when the workspace closes no session process is left. The workspace runs on an
event loop in a blocking portal (hypothesis drives the steps synchronously).
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import anyio.from_thread
import attrs
import hypothesis
import hypothesis.strategies as st
import pytest
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import branchagent as ba
from _support import processes_with
from branchagent._sandbox._run import isolation_available

pytestmark = pytest.mark.skipif(
    not isolation_available(),
    reason="sessions need private mount and PID namespaces (unshare --mount --pid): "
           "not permitted here")

KEYS = ("a", "b", "c")


@attrs.define(eq=False)
class MBranch:
    real: Any
    parent: MBranch | None
    files: dict[str, str]
    snapshot: dict[str, str]  # the parent's files at the fork
    open: bool = True
    children: list[MBranch] = attrs.field(factory=list)

    def subtree(self) -> list[MBranch]:
        out = [self]
        for c in self.children:
            out.extend(c.subtree())
        return out


@attrs.define(eq=False)
class MSession:
    real: ba.Session
    branch: MBranch
    vars: dict[str, int]
    open: bool = True
    forked: bool = False
    moves: int = 0

    @property
    def follows(self) -> bool:
        """Whether it follows its branch's next commit into the parent: a session
        started fresh always, a fork only once."""
        return not self.forked or self.moves == 0


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except OSError:
        return False


class SessionMachine(RuleBasedStateMachine):
    backend = "copy"

    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="session-sm-"))
        self.repo = self.tmp / "repo"
        self.repo.mkdir()
        (self.repo / "keep.txt").write_text("base")
        self.portal_cm = anyio.from_thread.start_blocking_portal("asyncio")
        self.portal = self.portal_cm.__enter__()
        self.ws_cm = self.portal.wrap_async_context_manager(
            ba.open_workspace(self.repo, backend=self.backend))
        self.ws = self.ws_cm.__enter__()
        root = self.call(self.ws.fork)
        self.root = MBranch(root, None, {}, {})
        self.sessions = [MSession(self.call(root.session), self.root, {})]
        self.values = itertools.count(1)

    def call(self, fn: Any, *args: Any) -> Any:
        return self.portal.call(fn, *args)

    def live(self) -> list[MSession]:
        return [s for s in self.sessions if s.open]

    def pick(self, i: int) -> MSession:
        live = self.live()
        return live[i % len(live)]

    def _close_branches(self, branches: list[MBranch]) -> None:
        for b in branches:
            b.open = False
        for s in self.sessions:
            if not s.branch.open:
                s.open = False

    # -- rules -----------------------------------------------------------------------

    @precondition(lambda self: self.live())
    @rule(i=st.integers(0, 63), key=st.sampled_from(KEYS))
    def set_var(self, i: int, key: str) -> None:
        s = self.pick(i)
        value = next(self.values)
        self.call(s.real.exec, f"v[{key!r}] = {value}\n"
                               f"open({key + '.txt'!r}, 'w').write('{value}')")
        s.vars[key] = value
        s.branch.files[key] = str(value)

    @precondition(lambda self: self.live() and len(self.sessions) < 12)
    @rule(i=st.integers(0, 63))
    def fork(self, i: int) -> None:
        s = self.pick(i)
        child = self.call(s.real.fork)
        b = MBranch(child.branch, s.branch, dict(s.branch.files), dict(s.branch.files))
        s.branch.children.append(b)
        self.sessions.append(MSession(child, b, dict(s.vars), forked=True))

    @precondition(lambda self: any(s.branch is not self.root for s in self.live()))
    @rule(i=st.integers(0, 63))
    def commit(self, i: int) -> None:
        candidates = [s for s in self.live() if s.branch is not self.root]
        s = candidates[i % len(candidates)]
        b, p = s.branch, s.branch.parent
        assert p is not None
        ours = {k for k, v in b.files.items() if b.snapshot.get(k) != v}
        theirs = {k for k, v in p.files.items() if b.snapshot.get(k) != v}
        if ours & theirs:
            with pytest.raises(ba.ConflictError):
                self.call(b.real.commit)
            return  # nothing changed
        self.call(b.real.commit)
        p.files.update({k: b.files[k] for k in ours})
        gone = b.subtree()
        for sib in p.children:
            if sib is not b and sib.open:
                gone.extend(sib.subtree())
        p.children = [c for c in p.children if c is not b and c.open and c not in gone]
        for m in self.live():  # the committed branch's sessions follow it into the parent
            if m.branch is b and m.follows:
                m.branch = p
                m.moves += 1
        self._close_branches(gone)

    @precondition(lambda self: any(s.branch is not self.root for s in self.live()))
    @rule(i=st.integers(0, 63))
    def abort(self, i: int) -> None:
        candidates = [s for s in self.live() if s.branch is not self.root]
        b = candidates[i % len(candidates)].branch
        self.call(b.real.abort)
        self._close_branches(b.subtree())

    @precondition(lambda self: any(s is not self.sessions[0] for s in self.live()))
    @rule(i=st.integers(0, 63))
    def close(self, i: int) -> None:
        # (The root session stays: every step then has a session to act on.)
        candidates = [s for s in self.live() if s is not self.sessions[0]]
        s = candidates[i % len(candidates)]
        self.call(s.real.close)
        s.open = False

    # -- checks ------------------------------------------------------------------------

    @invariant()
    def memory_matches(self) -> None:
        for s in self.live():
            assert not s.real.closed, s.real
            got = self.call(s.real.eval, "v")
            assert got == s.vars, (s.real, got, s.vars)

    @invariant()
    def files_match(self) -> None:
        for b in {id(s.branch): s.branch for s in self.sessions}.values():
            if not b.open:
                continue
            for key in KEYS:
                f = b.real.path / f"{key}.txt"
                got = f.read_text() if f.exists() else None
                assert got == b.files.get(key), (b.real, key, got, b.files)

    @invariant()
    def sessions_are_in_their_branches(self) -> None:
        for s in self.live():
            assert s.real.branch is s.branch.real, (s.real, s.branch.real)
            assert s.real.moves == s.moves

    @invariant()
    def ended_sessions_are_gone(self) -> None:
        for s in self.sessions:
            if not s.open:
                assert s.real.closed, s.real

    def teardown(self) -> None:
        pids = [s.real.pid for s in self.sessions]
        try:
            self.ws_cm.__exit__(None, None, None)
        finally:
            self.portal_cm.__exit__(None, None, None)
        try:
            assert not any(_alive(p) for p in pids), "a session process outlived its workspace"
            assert processes_with(str(self.repo)) == []
            assert (self.repo / "keep.txt").read_text() == "base"
            assert sorted(os.listdir(self.repo)) == ["keep.txt"]  # nothing reached the base
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)


SessionMachine.TestCase.settings = hypothesis.settings(
    max_examples=10, stateful_step_count=10, deadline=None, database=None,
    suppress_health_check=[hypothesis.HealthCheck.too_slow])


class SessionMachineSetup(SessionMachine):
    """The root session defines ``v`` (the model starts with it empty)."""

    def __init__(self) -> None:
        super().__init__()
        self.call(self.sessions[0].real.exec, "v = {}")


TestSessions = SessionMachineSetup.TestCase
