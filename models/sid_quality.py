"""SID quality metrics with the names users already know (TorchEasyRec's report, TIGER papers).

Per level: utilization (share of codes used), perplexity (exp of the usage entropy: the number of
equally used codes it is worth), dead codes. Whole table: distinct code tuples per item, share of
items whose tuple is unique (before the suffix), largest bucket, Gini of bucket sizes.
"""

from __future__ import annotations

import numpy as np


def level_stats(codes: np.ndarray, codebook_size: int) -> dict[str, float | int]:
    counts = np.bincount(codes, minlength=codebook_size).astype(np.float64)
    used = int((counts > 0).sum())
    p = counts[counts > 0] / max(counts.sum(), 1)
    return {
        "codebook_size": codebook_size,
        "used_codes": used,
        "dead_codes": codebook_size - used,
        "utilization": used / codebook_size,
        "perplexity": float(np.exp(-(p * np.log(p)).sum())) if len(p) else 0.0,
    }


def gini(sizes: np.ndarray) -> float:
    """Gini coefficient of bucket sizes: 0 when every bucket holds the same number of items."""
    if len(sizes) == 0:
        return 0.0
    x = np.sort(np.asarray(sizes, dtype=np.float64))
    n = len(x)
    return float((2 * np.arange(1, n + 1) - n - 1).dot(x) / (n * x.sum()))


def bucket_sizes(codes: np.ndarray) -> np.ndarray:
    """Items per distinct code tuple."""
    if len(codes) == 0:
        return np.zeros(0, dtype=np.int64)
    _, counts = np.unique(codes, axis=0, return_counts=True)
    return counts


def sid_quality(codes: np.ndarray, codebook_sizes: list[int]) -> dict:
    """Quality of a code table [N, L] (before the collision suffix)."""
    n = len(codes)
    sizes = bucket_sizes(codes)
    return {
        "items": n,
        "levels": [level_stats(codes[:, i], k) for i, k in enumerate(codebook_sizes)],
        "distinct_tuples": int(len(sizes)),
        "distinct_tuple_rate": float(len(sizes) / n) if n else 0.0,
        "unique_item_rate": float((sizes == 1).sum() / n) if n else 0.0,
        "max_bucket": int(sizes.max()) if len(sizes) else 0,
        "bucket_gini": gini(sizes),
    }
