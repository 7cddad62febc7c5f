"""branchagent.llm without a model: scores, parsing, actions, sources and solve() with fakes.

Runs in the normal venv on asyncio and trio, on the copy backend. The parts
that build real ``openai`` client objects skip where ``openai`` is not
installed (``pip install openai``); the rest needs no model library at all.
The same pipeline against a real vLLM is tests/llm/test_llm_vllm.py.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import json
import math
import os
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import branchagent as ba
import branchagent.llm as llm
from branchagent.llm import ApplyError, Completion

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "vllm_best_of_n.py"
HAVE_OPENAI = importlib.util.find_spec("openai") is not None
needs_openai = pytest.mark.skipif(
    not HAVE_OPENAI, reason="needs the openai package: pip install openai"
)


@asynccontextmanager
async def workspace(repo: Path) -> AsyncIterator[ba.Workspace]:
    async with ba.open_workspace(repo, backend="copy") as ws:
        yield ws
        assert ws.branches() == [], "a branch was left open"


def completion(index: int, text: str, logprobs: Sequence[float] = (-1.0,)) -> Completion:
    return Completion(index, text, tuple(logprobs))


# -- Completion and scores --------------------------------------------------------------


def test_completion_sums_its_logprobs() -> None:
    c = Completion(0, "x", [-1.0, -2.0, -0.5])
    assert c.cumulative_logprob == pytest.approx(-3.5)
    assert c.n_tokens == 3
    assert c.mean_logprob == pytest.approx(-3.5 / 3)
    assert Completion(1, "y", [-1.0], cumulative_logprob=-7.0).cumulative_logprob == -7.0
    bare = Completion(2, "z")
    assert (bare.token_logprobs, bare.cumulative_logprob, bare.n_tokens, bare.mean_logprob) == (
        None, None, None, None)


def test_completion_rejects_nan() -> None:
    with pytest.raises(ValueError, match="NaN"):
        Completion(0, "x", [math.nan])


def test_scores() -> None:
    c = Completion(0, "x", [-1.0, -2.0, -3.0, -2.0])  # total -8 over 4 tokens
    assert llm.cumulative_logprob(c) == pytest.approx(-8.0)
    assert llm.mean_logprob(c) == pytest.approx(-2.0)
    assert llm.length_normalized(0)(c) == pytest.approx(-8.0)
    assert llm.length_normalized(1)(c) == pytest.approx(-2.0)
    assert llm.length_normalized(0.5)(c) == pytest.approx(-4.0)
    assert llm.gnmt_normalized(1.0)(c) == pytest.approx(-8.0 / 1.5)
    assert llm.get_scorer("gnmt_logprob")(c) == pytest.approx(-8.0 / 1.5**0.6)
    assert llm.length_normalized(0.5).__name__ == "length_normalized(0.5)"


def test_scores_of_an_empty_completion() -> None:
    empty = Completion(0, "", [])
    assert llm.cumulative_logprob(empty) == 0.0
    assert llm.mean_logprob(empty) == -math.inf
    assert llm.length_normalized(0)(empty) == 0.0
    assert llm.gnmt_normalized()(empty) == 0.0


def test_score_without_logprobs_says_how_to_get_them() -> None:
    with pytest.raises(ValueError, match="logprobs=1"):
        llm.mean_logprob(Completion(3, "x"))


def test_get_scorer() -> None:
    assert llm.get_scorer("mean_logprob") is llm.mean_logprob
    assert llm.get_scorer("cumulative_logprob") is llm.cumulative_logprob

    def mine(c: Completion) -> float:
        return len(c.text)

    assert llm.get_scorer(mine) is mine
    with pytest.raises(ValueError, match="known: cumulative_logprob, gnmt_logprob, mean_logprob"):
        llm.get_scorer("perplexity")
    for bad in (-1, 11, True, "1"):
        with pytest.raises(ValueError, match="alpha"):
            llm.length_normalized(bad)  # type: ignore[arg-type]


@given(st.lists(st.floats(min_value=-50, max_value=0), min_size=1, max_size=40),
       st.floats(min_value=0, max_value=1), st.floats(min_value=0, max_value=1))
def test_normalisation_is_monotone_in_alpha(lps: list[float], a: float, b: float) -> None:
    """For a non-positive total, more length normalisation never lowers the score."""
    c = Completion(0, "x", lps)
    lo, hi = sorted((a, b))
    assert llm.length_normalized(lo)(c) <= llm.length_normalized(hi)(c) + 1e-9
    assert llm.cumulative_logprob(c) <= llm.mean_logprob(c) + 1e-9


# -- reading responses -----------------------------------------------------------------------


def vllm_output(samples: Sequence[tuple[str, Sequence[tuple[int, float]]]]) -> Any:
    """A RequestOutput look-alike: per sample (text, [(token_id, logprob)])."""
    outputs = []
    for i, (text, tokens) in enumerate(samples):
        logprobs = [
            {tok: SimpleNamespace(logprob=lp, rank=2, decoded_token="t"),
             999: SimpleNamespace(logprob=-0.01, rank=1, decoded_token="top")}
            for tok, lp in tokens
        ]
        outputs.append(SimpleNamespace(
            index=i, text=text, token_ids=[tok for tok, _ in tokens],
            cumulative_logprob=sum(lp for _, lp in tokens), logprobs=logprobs,
            finish_reason="length",
        ))
    return SimpleNamespace(outputs=outputs)


def test_completions_from_vllm_take_the_sampled_tokens_logprob() -> None:
    out = vllm_output([("ab", [(5, -1.5), (6, -0.5)]), ("c", [(7, -3.0)])])
    got = llm.completions_from_vllm(out)
    assert got == [
        Completion(0, "ab", (-1.5, -0.5), -2.0, "length"),
        Completion(1, "c", (-3.0,), -3.0, "length"),
    ]


def test_completions_from_vllm_without_logprobs() -> None:
    out = SimpleNamespace(outputs=[SimpleNamespace(
        index=0, text="t", token_ids=[1, 2], cumulative_logprob=None, logprobs=None,
        finish_reason="stop")])
    (c,) = llm.completions_from_vllm(out)
    assert (c.token_logprobs, c.cumulative_logprob, c.finish_reason) == (None, None, "stop")
    with pytest.raises(TypeError, match="RequestOutput"):
        llm.completions_from_vllm(object())


COMPLETIONS_JSON: dict[str, Any] = {
    "id": "cmpl-1", "object": "text_completion", "created": 1, "model": "tiny",
    "choices": [
        {"index": 0, "text": "one", "finish_reason": "length",
         "logprobs": {"tokens": ["o", "ne"], "token_logprobs": [-1.0, -2.0],
                      "top_logprobs": [{"o": -1.0}, {"ne": -2.0}], "text_offset": [0, 1]}},
        {"index": 1, "text": "two", "finish_reason": "stop",
         "logprobs": {"tokens": ["two"], "token_logprobs": [-0.5],
                      "top_logprobs": [{"two": -0.5}], "text_offset": [0]}},
    ],
}

CHAT_JSON: dict[str, Any] = {
    "id": "chat-1", "object": "chat.completion", "created": 1, "model": "tiny",
    "choices": [
        {"index": 0, "finish_reason": "stop",
         "message": {"role": "assistant", "content": "hi there"},
         "logprobs": {"content": [
             {"token": "hi", "logprob": -0.25, "bytes": None, "top_logprobs": []},
             {"token": " there", "logprob": -0.75, "bytes": None, "top_logprobs": []}]}},
    ],
}


def test_completions_from_openai_json() -> None:
    assert llm.completions_from_openai(COMPLETIONS_JSON) == [
        Completion(0, "one", (-1.0, -2.0), -3.0, "length"),
        Completion(1, "two", (-0.5,), -0.5, "stop"),
    ]
    assert llm.completions_from_openai(CHAT_JSON) == [
        Completion(0, "hi there", (-0.25, -0.75), -1.0, "stop"),
    ]
    echoed = json.loads(json.dumps(COMPLETIONS_JSON))
    echoed["choices"][0]["logprobs"]["token_logprobs"] = [None, -1.0, -2.0]
    assert llm.completions_from_openai(echoed)[0].token_logprobs == (-1.0, -2.0)
    with pytest.raises(TypeError, match="choices"):
        llm.completions_from_openai({"data": []})


@needs_openai
def test_completions_from_openai_client_objects() -> None:
    openai = pytest.importorskip("openai")
    comp = openai.types.Completion.model_validate(COMPLETIONS_JSON)
    chat = openai.types.chat.ChatCompletion.model_validate(CHAT_JSON)
    assert llm.completions_from_openai(comp) == llm.completions_from_openai(COMPLETIONS_JSON)
    assert llm.completions_from_openai(chat) == llm.completions_from_openai(CHAT_JSON)


# -- unified diffs ---------------------------------------------------------------------------

ORIGINAL = "".join(f"line {i}\n" for i in range(1, 21))


def udiff(path: str, old: str, new: str, *, n: int = 3, prefixes: bool = True) -> str:
    a, b = (f"a/{path}", f"b/{path}") if prefixes else (path, path)
    return "".join(difflib.unified_diff(old.splitlines(True), new.splitlines(True), a, b, n=n))


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "mod.py").write_text(ORIGINAL)
    (root / "README.md").write_text("# demo\n")
    (tmp_path / "outside.txt").write_text("secret\n")
    return root


pytestmark = pytest.mark.anyio


async def test_apply_diff_patches_files(repo: Path) -> None:
    new = ORIGINAL.replace("line 3\n", "line three\n").replace("line 17\n", "")
    text = "Here is the fix:\n\n```diff\n" + udiff("pkg/mod.py", ORIGINAL, new) + "```\n"
    text += "\nand a new file:\n" + udiff("NEW.md", "", "hello\n").replace(
        "--- a/NEW.md", "--- /dev/null")
    async with workspace(repo) as ws, ws.branch() as b:
        changed = await llm.apply_diff(b, completion(0, text))
        assert changed == ["NEW.md", "pkg/mod.py"]
    assert (repo / "pkg" / "mod.py").read_text() == new
    assert (repo / "NEW.md").read_text() == "hello\n"


async def test_apply_diff_tolerates_wrong_numbers_and_whitespace(repo: Path) -> None:
    text = (
        "--- pkg/mod.py\n+++ pkg/mod.py\n"
        "@@ -1,2 +1,2 @@\n"        # wrong: the change is at line 10
        " line 9   \n"             # trailing whitespace the file does not have
        "-line 10\n"
        "+line ten\n"
        " line 11\n"
        "@@ @@\n"                  # no numbers at all
        "-line 20\n"
        "+line twenty\n"
        "\\ No newline at end of file\n"
        "\n\n"                     # blank lines after the diff are not context
    )
    async with workspace(repo) as ws, ws.branch() as b:
        await llm.apply_diff(b, completion(0, text))
    got = (repo / "pkg" / "mod.py").read_text()
    assert got == ORIGINAL.replace("line 10\n", "line ten\n").replace(
        "line 20\n", "line twenty").replace("line 9\n", "line 9   \n")


async def test_apply_diff_deletes_and_renames(repo: Path) -> None:
    text = (udiff("README.md", "# demo\n", "").replace("+++ b/README.md", "+++ /dev/null")
            + "--- a/pkg/mod.py\n+++ b/pkg/renamed.py\n@@ -1,1 +1,1 @@\n-line 1\n+first\n")
    async with workspace(repo) as ws, ws.branch() as b:
        assert await llm.apply_diff(b, completion(0, text)) == ["README.md", "pkg/renamed.py"]
    assert not (repo / "README.md").exists()
    assert not (repo / "pkg" / "mod.py").exists()
    assert (repo / "pkg" / "renamed.py").read_text() == ORIGINAL.replace("line 1\n", "first\n", 1)


async def test_a_failing_hunk_is_named_and_nothing_is_written(repo: Path) -> None:
    good = udiff("README.md", "# demo\n", "# demo!\n")
    bad = udiff("pkg/mod.py", ORIGINAL, ORIGINAL.replace("line 2\n", "two\n").replace(
        "line 15\n", "fifteen\n"), n=1)
    bad = bad.replace("-line 15\n", "-line 15 as the model imagined it\n")
    async with workspace(repo) as ws, ws.branch() as b:
        with pytest.raises(ApplyError) as info:
            await llm.apply_diff(b, completion(0, good + bad))
        message = str(info.value)
        assert "hunk 2 of pkg/mod.py (@@ -14,3 +14,3 @@)" in message
        assert "'line 14'" in message
        assert await b.changes() == []  # all files or none
        await b.abort()
    assert (repo / "README.md").read_text() == "# demo\n"


@pytest.mark.parametrize(("text", "match"), [
    ("no diff here", "no unified diff"),
    ("--- a/x\n+++ b/x\nnot a hunk\n", "no @@ hunk"),
    ("--- /dev/null\n+++ /dev/null\n@@ -0,0 +1 @@\n+x\n", "/dev/null twice"),
    ("--- a/missing.py\n+++ b/missing.py\n@@ -1 +1 @@\n-a\n+b\n", "does not exist"),
    ("--- /dev/null\n+++ b/README.md\n@@ -0,0 +1 @@\n+x\n", "already exists"),
    ("--- a/pkg\n+++ b/pkg\n@@ -1 +1 @@\n-a\n+b\n", "is a directory"),
    ("--- a/README.md\n+++ /dev/null\n@@ -1 +0,0 @@\n-nope\n", "does not apply"),
])
async def test_diffs_that_do_not_apply(repo: Path, text: str, match: str) -> None:
    async with workspace(repo) as ws, ws.branch() as b:
        with pytest.raises(ApplyError, match=match):
            await llm.apply_diff(b, completion(0, text))
        await b.abort()


@pytest.mark.parametrize("path", ["../outside.txt", "pkg/../../outside.txt", "/etc/hostname",
                                  "link/outside.txt"])
async def test_diff_paths_outside_the_branch_are_refused(repo: Path, path: str) -> None:
    (repo / "link").symlink_to(repo.parent)
    text = f"--- a/{path}\n+++ b/{path}\n@@ -1 +1 @@\n-secret\n+pwned\n".replace("a//", "/")
    text = text.replace("b//", "/")
    async with workspace(repo) as ws, ws.branch() as b:
        with pytest.raises(ApplyError, match="outside the branch") as info:
            await llm.apply_diff(b, completion(0, text))
        assert isinstance(info.value.__cause__, ba.PathEscapeError)
        await b.abort()
    assert (repo.parent / "outside.txt").read_text() == "secret\n"


_LINES = st.lists(st.sampled_from(["a\n", "b\n", "c\n", "\n", "def f():\n", "    pass\n"]),
                  max_size=25)


@settings(max_examples=300, deadline=None)
@given(_LINES, _LINES, st.integers(min_value=0, max_value=4))
def test_apply_hunks_inverts_difflib(old: list[str], new: list[str], context: int) -> None:
    """Whatever difflib writes (any context), applying it to the old text gives the new."""
    text = "".join(difflib.unified_diff(old, new, "a/f", "b/f", n=context))
    if not text:
        assert old == new
        return
    (patch,) = llm.parse_unified_diff(text)
    assert llm.apply_hunks("".join(old), patch) == "".join(new)


def test_looks_like_diff() -> None:
    assert llm.looks_like_diff(udiff("x", "a\n", "b\n"))
    assert not llm.looks_like_diff("--- a\n+++ b\nno hunk\n")
    assert not llm.looks_like_diff("```python x.py\nprint(1)\n```\n")


# -- fenced code blocks ----------------------------------------------------------------------

ANSWER = '''\
Sure. Two files:

```python src/app.py
def main():
    return 1
```

```js
// file: web/index.js
console.log(1)
```

```
plain block, no name
```

````markdown docs/guide.md
Use it like this:
```sh
app
```
````

~~~ title="notes.txt"
tilde fence
~~~

  ```toml pyproject.toml
  [project]
  name = "x"
  ```

```python
# file: tools/run.py
print("run")'''


def test_parse_code_blocks() -> None:
    blocks = llm.parse_code_blocks(ANSWER)
    assert [(b.lang, b.path) for b in blocks] == [
        ("python", "src/app.py"), ("js", "web/index.js"), (None, None),
        ("markdown", "docs/guide.md"), (None, "notes.txt"), ("toml", "pyproject.toml"),
        ("python", "tools/run.py"),
    ]
    assert blocks[0].code == "def main():\n    return 1\n"
    assert blocks[1].code == "console.log(1)\n"  # the marker line is dropped
    assert blocks[3].code == "Use it like this:\n```sh\napp\n```\n"
    assert blocks[5].code == '[project]\nname = "x"\n'
    assert blocks[6].code == 'print("run")\n'  # unclosed: runs to the end


@pytest.mark.parametrize(("info", "lang", "path"), [
    ("python", "python", None), ("app.py", None, "app.py"), ("c++", "c++", None),
    ("python path=a/b.py", "python", "a/b.py"), ("py file=x.py", "py", "x.py"),
    ("Makefile", "Makefile", None), ("python  src/a.py  {linenos}", "python", "src/a.py"),
])
def test_fence_info_strings(info: str, lang: str | None, path: str | None) -> None:
    (block,) = llm.parse_code_blocks(f"```{info}\nx\n```\n")
    assert (block.lang, block.path) == (lang, path)


async def test_write_code_blocks(repo: Path) -> None:
    async with workspace(repo) as ws, ws.branch() as b:
        written = await llm.write_code_blocks(b, completion(0, ANSWER))
        assert written == ["src/app.py", "web/index.js", "docs/guide.md", "notes.txt",
                           "pyproject.toml", "tools/run.py"]
    assert (repo / "src" / "app.py").read_text() == "def main():\n    return 1\n"
    assert (repo / "tools" / "run.py").read_text() == 'print("run")\n'


async def test_write_code_blocks_unnamed(repo: Path) -> None:
    async with workspace(repo) as ws, ws.branch() as b:
        one = completion(0, "The fix:\n```python\nx = 1\n```\n")
        assert await llm.write_code_blocks(b, one, path="pkg/mod.py") == ["pkg/mod.py"]
        with pytest.raises(ApplyError, match="none names a file"):
            await llm.write_code_blocks(b, one)
        two = completion(1, "```\na\n```\n```\nb\n```\n")
        with pytest.raises(ApplyError, match="2 unnamed fenced code blocks"):
            await llm.write_code_blocks(b, two, path="x.py")
        with pytest.raises(ApplyError, match="0 fenced code block"):
            await llm.write_code_blocks(b, completion(2, "no code at all"))
    assert (repo / "pkg" / "mod.py").read_text() == "x = 1\n"


@pytest.mark.parametrize("info", ["python ../outside.txt", "/etc/cron.d/x", "link/outside.txt",
                                  "python path=."])
async def test_code_block_paths_outside_the_branch_are_refused(repo: Path, info: str) -> None:
    (repo / "link").symlink_to(repo.parent)
    async with workspace(repo) as ws, ws.branch() as b:
        with pytest.raises(ApplyError, match=r"outside the branch|root directory"):
            await llm.write_code_blocks(b, completion(0, f"```{info}\npwned\n```\n"))
        await b.abort()
    assert (repo.parent / "outside.txt").read_text() == "secret\n"


# -- shell commands --------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "command"), [
    ("echo hi", "echo hi"),
    ("Run this:\n```bash\n$ mkdir -p out\n$ touch out/x\n```\nDone.", "mkdir -p out\ntouch out/x"),
    ("```python\nprint(1)\n```\n```sh\nls\n```", "ls"),
])
def test_extract_command(text: str, command: str) -> None:
    assert llm.extract_command(text) == command


def test_extract_command_needs_one() -> None:
    with pytest.raises(ApplyError, match="no command"):
        llm.extract_command("```sh\n```")


async def test_run_command(repo: Path) -> None:
    async with workspace(repo) as ws:
        async with ws.branch() as b:
            made = completion(0, "```sh\necho made > made.txt && echo ok\n```")
            out = await llm.run_command(b, made)
            assert out == "ok\n"
        async with ws.branch() as b:
            with pytest.raises(ApplyError, match=r"exited with status 3: boom"):
                await llm.run_command(b, completion(1, "echo boom >&2; exit 3"))
            await b.abort()
        async with ws.branch() as b:
            slow = functools.partial(llm.run_command, timeout=0.5)
            with pytest.raises(ApplyError, match=r"was killed \(timeout\)"):
                await slow(b, completion(2, "sleep 30"))
            await b.abort()
    assert (repo / "made.txt").read_text() == "made\n"


async def test_apply_auto(repo: Path) -> None:
    diff = completion(0, "```diff\n" + udiff("README.md", "# demo\n", "# new\n") + "```")
    blocks = completion(1, "```text NOTES.txt\nnote\n```")
    async with workspace(repo) as ws, ws.branch() as b:
        assert await llm.apply_auto(b, diff) == ["README.md"]
        assert await llm.apply_auto(b, blocks) == ["NOTES.txt"]
        with pytest.raises(ApplyError, match="neither a unified diff nor"):
            await llm.apply_auto(b, completion(2, "```sh\nls\n```"))
    assert (repo / "README.md").read_text() == "# new\n"
    assert (repo / "NOTES.txt").read_text() == "note\n"


# -- sources ---------------------------------------------------------------------------------


class FakeLLM:
    """A vllm.LLM look-alike: records calls, answers with canned samples."""

    def __init__(self, samples: Sequence[tuple[str, Sequence[float]]]) -> None:
        self.samples = samples
        self.calls: list[tuple[str, Any, Any]] = []
        self.fail: Exception | None = None

    def _answer(self, params: Mapping[str, Any]) -> list[Any]:
        if self.fail is not None:
            raise self.fail
        n = params["n"]
        chosen = [(t, [(100 + j, lp) for j, lp in enumerate(lps)]) for t, lps in self.samples[:n]]
        return [vllm_output(chosen)]

    def generate(self, prompts: list[str], params: Any, use_tqdm: bool = True) -> list[Any]:
        self.calls.append(("generate", prompts, params))
        return self._answer(params)

    def chat(self, messages: list[dict[str, Any]], sampling_params: Any,
             use_tqdm: bool = True) -> list[Any]:
        self.calls.append(("chat", messages, sampling_params))
        return self._answer(sampling_params)


SAMPLES = [("A", [-1.0, -1.0]), ("B", [-0.2, -0.2]), ("C", [-3.0]), ("D", [-0.5, -0.7])]


async def test_vllm_source_builds_sampling_params() -> None:
    fake = FakeLLM(SAMPLES)
    source = llm.VLLMSource(fake, sampling={"max_tokens": 8}, params_type=dict)
    got = await source.sample("prompt", 3, sampling={"seed": 5})
    assert [c.text for c in got] == ["A", "B", "C"]
    assert got[1].token_logprobs == (-0.2, -0.2)
    kind, prompts, params = fake.calls[0]
    assert (kind, prompts) == ("generate", ["prompt"])
    assert params == {"n": 3, "max_tokens": 8, "seed": 5, "temperature": 1.0, "logprobs": 1}
    await source.sample([{"role": "user", "content": "hi"}], 1, sampling={"logprobs": 3})
    kind, messages, params = fake.calls[1]
    assert (kind, messages) == ("chat", [{"role": "user", "content": "hi"}])
    assert params == {"n": 1, "max_tokens": 8, "logprobs": 3}


async def test_sampling_is_checked_before_the_model_is_called() -> None:
    fake = FakeLLM(SAMPLES)
    source = llm.VLLMSource(fake, params_type=dict)
    with pytest.raises(ValueError, match="need temperature > 0"):
        await source.sample("p", 4, sampling={"temperature": 0})
    with pytest.raises(ValueError, match="removed best_of"):
        await source.sample("p", 4, sampling={"best_of": 8})
    with pytest.raises(ValueError, match="pass n as"):
        await source.sample("p", 4, sampling={"n": 2})
    with pytest.raises(ValueError, match="positive int"):
        await source.sample("p", 0)
    with pytest.raises(TypeError, match="a prompt is a str or a list of chat messages"):
        await source.sample(42, 1)  # type: ignore[arg-type]
    assert fake.calls == []
    assert len(await source.sample("p", 1, sampling={"temperature": 0})) == 1  # greedy, n=1


async def test_vllm_source_errors_become_source_errors() -> None:
    fake = FakeLLM(SAMPLES)
    fake.fail = RuntimeError("engine died")
    with pytest.raises(llm.SourceError, match="engine died") as info:
        await llm.VLLMSource(fake, params_type=dict).sample("p", 2)
    assert isinstance(info.value.__cause__, RuntimeError)


def test_as_source() -> None:
    fake = FakeLLM(SAMPLES)
    assert isinstance(llm.as_source(fake), llm.VLLMSource)
    client = FakeClient([])
    src = llm.as_source(client, model="m")
    assert isinstance(src, llm.OpenAISource)
    assert src.model == "m"
    assert llm.as_source(src) is src
    assert llm.as_source(src, model="other").model == "other"  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="model= is for servers"):
        llm.as_source(fake, model="m")
    with pytest.raises(TypeError, match="cannot sample candidates from int"):
        llm.as_source(3)


class _Create:
    """``create(**kwargs)``: records and answers from a queue."""

    def __init__(self, owner: FakeClient, kind: str) -> None:
        self.owner, self.kind = owner, kind

    async def __call__(self, **kwargs: Any) -> Any:
        await anyio.lowlevel.checkpoint()
        self.owner.calls.append((self.kind, kwargs))
        if self.owner.fail is not None:
            raise self.owner.fail
        return self.owner.responses.pop(0)


class FakeClient:
    """An openai.AsyncOpenAI look-alike (completions, chat.completions, models.list)."""

    def __init__(self, responses: list[Any], models: Sequence[str] = ("tiny",)) -> None:
        self.responses = responses
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.fail: Exception | None = None
        self.completions = SimpleNamespace(create=_Create(self, "completions"))
        self.chat = SimpleNamespace(completions=SimpleNamespace(create=_Create(self, "chat")))
        self._models = models
        self.models = SimpleNamespace(list=self._list)
        self.base_url = "http://127.0.0.1:9/v1"

    async def _list(self) -> Any:
        return SimpleNamespace(data=[SimpleNamespace(id=m) for m in self._models])


def completions_response(samples: Sequence[tuple[str, Sequence[float]]]) -> dict[str, Any]:
    return {"choices": [
        {"index": i, "text": t, "finish_reason": "length",
         "logprobs": {"tokens": ["x"] * len(lps), "token_logprobs": list(lps)}}
        for i, (t, lps) in enumerate(samples)]}


async def test_openai_source_completions_and_chat() -> None:
    chat = {"choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": "yo"},
                         "logprobs": {"content": [{"token": "yo", "logprob": -0.1}]}}]}
    client = FakeClient([completions_response(SAMPLES[:2]), chat])
    source = llm.OpenAISource(client, sampling={"max_tokens": 16})
    got = await source.sample("def f(", 2, sampling={"seed": 1, "top_k": 5})
    assert [c.text for c in got] == ["A", "B"]
    assert source.model == "tiny"  # the first model the server lists
    kind, kwargs = client.calls[0]
    assert kind == "completions"
    assert kwargs == {"model": "tiny", "prompt": "def f(", "n": 2, "max_tokens": 16, "seed": 1,
                      "top_k": 5, "temperature": 1.0, "logprobs": 1}
    (c,) = await source.sample([{"role": "user", "content": "hi"}], 1, sampling={"logprobs": 2})
    assert (c.text, c.token_logprobs) == ("yo", (-0.1,))
    kind, kwargs = client.calls[1]
    assert kind == "chat"
    assert kwargs["messages"] == [{"role": "user", "content": "hi"}]
    assert (kwargs["logprobs"], kwargs["top_logprobs"]) == (True, 2)


async def test_openai_source_checks_the_answer() -> None:
    client = FakeClient([completions_response(SAMPLES[:1])])
    with pytest.raises(llm.SourceError, match="asked the server for 2 completions, got 1"):
        await llm.OpenAISource(client, model="m").sample("p", 2)
    no_lp = {"choices": [{"index": 0, "text": "x", "finish_reason": "stop", "logprobs": None}]}
    client = FakeClient([no_lp])
    with pytest.raises(llm.SourceError, match="without logprobs"):
        await llm.OpenAISource(client, model="m").sample("p", 1)
    with pytest.raises(llm.SourceError, match="lists no model"):
        await llm.OpenAISource(FakeClient([], models=())).sample("p", 1)
    with pytest.raises(TypeError, match="chat messages need the chat endpoint"):
        await llm.OpenAISource(client, model="m", chat=False).sample([{"role": "user"}], 1)


async def test_openai_source_translates_client_errors_only() -> None:
    class APIConnectionError(Exception):
        __module__ = "openai._exceptions"

    client = FakeClient([])
    client.fail = APIConnectionError("connection refused")
    with pytest.raises(llm.SourceError, match=r"127\.0\.0\.1:9/v1 failed: connection refused"):
        await llm.OpenAISource(client, model="m").sample("p", 1)
    client.fail = KeyError("a bug of ours")
    with pytest.raises(KeyError):
        await llm.OpenAISource(client, model="m").sample("p", 1)


def _openai_client(handler: Any) -> Any:
    """A real openai.AsyncOpenAI whose HTTP requests go to ``handler`` (no network)."""
    openai = pytest.importorskip("openai")
    probe = openai.AsyncOpenAI(api_key="x", base_url="http://127.0.0.1:9/v1")
    # The HTTP library the client is built on (httpx, or httpx2 in newer releases).
    base = next(k for k in type(probe._client).__mro__ if k.__module__.startswith("httpx"))
    http: ModuleType = sys.modules[base.__module__.split(".")[0]]
    transport = http.MockTransport(handler)
    return openai.AsyncOpenAI(api_key="x", base_url="http://127.0.0.1:9/v1", max_retries=0,
                              http_client=http.AsyncClient(transport=transport))


@needs_openai
async def test_openai_source_with_the_real_client() -> None:
    seen: list[tuple[str, dict[str, Any]]] = []

    def handler(request: Any) -> Any:
        http = sys.modules[type(request).__module__.split(".")[0]]
        body = json.loads(request.content or b"{}")
        seen.append((request.url.path, body))
        if request.url.path.endswith("/models"):
            return http.Response(200, json={"object": "list", "data": [
                {"id": "tiny", "object": "model", "created": 0, "owned_by": "vllm"}]})
        if request.url.path.endswith("/chat/completions"):
            return http.Response(200, json=CHAT_JSON)
        return http.Response(200, json=COMPLETIONS_JSON)

    client = _openai_client(handler)
    try:
        source = llm.OpenAISource(client)
        got = await source.sample("p", 2, sampling={"seed": 3, "top_k": 4, "max_tokens": 5})
        assert [c.text for c in got] == ["one", "two"]
        (c,) = await source.sample([{"role": "user", "content": "q"}], 1,
                                   sampling={"logprobs": 1})
        assert c.text == "hi there"
    finally:
        await client.close()
    paths = [p for p, _ in seen]
    assert paths == ["/v1/models", "/v1/completions", "/v1/chat/completions"]
    completions_body = seen[1][1]
    assert completions_body["n"] == 2
    assert completions_body["logprobs"] == 1
    assert completions_body["top_k"] == 4  # vLLM's own parameter, sent through extra_body
    assert completions_body["model"] == "tiny"
    chat_body = seen[2][1]
    assert (chat_body["logprobs"], chat_body["top_logprobs"]) == (True, 1)


@needs_openai
async def test_openai_source_server_errors() -> None:
    def handler(request: Any) -> Any:
        http = sys.modules[type(request).__module__.split(".")[0]]
        return http.Response(400, json={"error": {"message": "n must be 1 when using greedy"}})

    client = _openai_client(handler)
    try:
        with pytest.raises(llm.SourceError, match="n must be 1 when using greedy"):
            await llm.OpenAISource(client, model="tiny").sample("p", 2)
    finally:
        await client.close()


# -- solve -----------------------------------------------------------------------------------


class ScriptedSource:
    """A Source that returns the given completions (and records what it was asked)."""

    def __init__(self, completions: Sequence[Completion]) -> None:
        self.completions = list(completions)
        self.asked: list[tuple[Any, int, Any]] = []

    async def sample(self, prompt: Any, n: int, *,
                     sampling: Mapping[str, Any] | None = None) -> list[Completion]:
        self.asked.append((prompt, n, sampling))
        return self.completions[:n]


def answer(value: str) -> str:
    return f"Here you go:\n```text answer.txt\n{value}\n```\n"


#: Mean logprobs -1.0, -0.2, -0.9, -0.6, -0.1 (cumulative: -2.0, -0.4, -0.9, -1.2, -0.1);
#: answers 0, 2 and 3 are right, 4 is wrong, 1 has nothing to apply.
CANDIDATES = [
    Completion(0, answer("right 0"), (-1.0, -1.0)),
    Completion(1, "I cannot do that.", (-0.2, -0.2)),
    Completion(2, answer("right 2"), (-0.9,)),
    Completion(3, answer("right 3"), (-0.5, -0.7)),
    Completion(4, answer("wrong"), (-0.1,)),
]
VERIFY = ba.Command(["grep", "-q", "^right", "answer.txt"])


async def test_solve_best_of_n_commits_the_verified_candidate_with_the_best_logprob(
    repo: Path,
) -> None:
    source = ScriptedSource(CANDIDATES)
    async with workspace(repo) as ws:
        outcome = await llm.solve(ws, source, "write answer.txt", n=5, verify=VERIFY,
                                  sampling={"seed": 1})
    assert source.asked == [("write answer.txt", 5, {"seed": 1})]
    assert outcome.strategy == "best_of_n"
    assert outcome.committed
    assert outcome.winner is not None
    assert outcome.winner.index == 3  # right, and the best mean logprob among the right ones
    assert [r.success for r in outcome.results] == [True, False, True, True, False]
    assert [r.info["logprob_score"] for r in outcome.results] == pytest.approx(
        [-1.0, -0.2, -0.9, -0.6, -0.1])
    assert [r.score for r in outcome.results] == [
        pytest.approx(-1.0), None, pytest.approx(-0.9), pytest.approx(-0.6), pytest.approx(-0.1)]
    assert [r.info["text"] for r in outcome.results] == [c.text for c in CANDIDATES]
    assert outcome.results[1].error is not None
    assert outcome.results[1].error.startswith("ApplyError: completion 1 holds neither")
    assert outcome.results[4].info["verify"]["returncode"] == 1
    assert outcome.results[3].info["verify"]["success"] is True
    assert outcome.results[3].info["applied"] == ["answer.txt"]
    assert outcome.winner.changes == ("answer.txt",)
    assert outcome.winner.info["scorer"] == "mean_logprob"
    assert outcome.info["llm"]["n"] == 5
    assert (repo / "answer.txt").read_text() == "right 3\n"
    json.loads(outcome.to_json())


async def test_solve_scores_by_the_scorer_given(repo: Path) -> None:
    async with workspace(repo) as ws:
        outcome = await llm.solve(ws, ScriptedSource(CANDIDATES), "p", n=5, verify=VERIFY,
                                  score="cumulative_logprob", commit=False)
    assert not outcome.committed
    assert outcome.best is not None
    assert outcome.best.index == 2  # by cumulative logprob; by mean it would be 3
    assert not (repo / "answer.txt").exists()


async def test_solve_without_a_verifier_commits_the_best_applied(repo: Path) -> None:
    async with workspace(repo) as ws:
        outcome = await llm.solve(ws, ScriptedSource(CANDIDATES), "p", n=5)
    assert outcome.winner is not None
    assert outcome.winner.index == 4  # the best score that applied; nothing verified it
    assert outcome.winner.info["verify"] is None
    assert (repo / "answer.txt").read_text() == "wrong\n"


async def test_solve_speculate_tries_the_best_scores_first(repo: Path) -> None:
    order: list[int] = []

    async def apply(branch: ba.Branch, c: Completion) -> None:
        order.append(c.index)
        await llm.write_code_blocks(branch, c, path="answer.txt")

    async with workspace(repo) as ws:
        outcome = await llm.solve(ws, ScriptedSource(CANDIDATES), "p", n=5, apply=apply,
                                  verify=VERIFY, strategy="speculate", max_parallel=1)
    assert outcome.strategy == "speculate"
    assert order == [4, 1, 3]  # best score first; 4 fails the check, 1 fails to apply
    assert outcome.winner is not None
    assert outcome.winner.info["completion"] == 3
    assert [r.info["completion"] for r in outcome.results] == [4, 1, 3, 2, 0]
    assert (repo / "answer.txt").read_text() == "right 3\n"


async def test_solve_takes_a_sync_apply_and_a_callable_verifier(repo: Path) -> None:
    def apply(branch: ba.Branch, c: Completion) -> None:
        branch.resolve("picked.txt").write_text(c.text)

    def verify(branch: ba.Branch) -> ba.Verdict:
        text = branch.resolve("picked.txt").read_text()
        return ba.Verdict("right 2" in text, 1.0, {"checked": True})

    async with workspace(repo) as ws:
        outcome = await llm.solve(ws, ScriptedSource(CANDIDATES), "p", n=5, apply=apply,
                                  verify=verify)
    assert outcome.winner is not None
    assert outcome.winner.index == 2
    assert outcome.winner.info["verify"] == {"success": True, "score": 1.0, "checked": True}
    assert (repo / "picked.txt").read_text() == CANDIDATES[2].text


async def test_solve_with_a_fake_vllm_and_a_fake_client(repo: Path) -> None:
    samples = [(answer("right a"), [-2.0]), (answer("right b"), [-1.0]), ("nope", [-0.1])]
    async with workspace(repo) as ws:
        outcome = await llm.solve(ws, llm.VLLMSource(FakeLLM(samples), params_type=dict),
                                  "p", n=3, verify=VERIFY)
        assert outcome.winner is not None
        assert outcome.winner.index == 1
        client = FakeClient([completions_response(samples)])
        outcome = await llm.solve(ws, client, "p", n=3, verify=VERIFY, model="tiny",
                                  sampling={"max_tokens": 32})
        assert outcome.winner is not None
        assert outcome.winner.index == 1
        assert client.calls[0][1]["max_tokens"] == 32
        assert client.calls[0][1]["model"] == "tiny"


async def test_solve_rejects_bad_arguments(repo: Path) -> None:
    source = ScriptedSource(CANDIDATES)
    async with workspace(repo) as ws:
        with pytest.raises(ValueError, match="'best_of_n' or 'speculate'"):
            await llm.solve(ws, source, "p", strategy="beam")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="commit=False"):
            await llm.solve(ws, source, "p", strategy="speculate", commit=False)
        with pytest.raises(ValueError, match="no scorer named"):
            await llm.solve(ws, source, "p", score="nope")
    assert source.asked == []


async def test_as_candidate_in_any_strategy(repo: Path) -> None:
    candidates = [llm.as_candidate(c, verify=VERIFY) for c in CANDIDATES]
    async with workspace(repo) as ws:
        outcome = await ba.Speculate(candidates, max_parallel=1).run(ws)
    assert outcome.winner is not None
    assert outcome.winner.index == 0
    assert (repo / "answer.txt").read_text() == "right 0\n"


# -- the example -----------------------------------------------------------------------------


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("vllm_best_of_n", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_example_commits_the_passing_candidate(tmp_path: Path) -> None:
    example = load_example()
    repo = example.make_repository(tmp_path)
    fixed = "def add(a, b):\n    return a + b\n```\n"
    source = ScriptedSource([
        Completion(0, "def add(a, b):\n    return b - a\n```\n", (-0.1,)),   # wrong
        Completion(1, fixed, (-0.9,)),                                      # right
        Completion(2, "def add(a, b):\n    return a + b\n```\nThat adds.\n", (-1.5,)),
        Completion(3, "def add(a, b) return a+b", (-0.05,)),               # does not parse
    ])
    outcome = await example.best_of_n(repo, source, n=4)
    assert outcome.committed
    assert outcome.winner.index == 1
    assert [r.success for r in outcome.results] == [False, True, True, False]
    assert outcome.winner.changes == ("calc.py",)
    assert (repo / "calc.py").read_text() == "def add(a, b):\n    return a + b\n"
    assert "committed candidate 1" in example.report(outcome, repo)
    proc = await anyio.run_process([sys.executable, "test_calc.py"], cwd=repo, check=False,
                                   env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert proc.returncode == 0
