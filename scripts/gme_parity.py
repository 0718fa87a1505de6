"""Check that a vLLM-served GME gives GME's reference embeddings (run on a GPU host).

    # 1. a vLLM GME server (docker compose --profile gpu up gme-embedder), then, in an environment
    #    with GME's reference code (its remote code needs transformers<4.52):
    pip install "transformers>=4.45,<4.52" torch pillow httpx qwen-vl-utils
    python scripts/gme_parity.py --server http://localhost:8003/v1 \
        --model Alibaba-NLP/gme-Qwen2-VL-2B-Instruct --samples 20

It embeds sample products (image + title, and title alone) twice: with GME's own
`get_fused_embeddings` / `get_text_embeddings` in this process, and through the server with
exactly the request sidpipe sends (chat-style `messages` rendered by
serving/gme_chat_template.jinja). It prints the cosine of each pair and exits 1 if any is below
--min-cosine (default 0.99). It needs the model weights locally (HF cache or a path) and never
imports sidpipe, so it runs in GME's own environment.
"""

from __future__ import annotations

import argparse
import base64
import csv
import io
import sys
from pathlib import Path

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "fashion-sample"
INSTRUCTION = "You are a helpful assistant."


def data_url(path: Path) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.open(path).convert("RGB").save(buffer, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def server_embedding(client, server: str, model: str, text: str, image: Path | None):
    content = []
    if image is not None:
        content.append({"type": "image_url", "image_url": {"url": data_url(image)}})
    content.append({"type": "text", "text": text})
    response = client.post(
        f"{server}/embeddings",
        json={
            "model": model,
            "encoding_format": "float",
            "messages": [
                {"role": "system", "content": INSTRUCTION},
                {"role": "user", "content": content},
            ],
        },
    )
    response.raise_for_status()
    return response.json()["data"][0]["embedding"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", required=True, help="vLLM base URL, e.g. http://host:8003/v1")
    parser.add_argument("--model", default="Alibaba-NLP/gme-Qwen2-VL-2B-Instruct")
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--min-cosine", type=float, default=0.99)
    args = parser.parse_args()

    import httpx
    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoModel

    reference = AutoModel.from_pretrained(
        args.model, torch_dtype=torch.float16, device_map="cuda", trust_remote_code=True
    )
    with open(SAMPLE / "catalog.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))[: args.samples]

    def cosine(a, b) -> float:
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))

    worst = 1.0
    with httpx.Client(timeout=120) as client:
        for row in rows:
            image_path = SAMPLE / row["image"]
            fused = (
                reference.get_fused_embeddings(
                    texts=[row["title"]],
                    images=[Image.open(image_path).convert("RGB")],
                    instruction=INSTRUCTION,
                )[0]
                .float()
                .cpu()
                .numpy()
            )
            text_only = (
                reference.get_text_embeddings(texts=[row["title"]], instruction=INSTRUCTION)[0]
                .float()
                .cpu()
                .numpy()
            )
            pairs = {
                "image+text": (
                    fused,
                    server_embedding(client, args.server, args.model, row["title"], image_path),
                ),
                "text": (
                    text_only,
                    server_embedding(client, args.server, args.model, row["title"], None),
                ),
            }
            for kind, (ref, served) in pairs.items():
                c = cosine(ref, served)
                worst = min(worst, c)
                print(f"{row['item_id']:>8} {kind:<10} cosine {c:.4f}")
    print(f"worst cosine {worst:.4f} (target >= {args.min_cosine})")
    return 0 if worst >= args.min_cosine else 1


if __name__ == "__main__":
    sys.exit(main())
