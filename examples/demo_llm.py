"""A real small model fixes a failing test: 8 samples, 8 branches, pytest in each, one commit.

    make demo-llm                                   # sets up .venv-vllm and the model first
    python examples/demo_llm.py --model .models/smollm2 [--n 8] [--seed 0] [--backend copy]

It makes a repository whose pytest test fails (``add()`` subtracts), asks
SmolLM2-135M-Instruct (an offline ``vllm.LLM`` in this process; the folder
comes from ``scripts/make_smollm2.py``) for the corrected ``calc.py``: one
call, ``n`` samples with logprobs. Each answer's code block is written into
its own copy-on-write branch (apply mode ``file:calc.py``), pytest runs in
every branch, and the passing answer with the best mean token logprob is
committed; the other branches vanish. It prints each candidate, then a
summary: samples, how many verified, the winner, and where the time went
(loading the model, generating, branch work).

Run it with the vLLM venv's Python (``make vllm``). Exit status: 0 when a fix
was committed, 1 when no answer passed.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import structlog

import branchagent as ba
import branchagent.llm

BUGGY = '''\
def add(a, b):
    return a - b
'''

TEST = '''\
from calc import add


def test_add():
    assert add(2, 3) == 5
    assert add(-1, 1) == 0
'''

PROMPT = [
    {"role": "user", "content": (
        "Here is calc.py:\n```python\n" + BUGGY + "```\n"
        "The test fails because add subtracts. Write the corrected calc.py, where "
        "add(a, b) returns a + b. Reply with only the code in one ```python block."
    )},
]

#: pytest in the branch, with this interpreter (no cache, no bytecode, no third-party
#: plugins: only calc.py may change).
VERIFY = ba.Command(
    [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_calc.py"],
    env={"PYTHONDONTWRITEBYTECODE": "1", "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"},
    limits=ba.Limits(timeout=60),
)

#: What ``branchagent serve --apply file:calc.py`` does: the answer's one code block.
APPLY = functools.partial(ba.llm.write_file, path="calc.py")


def make_repository(root: Path) -> Path:
    """``root/calc-repo``: a bug and the pytest test that catches it."""
    repo = root / "calc-repo"
    repo.mkdir(parents=True)
    (repo / "calc.py").write_text(BUGGY)
    (repo / "test_calc.py").write_text(TEST)
    return repo


def load_model(path: Path, *, max_model_len: int = 1024) -> Any:
    """An offline ``vllm.LLM`` for ``path``, in this process, with the CPU settings."""
    # vLLM on a CPU (see docs/llm.md): a bounded KV cache, the engine in-process, float32.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    from vllm import LLM

    return LLM(model=os.fspath(path), dtype="float32", max_model_len=max_model_len,
               enforce_eager=True, seed=0)


async def fix(repo: Path, model: Any, *, n: int = 8, seed: int = 0, max_tokens: int = 128,
              backend: str = "copy") -> ba.Outcome:
    """Ask ``model`` for ``n`` versions of calc.py; verify each in a branch; commit the best."""
    async with ba.open_workspace(repo, backend=backend) as ws:
        return await ba.llm.solve(
            ws, model, PROMPT, n=n, apply=APPLY, verify=VERIFY,
            sampling={"max_tokens": max_tokens, "temperature": 0.7, "top_p": 0.95,
                      "seed": seed},
        )


def _first_code_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines()]
    return next((ln for ln in lines if ln and not ln.startswith("```")), "")


def why_failed(r: ba.Result) -> str:
    """One line from a failed candidate's record: the apply error, or pytest's last line."""
    applied = r.info["apply"]
    if applied["ok"] is False:
        return str(applied["error"])
    tail = str((r.info.get("verify") or {}).get("stdout_tail") or "").strip().splitlines()
    return tail[-1] if tail else str(r.error or "")


def report(outcome: ba.Outcome, repo: Path, *, load: float, total: float) -> str:
    """Each candidate, then the summary lines."""
    lines = [f"{'#':>2}  {'logprob':>8}  {'verified':8}  first line of the answer"]
    for r in outcome.results:
        mark = "*" if outcome.winner is not None and r.index == outcome.winner.index else " "
        verified = "yes" if r.success else "no"
        lines.append(f"{r.index:>2}{mark} {r.info['logprob_score']:8.3f}  {verified:8}  "
                     f"{_first_code_line(r.info['text'])[:60]!r}")
        if not r.success:
            lines.append(f"{'':14}{why_failed(r)[:100]}")
    generation = float(outcome.info["llm"]["sample_duration"])
    passed = sum(r.success for r in outcome.results)
    lines += [
        "",
        f"samples: {len(outcome.results)} in one model call, "
        f"{len({r.branch for r in outcome.results})} branches, pytest in each",
        f"verified: {passed} of {len(outcome.results)}",
    ]
    if outcome.winner is not None:
        lines.append(f"winner: candidate {outcome.winner.index} (best mean logprob among the "
                     f"verified), committed: {list(outcome.winner.changes)}")
        lines.append("calc.py now:")
        lines += ["    " + ln for ln in (repo / "calc.py").read_text().splitlines()]
    else:
        lines.append("winner: none; nothing committed")
    lines.append(f"time: model load {load:.1f} s, generation {generation:.1f} s, "
                 f"branch work (apply + pytest + commit) {total - generation:.1f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--model", type=Path, default=Path(".models/smollm2"),
                        help="the model folder (make smollm2; default .models/smollm2)")
    parser.add_argument("--n", type=int, default=8, help="samples in the one model call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--backend", default="copy",
                        help="workspace backend (default copy; fuse where pyfuse3 is installed)")
    parser.add_argument("--workdir", type=Path, help="where to make the repository (default: tmp)")
    parser.add_argument("--json", type=Path, help="write the outcome as JSON here")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each branch")
    args = parser.parse_args(argv)
    if not (args.model / "config.json").is_file():
        parser.error(f"--model {args.model}: no model folder there (no config.json); make it "
                     f"with `make smollm2` or `python scripts/make_smollm2.py {args.model}`")
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(
        logging.INFO if args.verbose else logging.WARNING))
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="demo-llm-"))
    repo = make_repository(workdir)
    print(f"repository: {repo} (test_calc.py fails: add() subtracts)")
    print(f"model: {args.model}, n={args.n}, seed={args.seed}, backend={args.backend}")

    started = time.monotonic()
    model = load_model(args.model)
    load = time.monotonic() - started

    async def run() -> ba.Outcome:
        return await fix(repo, model, n=args.n, seed=args.seed, max_tokens=args.max_tokens,
                         backend=args.backend)

    started = time.monotonic()
    outcome = anyio.run(run)
    total = time.monotonic() - started
    print(report(outcome, repo, load=load, total=total))
    if args.json is not None:
        args.json.write_text(outcome.to_json(indent=2))
    return 0 if outcome.committed else 1


if __name__ == "__main__":
    sys.exit(main())
