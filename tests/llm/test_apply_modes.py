"""Apply modes that fit chat models (``write_file``, ``code`` with a path) and the records
that explain each candidate (its text, what apply did, the verifier's output tails).

Runs on the copy backend with scripted completions shaped like a real chat model's:
prose around one fenced block. The same modes behind ``branchagent serve`` are in
tests/cli/test_serve.py.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

import branchagent as ba
import branchagent.llm as llm
from branchagent.llm import ApplyError, Completion
from branchagent.serve import ServeConfig, resolve_apply

pytestmark = pytest.mark.anyio

ADD = "def add(a, b):\n    return a + b\n"
CHAT_ANSWER = ("Sure! Here is `calc.py` with an `add` function:\n\n"
               f"```python\n{ADD}```\n\nIt returns the sum of `a` and `b`.\n")
TEST_CALC = "from calc import add\n\n\ndef test_add():\n    assert add(2, 3) == 5\n"


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    (root / "README.md").write_text("# demo\n")
    (tmp_path / "outside.txt").write_text("secret\n")
    return root


@asynccontextmanager
async def workspace(repo: Path) -> AsyncIterator[ba.Workspace]:
    async with ba.open_workspace(repo, backend="copy") as ws:
        yield ws
        assert ws.branches() == [], "a branch was left open"


def completion(index: int, text: str, logprobs: Sequence[float] = (-1.0,)) -> Completion:
    return Completion(index, text, tuple(logprobs))


async def written(repo: Path, action: Any, text: str) -> tuple[Any, dict[str, str]]:
    """Apply ``action`` to ``text`` in a branch: what it returned and the files it changed."""
    async with workspace(repo) as ws, ws.branch() as b:
        value = await action(b, completion(0, text))
        files = {c.path: b.resolve(c.path).read_text() for c in await b.changes()
                 if b.resolve(c.path).is_file()}
        await b.abort()
    return value, files


async def refused(repo: Path, action: Any, text: str, match: str) -> ApplyError:
    """``action`` on ``text`` raises ApplyError matching ``match`` and changes nothing."""
    async with workspace(repo) as ws, ws.branch() as b:
        with pytest.raises(ApplyError, match=match) as info:
            await action(b, completion(0, text))
        assert await b.changes() == []
        await b.abort()
    assert pristine(repo)
    return info.value


def pristine(repo: Path) -> bool:
    """Only the fixture's files, inside and outside the workspace, as the fixture wrote them."""
    return (sorted(p.name for p in repo.iterdir()) == ["README.md"]
            and (repo.parent / "outside.txt").read_text() == "secret\n")


# -- file:PATH -------------------------------------------------------------------------------

write_calc = functools.partial(llm.write_file, path="calc.py")


async def test_write_file_writes_the_lone_block_not_the_prose(repo: Path) -> None:
    value, files = await written(repo, write_calc, CHAT_ANSWER)
    assert value == ["calc.py"]
    assert files == {"calc.py": ADD}


async def test_write_file_writes_the_raw_text_when_there_is_no_block(repo: Path) -> None:
    _, files = await written(repo, write_calc, "x = 1  # no fences at all")
    assert files == {"calc.py": "x = 1  # no fences at all"}


@pytest.mark.parametrize("text", [
    # the only block whose language fits .py
    f"Install it:\n```bash\npip install calc\n```\nThen:\n```python\n{ADD}```\n",
    f"```py\n{ADD}```\nRun with:\n```\npython calc.py\n```\n",
    # the block that names the path wins over the others
    f"```python calc.py\n{ADD}```\n```python test_calc.py\nimport calc\n```\n",
])
async def test_write_file_picks_the_block_that_fits_the_path(repo: Path, text: str) -> None:
    _, files = await written(repo, write_calc, text)
    assert files == {"calc.py": ADD}


@pytest.mark.parametrize(("text", "match"), [
    (f"```python\n{ADD}```\nor\n```python\ndef add(a, b): return b + a\n```\n",
     r"2 fenced code blocks \(python, python\) and 2 tagged with a language that fits"),
    ("```bash\nls\n```\n```\nx\n```\n",
     r"2 fenced code blocks \(bash, untagged\) and 0 tagged"),
])
async def test_write_file_refuses_ambiguous_blocks(repo: Path, text: str, match: str) -> None:
    exc = await refused(repo, write_calc, text, match)
    assert "'calc.py'" in str(exc)


