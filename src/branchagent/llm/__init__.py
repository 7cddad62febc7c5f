"""vLLM glue: a model's ``n`` candidates become branches; the verified best is committed.

One model call proposes ``n`` answers (the prompt is processed once); each is
applied in its own copy-on-write branch, verified there, and the winner is
committed::

    import anyio, branchagent as ba, branchagent.llm
    from vllm import LLM

    async def main() -> None:
        llm = LLM(model="path/to/model", dtype="float32")
        async with ba.open_workspace("repo") as ws:
            outcome = await ba.llm.solve(
                ws, llm, "Fix the failing test. Reply with a unified diff.",
                n=8, apply=ba.llm.apply_diff, verify=ba.Command(["pytest", "-q"]),
                sampling={"temperature": 0.8, "max_tokens": 512, "seed": 0},
            )
            print(outcome.winner)

    anyio.run(main)

The pieces, each usable alone:

- Sources (:class:`VLLMSource`, :class:`OpenAISource`, :func:`as_source`):
  an offline ``vllm.LLM`` or an ``openai.AsyncOpenAI`` client of ``vllm serve``
  (install the client with ``pip install 'branchagent[llm]'``).
- :class:`Completion`, read from either API (:func:`completions_from_vllm`,
  :func:`completions_from_openai`), and scorers of its logprobs
  (:func:`cumulative_logprob`, :func:`mean_logprob`, :func:`length_normalized`,
  :func:`gnmt_normalized`).
- Actions (:func:`apply_diff`, :func:`write_code_blocks`, :func:`write_file`,
  :func:`run_command`, :func:`apply_auto`), or any ``apply(branch, completion)`` of your own.
- :func:`as_candidate` turns a completion into a candidate for any strategy;
  :func:`solve` does the whole loop with ``BestOfN`` or ``Speculate``.

Errors: :class:`ApplyError` (a completion cannot be applied: it fails that
candidate only) and :class:`SourceError` (the model call failed), both
:class:`LLMError`, a :class:`~branchagent.BranchAgentError`.
"""

from __future__ import annotations

from ._actions import (
    Apply,
    CodeBlock,
    apply_auto,
    apply_diff,
    check_relative_path,
    extract_command,
    parse_code_blocks,
    pick_code_block,
    run_command,
    write_code_blocks,
    write_file,
)
from ._completion import (
    SCORERS,
    Completion,
    Scorer,
    completions_from_openai,
    completions_from_vllm,
    cumulative_logprob,
    get_scorer,
    gnmt_normalized,
    length_normalized,
    mean_logprob,
)
from ._diff import FilePatch, Hunk, apply_hunks, looks_like_diff, parse_unified_diff
from ._errors import ApplyError, LLMError, SourceError
from ._solve import (
    TEXT_LIMIT,
    as_candidate,
    cap_text,
    describe_apply,
    describe_completion,
    solve,
)
from ._sources import OpenAISource, Prompt, Source, VLLMSource, as_source, check_sampling

__all__ = [
    "SCORERS",
    "TEXT_LIMIT",
    "Apply",
    "ApplyError",
    "CodeBlock",
    "Completion",
    "FilePatch",
    "Hunk",
    "LLMError",
    "OpenAISource",
    "Prompt",
    "Scorer",
    "Source",
    "SourceError",
    "VLLMSource",
    "apply_auto",
    "apply_diff",
    "apply_hunks",
    "as_candidate",
    "as_source",
    "cap_text",
    "check_relative_path",
    "check_sampling",
    "completions_from_openai",
    "completions_from_vllm",
    "cumulative_logprob",
    "describe_apply",
    "describe_completion",
    "extract_command",
    "get_scorer",
    "gnmt_normalized",
    "length_normalized",
    "looks_like_diff",
    "mean_logprob",
    "parse_code_blocks",
    "parse_unified_diff",
    "pick_code_block",
    "run_command",
    "solve",
    "write_code_blocks",
    "write_file",
]
