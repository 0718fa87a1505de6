"""Benchmark: RQ-KMeans with progressive-dimension k-means against plain k-means, on Beauty.

Progressive-dimension k-means (`tokenizer.kmeans_dim_steps`, default 10; faiss's
`ProgressiveDimClustering` with PCA, as faiss's ResidualQuantizer trains) closed most of the
reconstruction gap to faiss on the million-item synthetic catalog (`bench/tokenizer_scale.py`).
This checks the small-catalog side at 3 x 256 on the 12,101 Beauty items (all-MiniLM-L6-v2
embeddings, cached in bench/.cache/), on three seeds: balanced RQ-KMeans on plain k-means with
prices at each code's even share (the default before), and on progressive-dimension k-means
with prices from 3x (the default now) or 2x that share, or none (plain).

    python bench/kmeans_dims.py        # ~3 minutes (plus ~3 to embed Beauty the first time)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.beauty import beauty_embeddings  # noqa: E402
from bench.tokenizers import machine  # noqa: E402
from sidpipe.config import TokenizerConfig  # noqa: E402
from sidpipe.models import balance  # noqa: E402
from sidpipe.models.sids import sid_quality  # noqa: E402
from sidpipe.models.tokenizer import fit_tokenizer, reconstruction_cosine  # noqa: E402

SIZES = [256, 256, 256]
SEEDS = (42, 7, 1)
# name: (balanced_codes, kmeans_dim_steps, balance.CAPACITY); the first is the default before
VARIANTS = {
    "balanced, plain k-means": (True, 1, 1.0),
    "balanced x3, progressive": (True, 10, 3.0),
    "balanced x2, progressive": (True, 10, 2.0),
    "plain, progressive": (False, 10, 3.0),
}


def measure(x: np.ndarray, balanced: bool, dim_steps: int, capacity: float, seed: int) -> dict:
    config = TokenizerConfig(
        method="rqkmeans",
        codebook_sizes=SIZES,
        balanced_codes=balanced,
        kmeans_dim_steps=dim_steps,
        seed=seed,
    )
    default, balance.CAPACITY = balance.CAPACITY, capacity  # an algorithm constant, not a setting
    try:
        started = time.perf_counter()
        tokenizer, _ = fit_tokenizer(x, SIZES, config)
        fit_s = time.perf_counter() - started
    finally:
        balance.CAPACITY = default
    codes = tokenizer.encode(x)
    quality = sid_quality(codes, SIZES)
    return {
        "distinct": quality["distinct_tuple_rate"],
        "cosine": reconstruction_cosine(tokenizer, x, codes),
        "perplexity": "/".join(f"{lv['perplexity']:.0f}" for lv in quality["levels"]),
        "fit_s": fit_s,
    }


def main() -> None:
    _, x = beauty_embeddings()
    print(f"Beauty, {len(x):,} items x {x.shape[1]}, rqkmeans {SIZES}; {machine()}")
    print("| variant | seed | distinct | cosine | perplexity | fit s |")
    print("|---|---:|---:|---:|---|---:|")
    rows = {}
    for name, variant in VARIANTS.items():
        for seed in SEEDS:
            r = rows[name, seed] = measure(x, *variant, seed)
            print(
                f"| {name} | {seed} | {r['distinct']:.4f} | {r['cosine']:.4f} "
                f"| {r['perplexity']} | {r['fit_s']:.1f} |",
                flush=True,
            )
    baseline = next(iter(VARIANTS))
    for name in list(VARIANTS)[1:]:
        ratios = {
            key: np.mean([rows[name, s][key] / rows[baseline, s][key] for s in SEEDS])
            for key in ("distinct", "cosine")
        }
        print(
            f"{name} / {baseline}: distinct {ratios['distinct']:.4f}x, "
            f"cosine {ratios['cosine']:.4f}x (mean over seeds {SEEDS})"
        )


if __name__ == "__main__":
    main()