@pytest.mark.parametrize("path", ["../outside.txt", "/etc/hostname", "pkg/../../outside.txt",
                                  "link/outside.txt"])
async def test_write_file_refuses_paths_outside_the_branch(repo: Path, path: str) -> None:
    (repo / "link").symlink_to(repo.parent)
    action = functools.partial(llm.write_file, path=path)
    async with workspace(repo) as ws, ws.branch() as b:
        with pytest.raises(ApplyError, match="outside the branch"):
            await action(b, completion(0, "pwned\n"))
        await b.abort()
    (repo / "link").unlink()
    assert (repo.parent / "outside.txt").read_text() == "secret\n"


# -- code and code:PATH ----------------------------------------------------------------------

code_calc = functools.partial(llm.write_code_blocks, path="calc.py")


async def test_code_with_a_path_writes_the_lone_unnamed_block(repo: Path) -> None:
    value, files = await written(repo, code_calc, CHAT_ANSWER)
    assert (value, files) == (["calc.py"], {"calc.py": ADD})


async def test_code_with_a_path_picks_the_block_whose_language_fits(repo: Path) -> None:
    text = f"```sh\npython3 -c 'import calc'\n```\n```python\n{ADD}```\n"
    _, files = await written(repo, code_calc, text)
    assert files == {"calc.py": ADD}


async def test_code_still_prefers_blocks_that_name_files(repo: Path) -> None:
    text = f"```python lib/calc.py\n{ADD}```\n```python\nprint('unnamed')\n```\n"
    _, files = await written(repo, code_calc, text)
    assert files == {"lib/calc.py": ADD}


async def test_code_without_a_block_is_refused_with_the_reason(repo: Path) -> None:
    await refused(repo, code_calc, "I would write a function add that returns a + b.",
                  r"completion 0 has 0 fenced code block\(s\).*to write 'calc.py'")
    await refused(repo, llm.write_code_blocks, "no code", r"0 fenced code block")


@pytest.mark.parametrize("info", ["python ../outside.txt", "python /etc/hostname",
                                  "python pkg/../../outside.txt", "python a/../README.md"])
async def test_code_refuses_dotdot_and_absolute_block_paths(repo: Path, info: str) -> None:
    exc = await refused(repo, llm.write_code_blocks, f"```{info}\npwned\n```\n",
                        "outside the branch")
    assert isinstance(exc.__cause__, ba.PathEscapeError)


async def test_one_bad_block_path_writes_no_block(repo: Path) -> None:
    text = f"```python calc.py\n{ADD}```\n```python ../outside.txt\npwned\n```\n"
    await refused(repo, llm.write_code_blocks, text, "'../outside.txt'.*outside the branch")


def test_check_relative_path() -> None:
    assert llm.check_relative_path("src/calc.py") == "src/calc.py"
    assert llm.check_relative_path("./calc.py") == "./calc.py"
    for bad, why in [("/etc/x", "absolute"), ("a/../b", r"'\.\.' part"), ("..", r"'\.\.'"),
                     ("", "empty")]:
        with pytest.raises(ba.PathEscapeError, match=why):
            llm.check_relative_path(bad)


# -- the --apply names -----------------------------------------------------------------------


def test_apply_names_keep_their_spellings() -> None:
    assert resolve_apply("auto") is llm.apply_auto
    assert resolve_apply("diff") is llm.apply_diff
    assert resolve_apply("code") is llm.write_code_blocks
    file_mode = resolve_apply("file:src/calc.py")
    assert isinstance(file_mode, functools.partial)
    assert (file_mode.func, file_mode.keywords) == (llm.write_file, {"path": "src/calc.py"})
    code_mode = resolve_apply("code:calc.py")
    assert isinstance(code_mode, functools.partial)
    assert (code_mode.func, code_mode.keywords) == (llm.write_code_blocks, {"path": "calc.py"})


@pytest.mark.parametrize(("mode", "why"), [
    ("file:../calc.py", r"'\.\.' part"), ("code:/tmp/calc.py", "absolute"),
    ("file:", "empty"), ("code:", "empty"), ("files:calc.py", "apply must be one of"),
])
def test_bad_apply_names_are_refused_with_the_fix(tmp_path: Path, mode: str, why: str) -> None:
    with pytest.raises(ValueError, match=why) as info:
        resolve_apply(mode)
    if mode.startswith(("file:", "code:")):
        assert "give a path inside the workspace" in str(info.value)
    with pytest.raises(ValueError, match=why):
        ServeConfig(upstream="http://upstream.test/v1", workspace=tmp_path, apply=mode)


