"""Build a tiny, randomly initialised Qwen2-style chat model that vLLM's CPU build can serve.

Run with the vLLM virtualenv's Python (it has transformers and tokenizers; the pipeline's env
does not need them):  python serving/tiny_qwen2.py OUT_DIR [--corpus FILE] [--vision]

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
VISION = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] in ('image', 'image_url') %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% endif %}{% endfor %}{% endif %}"
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


def tokenizer_for(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

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
    return tokenizer


def build(out: Path, texts: list[str], seed: int = 0) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = tokenizer_for(texts)
    tokenizer.save_pretrained(out)
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        torch_dtype="float32",
    )
    Qwen2ForCausalLM(config).save_pretrained(out, safe_serialization=True)


def build_vision(out: Path, texts: list[str], seed: int = 0) -> None:
    """A Qwen2-VL-style model: the same text side plus a 2-block vision tower; its processor
    caps an image at 16 tokens (the CPU build runs it in milliseconds). Needs a torchvision
    that works with the venv's torch (transformers builds the Qwen2-VL processor with it)."""
    import torch
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    tokenizer = tokenizer_for(texts)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (*SPECIAL, *VISION)}
    pixels = {"min_pixels": 4 * 28 * 28, "max_pixels": 16 * 28 * 28}  # 4 to 16 image tokens
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels),
        video_processor=Qwen2VLVideoProcessor(**pixels),
        tokenizer=tokenizer,
        chat_template=CHATML,
    )
    processor.save_pretrained(out)
    torch.manual_seed(seed)
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 1024,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1000000.0,
                "mrope_section": [4, 6, 6],  # sums to head size / 2
            },
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
        },
        vision_config={
            "depth": 2,
            "embed_dim": 64,
            "hidden_size": 128,
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    Qwen2VLForConditionalGeneration(config).save_pretrained(out, safe_serialization=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--corpus", type=Path, default=SAMPLE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vision", action="store_true", help="a Qwen2-VL-style model")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    (build_vision if args.vision else build)(args.out, corpus(args.corpus), args.seed)
    print(f"tiny {'Qwen2-VL' if args.vision else 'Qwen2'} model in {args.out}")


if __name__ == "__main__":
    main()
