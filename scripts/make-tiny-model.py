#!/usr/bin/env python3
"""Build a tiny Llama-architecture chat model from nothing: random weights, a byte-level BPE
tokenizer trained here on a few KB of text, a chat template. No network, a few seconds, the same
bytes every time (fixed seed, fixed text).

It answers gibberish on purpose: it exists so that a real `vllm serve` can load, serve, stream and
be killed in tests and benchmarks on a CPU, not to say anything.

Run it with the real-vLLM environment's Python (it has torch, transformers and tokenizers):
    .venv-vllm/bin/python scripts/make-tiny-model.py build/tiny-llama
"""

from __future__ import annotations

import sys
from pathlib import Path

# Sizes vLLM's CPU attention accepts: head_dim = hidden / heads must be 32 or more (16 is refused:
# "Unsupported CPU attention configuration: head_dim=16").
HIDDEN, HEADS, LAYERS, VOCAB, CONTEXT = 128, 2, 2, 512, 512
TEXT = (
    "The quick brown fox jumps over the lazy dog. "
    "Hello, world: this is a tiny model made from nothing, for tests. "
    "GPUs are given back to Slurm jobs the moment they need them. "
    "What is the capital of France? Paris. One, two, three, four, five. "
) * 40
TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)


def build(out: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TEXT.split(". "), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = TEMPLATE
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=CONTEXT,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        torch_dtype="float32",
    )
    LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)


def main() -> int:
    if len(sys.argv) != 2:
        print(f"usage: {sys.argv[0]} OUTPUT_DIR", file=sys.stderr)
        return 2
    try:
        build(Path(sys.argv[1]))
    except ImportError as e:
        print(f"make-tiny-model: {e}: run it with the real-vLLM environment (make real-vllm)", file=sys.stderr)
        return 2
    print(sys.argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