# -- records ---------------------------------------------------------------------------------


def test_cap_text_keeps_the_start_and_says_where_it_cut() -> None:
    assert llm.cap_text("short") == "short"
    long = "x" * (llm.TEXT_LIMIT + 500)
    capped = llm.cap_text(long)
    assert capped.startswith("x" * llm.TEXT_LIMIT)
    assert capped.endswith(f"(completion cut at {llm.TEXT_LIMIT} of {len(long)} characters)\n")
    assert len(capped) < llm.TEXT_LIMIT + 100


class ScriptedSource:
    def __init__(self, completions: Sequence[Completion]) -> None:
        self.completions = list(completions)

    async def sample(self, prompt: Any, n: int, *,
                     sampling: Mapping[str, Any] | None = None) -> list[Completion]:
        return self.completions[:n]


#: Shaped like SmolLM2's answers in issue 15: prose and one ```python block, some right.
STORY = [
    Completion(0, CHAT_ANSWER.replace("a + b", "a - b"), (-0.3,)),
    Completion(1, "I'm sorry, I can only describe it: add returns a plus b.", (-0.1,)),
    Completion(2, CHAT_ANSWER, (-0.5,)),
    Completion(3, CHAT_ANSWER + "\nAlso:\n```python\ndef sub(a, b): return a - b\n```\n",
               (-0.2,)),
    Completion(4, CHAT_ANSWER + "y" * (llm.TEXT_LIMIT + 10), (-0.9,)),
]
PYTEST = ba.Command([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
                    isolate=False)


async def test_solve_story_chat_answers_file_mode_pytest(repo: Path) -> None:
    """Issue 15's story: chat-shaped answers, ``file:calc.py``, pytest verifies."""
    (repo / "test_calc.py").write_text(TEST_CALC)
    async with workspace(repo) as ws:
        outcome = await llm.solve(ws, ScriptedSource(STORY), "write calc.py", n=5,
                                  apply=write_calc, verify=PYTEST)
    assert [r.success for r in outcome.results] == [False, False, True, False, True]
    assert outcome.winner is not None
    assert outcome.winner.info["completion"] == 2
    assert (repo / "calc.py").read_text() == ADD
    wrong, prose, right, two, long = (r.info for r in outcome.results)
    # texts, capped with a marker
    assert right["text"] == CHAT_ANSWER
    assert right["text_chars"] == len(CHAT_ANSWER)
    assert long["text"].endswith(f"of {len(STORY[4].text)} characters)\n")
    assert long["text_chars"] == len(STORY[4].text) > llm.TEXT_LIMIT
    # what apply did, or why it refused
    assert right["apply"] == {"ok": True, "paths": ["calc.py"], "output": None, "error": None}
    assert prose["apply"]["ok"] is True  # no block: the raw text is written, pytest fails
    assert two["apply"]["ok"] is False
    assert "2 fenced code blocks (python, python)" in two["apply"]["error"]
    assert outcome.results[3].error == two["apply"]["error"]
    assert "verify" not in two  # the verifier never ran for it
    # the verifier's tails
    assert "1 passed" in right["verify"]["stdout_tail"]
    assert wrong["verify"]["returncode"] == 1
    assert "assert -1 == 5" in wrong["verify"]["stdout_tail"]
    assert "SyntaxError" in prose["verify"]["stdout_tail"]
    ba.Outcome.to_json(outcome)


async def test_solve_records_apply_that_never_ran(repo: Path) -> None:
    async def slow(branch: ba.Branch, c: Completion) -> list[str]:
        if c.index == 0:
            await anyio.sleep(30)
        return await write_calc(branch, c)

    async with workspace(repo) as ws:
        outcome = await llm.solve(ws, ScriptedSource([completion(0, CHAT_ANSWER, (-0.1,)),
                                                      completion(1, CHAT_ANSWER, (-0.2,))]),
                                  "p", n=2, apply=slow, strategy="speculate")
    first = next(r for r in outcome.results if r.info["completion"] == 0)
    assert first.info["apply"]["ok"] is None
    assert first.error is not None
    assert first.error.startswith("Cancelled")
