"""Build a tiny random Llama model (and its tokenizer) offline, for the vLLM tests.

    python scripts/make_tiny_model.py OUT_DIR [--vocab 1024] [--seed 0]

Run it with the Python of the vLLM venv (``make vllm``: it has torch,
transformers and tokenizers). No hub access is needed: a byte-level BPE
tokenizer is trained on the standard library's own ``.py`` files, and a
``LlamaForCausalLM`` (hidden 128, 2 layers, 4 heads, head_dim 32: vLLM's CPU
attention takes head sizes 32, 64, 80, ... only) gets random float32 weights,
saved as safetensors (~2.4 MB). Its output is noise, but real noise: vLLM
loads it, samples ``n`` candidates with seeds, and reports their logprobs.
Building takes a couple of seconds; the same seed gives the same model.
"""

from __future__ import annotations

import argparse
import sysconfig
import time
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL = ["<s>", "</s>", "<pad>", "<unk>"]


def training_files(limit: int = 200) -> list[str]:
    """Local text to learn merges from: the standard library's Python files."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(str(p) for p in stdlib.glob("*.py"))
    return files[:limit]


def build(out: Path, *, vocab: int = 1024, seed: int = 0) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=SPECIAL, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train(training_files(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, head_dim=32,
        max_position_embeddings=512, bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False, torch_dtype="float32",
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(out, safe_serialization=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("out", type=Path, help="directory to write the model into")
    parser.add_argument("--vocab", type=int, default=1024, help="tokenizer vocabulary size")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args()
    started = time.monotonic()
    build(args.out, vocab=args.vocab, seed=args.seed)
    print(f"tiny model written to {args.out} in {time.monotonic() - started:.1f} s")


if __name__ == "__main__":
    main()
