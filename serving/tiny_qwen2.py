"""Build a tiny, randomly initialised Qwen2-style chat model that vLLM's CPU build can serve.

Run with the vLLM virtualenv's Python (it has transformers and tokenizers; the pipeline's env
does not need them):  python serving/tiny_qwen2.py OUT_DIR [--corpus FILE]

- a byte-level BPE tokenizer trained here on the corpus (default: the bundled sample's titles),
  with Qwen2's ChatML special tokens and chat template, and GME's vision tokens (so the same
  model serves the GME chat template on the pooling runner, text-only);
- a Qwen2 config sized for vLLM's CPU attention: hidden 128, 4 heads of 32 (CPU attention takes
  head sizes 32, 64, 80 ... 512), 2 KV heads, 2 layers, vocab = the tokenizer's length;
- random weights from a fixed seed, saved as safetensors in float32.

Random weights write nonsense: tests against it check the protocol and the accounting, not
quality. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VISION = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SAMPLE = Path(__file__).resolve().parent.parent / "data" / "fashion-sample" / "catalog.csv"


def corpus(path: Path) -> list[str]:
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    texts = [" ".join(str(v) for v in row.values() if v) for row in rows]
    # JSON punctuation and words the prompts use, so constrained decoding has tokens for them
    return texts + ['{"reasoning": "", "interests": ["a", "b"]}', "You are a helpful assistant."]


def build(out: Path, texts: list[str], seed: int = 0) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2048,
        special_tokens=SPECIAL + VISION,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", *VISION],
    )
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(out)

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        torch_dtype="float32",
    )
    Qwen2ForCausalLM(config).save_pretrained(out, safe_serialization=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--corpus", type=Path, default=SAMPLE)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    build(args.out, corpus(args.corpus), args.seed)
    print(f"tiny Qwen2 chat model in {args.out}")


if __name__ == "__main__":
    main()
