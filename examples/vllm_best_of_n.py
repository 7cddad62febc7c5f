"""Best-of-n with vLLM: one model call proposes n fixes; the one that passes the tests is committed.

It makes a small repository whose test fails (``add()`` subtracts), asks the
model for the corrected file ``n`` times in ONE call (vLLM's ``n=``, with
logprobs: the prompt is processed once), writes each answer into its own
copy-on-write branch, runs the test there, and commits the passing answer
with the best mean token logprob. The other branches vanish.

    python examples/vllm_best_of_n.py --model PATH               # offline vllm.LLM
    python examples/vllm_best_of_n.py --model http://127.0.0.1:8000/v1   # vllm serve
    python examples/vllm_best_of_n.py --model PATH --n 16 --strategy speculate --json out.json

``--model`` is a model directory (loaded in this process with ``vllm.LLM``) or
the base URL of an OpenAI-compatible server (``python -m
vllm.entrypoints.openai.api_server``; needs ``pip install openai``). With the
tiny random model of ``scripts/make_tiny_model.py`` no candidate fixes
anything: the pipeline still runs (n candidates, n branches, n verifications)
and nothing is committed. A real model (e.g. a small instruct model) fixes it.

Exit status: 0 when a fix was committed, 1 when no candidate passed.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import logging
import os
import sys
import tempfile
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import anyio
import structlog

import branchagent as ba
import branchagent.llm

BUGGY = '''\
def add(a, b):
    """The sum of a and b."""
    return a - b
'''

TEST = '''\
from calc import add

assert add(2, 3) == 5, add(2, 3)
assert add(-1, 1) == 0, add(-1, 1)
print("ok")
'''

PROMPT = f"""\
The test in test_calc.py fails.

calc.py:
```python
{BUGGY}```

test_calc.py:
```python
{TEST}```

Reply with the whole corrected calc.py in one fenced block:
"""

#: The prompt ends by opening the block the answer goes in.
OPEN_FENCE = "```python calc.py\n"
PROMPT += OPEN_FENCE

#: Runs the repository's test in a branch (no bytecode files: they would be changes).
VERIFY = ba.Command([sys.executable, "test_calc.py"], env={"PYTHONDONTWRITEBYTECODE": "1"},
                    limits=ba.Limits(timeout=60))


async def apply_answer(branch: ba.Branch, completion: ba.llm.Completion) -> list[str]:
    """Write the answer to calc.py: the prompt opened a fence, the answer closes it.

    The completion continues the prompt, so the fence the prompt opened is put
    back in front and the first fenced block is the new calc.py (a model cut
    off before the closing fence still gives a block). Your own ``apply`` looks
    like this; ``ba.llm.write_code_blocks`` and ``ba.llm.apply_diff`` are the
    built-in ones for answers that carry their own fences or diffs.
    """
    first = ba.llm.parse_code_blocks(OPEN_FENCE + completion.text)[0]
    target = branch.resolve("calc.py")
    await anyio.Path(target).write_text(first.code)
    return ["calc.py"]


def make_repository(root: Path) -> Path:
    """``root/calc-repo``: a bug and the test that catches it."""
    repo = root / "calc-repo"
    repo.mkdir(parents=True)
    (repo / "calc.py").write_text(BUGGY)
    (repo / "test_calc.py").write_text(TEST)
    return repo


async def best_of_n(
    repo: Path, model: Any, *, n: int = 8, sampling: Mapping[str, Any] | None = None,
    strategy: str = "best_of_n", served_model: str | None = None, backend: str = "copy",
) -> ba.Outcome:
    """Ask ``model`` (a vllm.LLM, an openai client or a Source) for ``n`` fixes of ``repo``."""
    async with ba.open_workspace(repo, backend=backend) as ws:
        return await ba.llm.solve(
            ws, model, PROMPT, n=n, apply=apply_answer, verify=VERIFY,
            strategy="speculate" if strategy == "speculate" else "best_of_n",
            model=served_model, sampling=sampling,
        )


@contextlib.asynccontextmanager
async def open_model(spec: str, *, dtype: str, max_model_len: int | None) -> AsyncIterator[Any]:
    """A vllm.LLM for a model directory, or an async openai client for a server URL."""
    if spec.startswith(("http://", "https://")):
        # Optional (pip install 'branchagent[llm]'); imported by name, so type checks pass
        # where it is not installed.
        openai = importlib.import_module("openai")
        client = openai.AsyncOpenAI(base_url=spec, api_key=os.environ.get("OPENAI_API_KEY", "x"))
        try:
            yield client
        finally:
            with anyio.CancelScope(shield=True):
                await client.close()
        return
    # vLLM on a CPU (see the project's notes): a bounded KV cache, the engine in-process.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    from vllm import LLM

    kwargs: dict[str, Any] = {"model": spec, "dtype": dtype, "enforce_eager": True, "seed": 0}
    if max_model_len is not None:
        kwargs["max_model_len"] = max_model_len
    llm = await anyio.to_thread.run_sync(functools.partial(LLM, **kwargs))
    yield llm


def report(outcome: ba.Outcome, repo: Path) -> str:
    """A table of the candidates and what became of them."""
    lines = [f"{'#':>2}  {'logprob':>8}  {'verified':8}  first line of the answer"]
    for r in outcome.results:
        info = r.info
        first = next((ln for ln in str(info.get("text", "")).splitlines() if ln.strip()), "")
        verified = "yes" if r.success else ("no" if r.error is None else "error")
        mark = "*" if outcome.winner is not None and r.index == outcome.winner.index else " "
        lines.append(f"{r.index:>2}{mark} {info.get('logprob_score', float('nan')):8.3f}  "
                     f"{verified:8}  {first[:60]!r}")
        if r.error:
            lines.append(f"{'':14}{r.error[:100]}")
    if outcome.winner is not None:
        lines.append(f"committed candidate {outcome.winner.index}: {list(outcome.winner.changes)}")
        lines.append((repo / "calc.py").read_text())
    else:
        lines.append("no candidate passed the test: nothing committed")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--model", required=True, help="model directory or server base URL")
    parser.add_argument("--served-model", help="the server's model name (default: its first)")
    parser.add_argument("--n", type=int, default=8, help="candidates in the one model call")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--strategy", choices=["best_of_n", "speculate"], default="best_of_n")
    parser.add_argument("--dtype", default="float32", help="offline model dtype (CPU: float32)")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--workdir", type=Path, help="where to make the repository (default: tmp)")
    parser.add_argument("--json", type=Path, help="write the outcome as JSON here")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each branch")
    args = parser.parse_args(argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(
        logging.INFO if args.verbose else logging.WARNING))
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="vllm-best-of-n-"))
    repo = make_repository(workdir)
    sampling = {"max_tokens": args.max_tokens, "temperature": args.temperature,
                "seed": args.seed}

    async def run() -> ba.Outcome:
        async with open_model(args.model, dtype=args.dtype,
                              max_model_len=args.max_model_len) as model:
            return await best_of_n(repo, model, n=args.n, sampling=sampling,
                                   strategy=args.strategy, served_model=args.served_model)

    outcome = anyio.run(run)
    print(report(outcome, repo))
    if args.json is not None:
        args.json.write_text(outcome.to_json(indent=2))
    return 0 if outcome.committed else 1


if __name__ == "__main__":
    sys.exit(main())
