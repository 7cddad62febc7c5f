"""The ``branchagent`` command, run as a real subprocess (copy backend).

Every command, its exit status (0 committed, 1 nothing committed, 2 usage or
environment error, 130 interrupted), ``--json`` output, branches a crashed
run left behind, Ctrl-C, and the live display on a real terminal (a pty).
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import secrets
import select
import shutil
import signal
import struct
import subprocess
import sys
import termios
import textwrap
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

import branchagent as ba
from _support import snapshot

SCRIPT = Path(sys.executable).with_name("branchagent")
CLI: list[str] = [os.fspath(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m",
                                                                "branchagent.cli"]


# -- helpers ---------------------------------------------------------------------------


def cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``branchagent ARGS`` to the end; stdout and stderr captured (not a terminal)."""
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=timeout, check=False, stdin=subprocess.DEVNULL)


def ba_in(repo: Path, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    """``branchagent -w REPO --backend copy ARGS``."""
    return cli("-w", os.fspath(repo), "--backend", "copy", *args, **kw)


def processes_with(token: str) -> list[int]:
    """Live (non-zombie) pids whose command line contains ``token``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if token.encode() in cmdline and stat.rsplit(")", 1)[1].split()[0] != "Z":
            found.append(int(entry.name))
    return found


def state_dir(repo: Path) -> Path:
    return repo.parent / f".{repo.name}.branchagent"


def branch_dirs(repo: Path) -> list[str]:
    d = state_dir(repo) / "copy" / "branches"
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def token() -> str:
    """A ``sleep`` argument no other process on the machine has."""
    return f"30.{secrets.randbelow(10**6):06d}"


def has_strategy(name: str) -> bool:
    return name in ba.available_strategies()


LEAVE_BRANCHES = textwrap.dedent("""
    import os, sys, anyio, branchagent as ba

    async def main() -> None:
        async with ba.open_workspace(sys.argv[1], backend="copy", keep_branches=True) as ws:
            a = await ws.fork("left-a")
            (a.path / "new.txt").write_text("from a\\n")
            b = await ws.fork("left-b")
            (b.path / "README.md").write_text("# from b\\n")
            c = await a.fork("left-a-kid")
            (c.path / "kid.txt").write_text("kid\\n")
            if sys.argv[2] == "crash":
                os._exit(3)  # no cleanup at all: what a killed agent leaves

    anyio.run(main)
""")


def leave_branches(repo: Path, how: str) -> None:
    """Branches left in ``repo`` by another process: ``crash`` (os._exit) or ``keep``."""
    r = subprocess.run([sys.executable, "-c", LEAVE_BRANCHES, os.fspath(repo), how],
                       capture_output=True, text=True, check=False, timeout=60)
    assert r.returncode == (3 if how == "crash" else 0), r.stderr


# -- help and usage ----------------------------------------------------------------------


def test_help_lists_every_command() -> None:
    r = cli("--help")
    assert r.returncode == 0
    for command in ("run", "speculate", "best-of-n", "reflexion", "tree", "beam", "status",
                    "diff", "commit", "abort", "doctor", "report"):
        assert command in r.stdout


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["speculate"], "-c"),
        (["speculate", "-c", "true", "--max-parallel", "0"], "--max-parallel"),
        (["best-of-n", "-n", "0", "--", "true"], "-n"),
        (["best-of-n", "-n", "2"], "give the command after --"),
        (["run"], "give the command after --"),
        (["run", "--timeout", "-1", "--", "true"], "--timeout"),
        (["reflexion", "--retries", "2"], "give the command after --"),
        (["tree", "--expand", "true"], "root command"),
        (["beam", "--expand", "true"], "root command"),
        (["abort"], "--all"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_usage_errors_exit_2(tmp_path: Path, args: list[str], says: str) -> None:
    r = ba_in(tmp_path, *args)
    assert r.returncode == 2, r.stderr
    assert says in r.stderr
    assert r.stdout == ""


def test_a_bad_limit_is_a_usage_error(repo: Path) -> None:
    r = ba_in(repo, "run", "--memory", "lots", "--", "true")
    assert r.returncode == 2
    assert "512M" in r.stderr  # the message says what a size looks like


def test_a_missing_workspace_is_a_usage_error(tmp_path: Path) -> None:
    r = ba_in(tmp_path / "nope", "run", "--", "true")
    assert r.returncode == 2
    assert "-w DIR" in r.stderr


def test_common_options_go_before_or_after_the_command(repo: Path) -> None:
    r = cli("speculate", "-w", os.fspath(repo), "--backend", "copy", "--json",
            "-c", "echo x > after.txt")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["committed"] is True
    assert (repo / "after.txt").read_text() == "x\n"


def test_missing_backend_says_use_copy(repo: Path) -> None:
    before = snapshot(repo)
    r = cli("-w", os.fspath(repo), "--backend", "no-such-backend", "run", "--", "true")
    assert r.returncode == 2
    assert "--backend copy" in r.stderr
    assert snapshot(repo) == before


def test_the_recorded_backend_is_the_default(repo: Path) -> None:
    assert ba_in(repo, "run", "--", "true").returncode == 0
    r = cli("-w", os.fspath(repo), "run", "--", "sh", "-c", "echo y > y.txt")  # no --backend
    assert r.returncode == 0, r.stderr
    assert (repo / "y.txt").read_text() == "y\n"
    r = cli("-w", os.fspath(repo), "--json", "status")
    assert json.loads(r.stdout)["backend"] == "copy"


def test_workspace_defaults_to_the_current_directory(repo: Path) -> None:
    r = cli("--backend", "copy", "run", "--", "sh", "-c", "echo here > here.txt", cwd=repo)
    assert r.returncode == 0, r.stderr
    assert (repo / "here.txt").read_text() == "here\n"


# -- run --------------------------------------------------------------------------------------


def test_run_commits_on_exit_0(repo: Path) -> None:
    r = ba_in(repo, "run", "--", "sh", "-c", "echo hello; echo new > new.txt")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "hello\n"
    assert "committed" in r.stderr
    assert (repo / "new.txt").read_text() == "new\n"
    assert branch_dirs(repo) == []


def test_run_failure_commits_nothing(repo: Path) -> None:
    before = snapshot(repo)
    r = ba_in(repo, "run", "--", "sh", "-c", "echo new > new.txt; exit 3")
    assert r.returncode == 1
    assert "exit 3" in r.stderr
    assert snapshot(repo) == before
    assert branch_dirs(repo) == []


def test_run_json_and_limits(repo: Path) -> None:
    r = ba_in(repo, "--json", "run", "--timeout", "0.5", "--memory", "256M", "--pids", "64",
              "--", "sleep", "5")
    assert r.returncode == 1
    doc = json.loads(r.stdout)
    assert doc["killed"] == "timeout"
    assert doc["committed"] is False


# -- speculate -------------------------------------------------------------------------------


def test_speculate_first_success_commits_and_losers_die(repo: Path) -> None:
    tok = token()
    started = time.monotonic()
    r = ba_in(repo, "speculate", "-c", "sleep 0.3; echo won > won.txt",
              "-c", f"sleep {tok}", "-c", f"sleep {tok}", "-c", "false")
    elapsed = time.monotonic() - started
    assert r.returncode == 0, r.stderr
    assert elapsed < 10, "the outcome waited for a loser"
    assert (repo / "won.txt").read_text() == "won\n"
    assert processes_with(tok) == []
    assert branch_dirs(repo) == []
    assert "committed candidate 0" in r.stdout
    # plain progress lines on a pipe: no escapes
    assert "start" in r.stderr
    assert "\x1b[" not in r.stderr


def test_speculate_json_is_one_outcome_document(repo: Path) -> None:
    r = ba_in(repo, "--json", "speculate", "-c", "exit 4", "-c", "echo 2.5 >&3; echo a > a.txt")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)  # exactly one document: json.loads rejects trailing data
    assert doc["strategy"] == "speculate"
    assert doc["committed"] is True
    assert doc["winner"]["index"] == 1
    assert doc["winner"]["score"] == 2.5
    assert doc["winner"]["changes"] == ["a.txt"]
    assert [res["index"] for res in doc["results"]] == [0, 1]
    assert doc["winner"]["info"]["returncode"] == 0
    loser = doc["results"][0]
    assert loser["success"] is False
    if loser["error"] is None:  # it finished before the winner (else it was cancelled)
        assert loser["info"]["returncode"] == 4
    assert r.stderr  # progress stays on stderr


def test_speculate_nothing_committed_exits_1(repo: Path) -> None:
    before = snapshot(repo)
    r = ba_in(repo, "speculate", "-c", "echo x > x.txt; false", "-c", "exit 7")
    assert r.returncode == 1
    assert "nothing committed" in r.stdout
    assert snapshot(repo) == before


def test_speculate_timeout_and_max_parallel(repo: Path) -> None:
    tok = token()
    started = time.monotonic()
    r = ba_in(repo, "--json", "speculate", "--timeout", "0.5", "--max-parallel", "1",
              "-c", f"sleep {tok}", "-c", "true")
    assert time.monotonic() - started < 10
    assert r.returncode == 1
    doc = json.loads(r.stdout)
    assert doc["timed_out"] is True
    assert doc["results"][1]["branch"] is None  # never admitted: max_parallel 1
    assert processes_with(tok) == []


# -- best-of-n -------------------------------------------------------------------------------


def test_best_of_n_scores_from_the_score_file_and_fd_3(repo: Path) -> None:
    script = ('echo $BRANCHAGENT_ATTEMPT > attempt.txt; '
              'if [ $((BRANCHAGENT_ATTEMPT % 2)) = 0 ]; then echo $BRANCHAGENT_ATTEMPT >&3; '
              'else echo $BRANCHAGENT_ATTEMPT > "$BRANCHAGENT_SCORE_FILE"; fi')
    r = ba_in(repo, "--json", "best-of-n", "-n", "5", "--max-parallel", "3", "--",
              "sh", "-c", script)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["strategy"] == "best_of_n"
    assert [res["score"] for res in doc["results"]] == [0, 1, 2, 3, 4]
    assert doc["winner"]["index"] == 4
    assert (repo / "attempt.txt").read_text() == "4\n"


def test_best_of_n_evaluate_replaces_the_score(repo: Path) -> None:
    # Attempt i writes i+1 lines; the evaluator scores by fewest lines: attempt 0 wins.
    script = 'for i in $(seq 0 $BRANCHAGENT_ATTEMPT); do echo $i; done > out.txt'
    r = ba_in(repo, "--json", "best-of-n", "-n", "3", "--evaluate",
              'echo "-$(wc -l < out.txt)" >&3', "--", "sh", "-c", script)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["winner"]["index"] == 0
    assert doc["winner"]["score"] == -1
    assert (repo / "out.txt").read_text() == "0\n"


def test_best_of_n_all_fail_exits_1(repo: Path) -> None:
    before = snapshot(repo)
    r = ba_in(repo, "best-of-n", "-n", "3", "--", "sh", "-c", "echo x > x.txt; exit 1")
    assert r.returncode == 1
    assert snapshot(repo) == before


# -- strategies the CLI loads by name ------------------------------------------------------------


def test_a_missing_strategy_exits_2_and_says_what_to_do(repo: Path) -> None:
    code = textwrap.dedent("""
        import sys
        import branchagent as ba
        from branchagent import cli
        def missing(name):
            raise ba.StrategyNotFound(f"no strategy named {name!r}")
        ba.get_strategy = missing
        sys.exit(cli.main(sys.argv[1:]))
    """)
    for args in (["beam", "--expand", "true", "-c", "true"],
                 ["tree", "--expand", "true", "-c", "true"],
                 ["reflexion", "--retries", "1", "--", "true"]):
        r = subprocess.run([sys.executable, "-c", code, "-w", os.fspath(repo), "--backend",
                            "copy", *args], capture_output=True, text=True, check=False,
                           timeout=60)
        assert r.returncode == 2, r.stderr
        assert "not installed" in r.stderr
        assert "pip install" in r.stderr
    assert not state_dir(repo).exists()  # failed before opening the workspace


@pytest.mark.skipif(not has_strategy("reflexion"), reason="Reflexion is not installed")
@pytest.mark.parametrize("critique", [None, "echo critic: look again"])
def test_reflexion_retries_with_feedback(repo: Path, critique: str | None) -> None:
    # Attempt 0 fails; attempt 1 succeeds once its feedback holds the critique (or, with
    # no critique, attempt 0's own output).
    want = "critic: look again" if critique else "attempt saw []"
    script = ('echo "attempt saw [$BRANCHAGENT_FEEDBACK]"; echo x > x.txt; '
              f'case "$BRANCHAGENT_FEEDBACK" in *"{want}"*) echo done > done.txt; exit 0;; esac;'
              ' exit 1')
    extra = ["--critique", critique] if critique else []
    r = ba_in(repo, "--json", "reflexion", "--retries", "3", *extra, "--", "sh", "-c", script)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["strategy"] == "reflexion"
    assert doc["winner"]["index"] == 1
    assert len(doc["results"]) == 2
    assert want in doc["results"][1]["info"]["received_feedback"]
    assert (repo / "done.txt").read_text() == "done\n"
    assert (repo / "x.txt").read_text() == "x\n"


@pytest.mark.skipif(not has_strategy("reflexion"), reason="Reflexion is not installed")
def test_reflexion_gives_up_after_the_retries(repo: Path) -> None:
    before = snapshot(repo)
    r = ba_in(repo, "--json", "reflexion", "--retries", "1", "--", "sh", "-c",
              "echo no > no.txt; exit 1")
    assert r.returncode == 1
    assert len(json.loads(r.stdout)["results"]) == 2  # --retries 1: two attempts
    assert snapshot(repo) == before


EXPAND = (  # depth 0 -> two children; depth 1 -> one grandchild; deeper -> none
    'case "$BRANCHAGENT_DEPTH" in '
    '0) echo "echo 2 >&3; echo kid-a >> path.txt"; '
    '   echo "# a comment line"; echo; echo "echo 3 >&3; echo kid-b >> path.txt";; '
    '1) echo "echo 9 >&3; echo grandkid >> path.txt";; esac'
)


@pytest.mark.skipif(not has_strategy("tree_search"), reason="TreeSearch is not installed")
def test_tree_search_over_generated_commands(repo: Path) -> None:
    r = ba_in(repo, "--json", "tree", "--expand", EXPAND, "--max-depth", "3",
              "-c", "echo 1 >&3; echo root > path.txt")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["committed"] is True
    assert (repo / "path.txt").read_text().splitlines()[0] == "root"
    assert "grandkid" in (repo / "path.txt").read_text()  # the best node (score 9) won
    assert branch_dirs(repo) == []


@pytest.mark.skipif(not has_strategy("beam"), reason="Beam is not installed")
def test_beam_search_over_generated_commands(repo: Path) -> None:
    r = ba_in(repo, "--json", "beam", "--expand", EXPAND, "--beam-width", "1",
              "--max-depth", "2", "-c", "echo 1 >&3; echo root > path.txt")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["committed"] is True
    assert (repo / "path.txt").read_text().splitlines()[0] == "root"
    assert branch_dirs(repo) == []


@pytest.mark.skipif(not has_strategy("tree_search"), reason="TreeSearch is not installed")
def test_an_option_the_strategy_refuses_exits_2(repo: Path) -> None:
    r = ba_in(repo, "tree", "--expand", "true", "-c", "true", "--policy", "sideways")
    assert r.returncode == 2
    assert "policy" in r.stderr
    assert not state_dir(repo).exists()


@pytest.mark.skipif(not has_strategy("tree_search"), reason="TreeSearch is not installed")
def test_a_failing_expand_is_reported(repo: Path) -> None:
    r = ba_in(repo, "--json", "tree", "--expand", "echo broken >&2; exit 5", "-c", "true")
    assert r.returncode == 1, r.stderr  # the node failed in its expand: nothing verified
    (node,) = json.loads(r.stdout)["results"]
    assert "--expand exited 5" in node["error"]
    assert "broken" in node["error"]  # its stderr, so the user sees why
    assert branch_dirs(repo) == []


# -- branches left by a crashed run: status, diff, commit, abort ------------------------------


def test_status_of_a_fresh_directory_creates_nothing(repo: Path) -> None:
    r = cli("-w", os.fspath(repo), "status")
    assert r.returncode == 0
    assert "no branches" in r.stdout
    assert not state_dir(repo).exists()


@pytest.mark.parametrize("how", ["crash", "keep"])
def test_crash_left_branches_status_diff_commit_abort(repo: Path, how: str) -> None:
    leave_branches(repo, how)
    before = snapshot(repo)

    r = cli("-w", os.fspath(repo), "--json", "status")  # backend from the state dir
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    rows = {row["name"]: row for row in doc["branches"]}
    assert set(rows) == {"left-a", "left-b", "left-a-kid"}
    assert rows["left-a-kid"]["parent"] == "left-a"
    assert rows["left-a"]["changes"] == 1
    assert rows["left-a-kid"]["depth"] == 1
    human = cli("-w", os.fspath(repo), "status")
    assert "left-a-kid" in human.stdout

    r = cli("-w", os.fspath(repo), "diff", "left-b")
    assert r.returncode == 0
    assert "-# demo" in r.stdout
    assert "+# from b" in r.stdout
    r = cli("-w", os.fspath(repo), "--json", "diff", "left-a-kid")
    assert "kid.txt" in json.loads(r.stdout)["diff"]

    r = cli("-w", os.fspath(repo), "abort", "left-b")
    assert r.returncode == 0
    assert snapshot(repo) == before
    r = cli("-w", os.fspath(repo), "commit", "left-a-kid")  # into left-a
    assert r.returncode == 0, r.stderr
    assert snapshot(repo) == before
    r = cli("-w", os.fspath(repo), "--json", "commit", "left-a")  # into the base
    assert r.returncode == 0, r.stderr
    assert sorted(json.loads(r.stdout)["changes"]) == ["kid.txt", "new.txt"]
    assert (repo / "new.txt").read_text() == "from a\n"
    assert (repo / "kid.txt").read_text() == "kid\n"
    assert json.loads(cli("-w", os.fspath(repo), "--json", "status").stdout)["branches"] == []
    assert branch_dirs(repo) == []


def test_abort_all_and_unknown_branches(repo: Path) -> None:
    leave_branches(repo, "crash")
    r = cli("-w", os.fspath(repo), "diff", "nope")
    assert r.returncode == 2
    assert "branchagent status" in r.stderr
    r = cli("-w", os.fspath(repo), "--json", "abort", "--all")
    assert r.returncode == 0
    assert sorted(json.loads(r.stdout)["aborted"]) == ["left-a", "left-a-kid", "left-b"]
    assert branch_dirs(repo) == []


def test_commit_conflict_exits_1(repo: Path) -> None:
    leave_branches(repo, "crash")
    (repo / "README.md").write_text("# changed in the base meanwhile\n")
    r = cli("-w", os.fspath(repo), "commit", "left-b")
    assert r.returncode == 1, r.stderr
    assert "conflict" in r.stdout.lower()
    assert (repo / "README.md").read_text() == "# changed in the base meanwhile\n"


def test_a_strategy_run_keeps_crash_left_branches_it_does_not_touch(repo: Path) -> None:
    leave_branches(repo, "crash")
    r = ba_in(repo, "speculate", "-c", "false")
    assert r.returncode == 1
    assert "left by an earlier run" in r.stderr
    names = {row["name"] for row in json.loads(ba_in(repo, "--json", "status").stdout)["branches"]}
    assert names == {"left-a", "left-b", "left-a-kid"}


@pytest.fixture
def locked(repo: Path) -> Iterator[Path]:
    """``repo`` with its workspace lock held, as a running branchagent holds it."""
    assert ba_in(repo, "run", "--", "true").returncode == 0  # make the state dir
    leave_branches(repo, "keep")
    fd = os.open(state_dir(repo) / "lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield repo
    finally:
        os.close(fd)


def test_a_workspace_in_use(locked: Path) -> None:
    r = cli("-w", os.fspath(locked), "--json", "status")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["in_use"] is True
    assert {row["name"] for row in doc["branches"]} == {"left-a", "left-b", "left-a-kid"}
    r = ba_in(locked, "run", "--", "true")
    assert r.returncode == 2
    assert "another branchagent process" in r.stderr


# -- Ctrl-C and the terminal display ------------------------------------------------------------


def wait_for(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_ctrl_c_aborts_every_branch_and_kills_every_process(
    repo: Path, tmp_path: Path, sig: signal.Signals
) -> None:
    before = snapshot(repo)
    tok = token()
    err_path = tmp_path / "stderr"
    with err_path.open("w") as err:
        proc = subprocess.Popen(
            [*CLI, "-w", os.fspath(repo), "--backend", "copy", "speculate",
             "-c", f"echo x > x.txt; sleep {tok}", "-c", f"sleep {tok}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
        )
        try:
            wait_for(lambda: len(processes_with(f"sleep {tok}")) >= 2, 30, "both candidates")
            sent = time.monotonic()
            proc.send_signal(sig)
            rc = proc.wait(timeout=10)
            took = time.monotonic() - sent
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    stderr = err_path.read_text()
    assert rc == 128 + sig, stderr  # 130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP
    assert took < 3, f"exit took {took:.1f} s"
    assert processes_with(tok) == [], "a candidate's process survived"
    assert snapshot(repo) == before
    assert branch_dirs(repo) == []
    status = ba_in(repo, "--json", "status")
    assert json.loads(status.stdout)["branches"] == [], status.stdout
    assert "was running" in stderr
    assert stderr.count(f"sleep {tok}") >= 2
    assert "every branch aborted" in stderr


def _take_terminal() -> None:
    """In the child: make the pty on fd 0 this new session's controlling terminal."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


@pytest.mark.parametrize("isolate", [True, False])
def test_closing_the_terminal_aborts_every_branch_and_kills_every_process(
    repo: Path, tmp_path: Path, isolate: bool
) -> None:
    """The terminal itself goes away (the kernel sends SIGHUP; every later write to it
    fails with EIO): the same clean exit as SIGTERM, with status 129."""
    before = snapshot(repo)
    tok = token()
    pids = tmp_path / "pids"
    pids.mkdir()
    # Without isolation $$ is the host pid of the `sleep` that replaces the shell.
    record = f'echo $$ > {pids}/$BRANCHAGENT_ATTEMPT; exec sleep {tok}'
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    proc = subprocess.Popen(
        [*CLI, "-w", os.fspath(repo), "--backend", "copy", "best-of-n", "-n", "2",
         *([] if isolate else ["--no-isolate"]), "--", "sh", "-c", record],
        stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
        preexec_fn=_take_terminal,
    )
    os.close(slave)
    try:
        def started() -> bool:
            try:  # keep draining the terminal so the live display never blocks
                while select.select([master], [], [], 0)[0] and os.read(master, 65536):
                    pass
            except OSError:
                pass
            return len(processes_with(tok)) >= 2 and len(list(pids.iterdir())) >= 2
        wait_for(started, 30, "both attempts")
        time.sleep(0.2)
        recorded = [int(p.read_text()) for p in pids.iterdir()]
        open_branches = json.loads(ba_in(repo, "--json", "status").stdout)["branches"]
        assert len(open_branches) == 2
        os.close(master)  # the terminal closes: hangup
        master = -1
        rc = proc.wait(timeout=10)
    finally:
        if master >= 0:
            os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 128 + signal.SIGHUP
    assert processes_with(tok) == [], "a candidate's process survived"
    if not isolate:  # host pids (isolated, $$ is a pid in the run's own namespace)
        assert [pid for pid in recorded if pid in processes_with(tok)] == []
    assert snapshot(repo) == before
    assert branch_dirs(repo) == []
    assert json.loads(ba_in(repo, "--json", "status").stdout)["branches"] == []


def run_on_pty(args: Sequence[str], cwd: Path, timeout: float = 60) -> tuple[int, str, str]:
    """Run the CLI with stderr on a pty (100x30); return (status, terminal output, stdout)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    chunks: list[bytes] = []
    with subprocess.Popen([*CLI, *args], cwd=cwd, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=slave) as proc:
        os.close(slave)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                ready, _, _ = select.select([master], [], [], 0.1)
                if ready:
                    try:
                        data = os.read(master, 65536)
                    except OSError:  # EIO: every writer of the pty is gone
                        break
                    if not data:
                        break
                    chunks.append(data)
                elif proc.poll() is not None:
                    break
            assert proc.stdout is not None
            out = proc.stdout.read().decode()
            rc = proc.wait(timeout=10)
        finally:
            os.close(master)
            if proc.poll() is None:
                proc.kill()
    return rc, b"".join(chunks).decode(errors="replace"), out


def test_live_display_on_a_terminal(repo: Path) -> None:
    rc, screen, out = run_on_pty(
        ["--backend", "copy", "speculate", "-c", "sleep 1; echo w > w.txt",
         "-c", "sleep 30", "-c", "false"], cwd=repo)
    assert rc == 0, screen
    assert "\x1b[" in screen  # redrawn in place with ANSI escapes
    assert "\x1b[J" in screen
    assert screen.count("branchagent speculate") >= 3  # redrawn while it ran
    assert "running" in screen
    assert "failed" in screen
    assert "winner: speculate-" in screen
    assert "committed candidate 0" in out  # the summary goes to stdout, not the display
    # The live table is erased before the summary (which shows the same rows): the last
    # thing on the terminal is the erase, so the final table is not printed twice.
    assert screen.rstrip("\r\n").endswith("\x1b[J"), screen[-300:]
    assert (repo / "w.txt").read_text() == "w\n"


def test_quiet_prints_no_progress(repo: Path) -> None:
    r = ba_in(repo, "-q", "speculate", "-c", "true")
    assert r.returncode == 0
    assert r.stderr == ""


@pytest.mark.skipif(shutil.which("sh") is None, reason="needs sh")
def test_no_isolate_runs_in_the_branch_directory(repo: Path) -> None:
    r = ba_in(repo, "--json", "run", "--no-isolate", "--", "sh", "-c", "pwd; echo z > z.txt")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["stdout"].strip() != os.fspath(repo)  # cwd: the branch copy
    assert (repo / "z.txt").read_text() == "z\n"


# -- the progress display reads events, not log lines -----------------------------------------


def _plain_progress() -> tuple[Any, Any]:
    import io

    from branchagent.cli._progress import Progress

    stream = io.StringIO()
    return Progress(stream, live=False), stream


def test_progress_is_driven_by_events() -> None:
    progress, stream = _plain_progress()
    events = [
        ba.Event(kind="branch_forked", branch="b-0", parent=None, depth=0),
        ba.Event(kind="branch_forked", branch="b-1", parent=None, depth=0),
        ba.Event(kind="candidate_started", strategy="speculate", index=0, branch="b-0", depth=0),
        ba.Event(kind="candidate_finished", strategy="speculate", index=1, branch="b-1", depth=0,
                 data={"success": False, "score": None, "error": None, "duration": 0.1}),
        ba.Event(kind="candidate_finished", strategy="speculate", index=0, branch="b-0", depth=0,
                 data={"success": True, "score": 2.5, "error": None, "duration": 0.2}),
        ba.Event(kind="winner_committed", strategy="speculate", index=0, branch="b-0", depth=0),
        ba.Event(kind="branch_forked", branch="b-2", parent=None, depth=0),
        ba.Event(kind="branch_invalidated", branch="b-2", depth=0),
    ]
    for event in events:
        progress.feed(event)
    assert {name: row.state for name, row in progress.rows.items()} == {
        "b-0": "committed", "b-1": "failed", "b-2": "invalidated"}
    assert progress.rows["b-0"].score == 2.5
    assert progress.winner == "b-0"
    text = stream.getvalue()
    assert "failed    b-1" in text
    assert "committed b-0" in text


def test_progress_observes_events_and_ignores_log_lines(tmp_path: Path) -> None:
    import anyio
    import structlog

    progress, _ = _plain_progress()

    async def main() -> None:
        async with ba.open_workspace(tmp_path, backend="copy") as ws:
            with ba.observe(progress.feed):
                b = await ws.fork("seen")
                await b.commit()
            # A log line that looks like an event changes nothing: logs are not an API.
            structlog.get_logger("branchagent").info("branch_forked", branch="logged", depth=0)

    anyio.run(main)
    assert "logged" not in progress.rows
    assert progress.rows["seen"].state == "committed"
    assert progress.winner == "seen"
