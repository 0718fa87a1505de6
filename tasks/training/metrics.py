"""The metrics the training flows report, computed from the rows they write to predictions.

Ranking (leave-one-out, full ranking): Recall@K and NDCG@K from the 0-based rank of each user's
target (-1: not ranked in the top K). CTR: AUC, GAUC (per-user AUC weighted by the user's
impressions; users whose impressions are all clicks or all non-clicks are skipped and counted)
and log loss. Both split by item popularity: head = the top 20% of items by training
interactions, torso = the next 30%, tail = the bottom 50%.

Pure numpy: a test recomputes the published metrics from `predictions.parquet` with these.
"""

from __future__ import annotations

import numpy as np

KS = (5, 10)
BUCKETS = ("head", "torso", "tail")


def ranking_metrics(ranks: np.ndarray) -> dict[str, float]:
    """Recall@K and NDCG@K (K = 5, 10) of 0-based target ranks (-1: not found)."""
    out = {}
    for k in KS:
        hit = (ranks >= 0) & (ranks < k)
        out[f"recall@{k}"] = float(hit.mean()) if len(ranks) else 0.0
        gains = np.where(hit, 1.0 / np.log2(np.maximum(ranks, 0) + 2), 0.0)
        out[f"ndcg@{k}"] = float(gains.mean()) if len(ranks) else 0.0
    return out


def popularity_buckets(popularity: np.ndarray) -> np.ndarray:
    """0 head (top 20% of items by training interactions), 1 torso, 2 tail (bottom 50%)."""
    order = np.argsort(-popularity, kind="stable")
    bucket = np.full(len(popularity), 1, np.int64)
    bucket[order[: int(0.2 * len(order))]] = 0
    bucket[order[int(0.5 * len(order)) :]] = 2
    return bucket


def by_bucket(
    metric, buckets: np.ndarray, *columns: np.ndarray, count: str = "rows"
) -> dict[str, dict]:
    """`metric(*columns)` on the rows of each popularity bucket, with how many rows it covers
    (under the key `count`)."""
    return {
        name: {count: int((buckets == b).sum()), **metric(*(c[buckets == b] for c in columns))}
        for b, name in enumerate(BUCKETS)
    }


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (ties count half); NaN with only one class."""
    labels = np.asarray(labels, bool)
    positives, negatives = labels.sum(), (~labels).sum()
    if positives == 0 or negatives == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = np.asarray(scores, np.float64)[order]
    ranks = np.empty(len(scores), np.float64)
    # average ranks of tied scores (1-based)
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    average = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(average, counts)
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def gauc(users: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """Per-user AUC weighted by each user's impressions; users with one class are skipped."""
    users, labels, scores = np.asarray(users), np.asarray(labels, bool), np.asarray(scores)
    order = np.argsort(users, kind="stable")
    users, labels, scores = users[order], labels[order], scores[order]
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    ends = np.r_[starts[1:], len(users)]
    total, weight, skipped = 0.0, 0, 0
    for a, b in zip(starts, ends, strict=True):
        value = auc(labels[a:b], scores[a:b])
        if np.isnan(value):
            skipped += 1
            continue
        total += value * (b - a)
        weight += b - a
    return {"gauc": total / weight if weight else float("nan"), "gauc_users_skipped": skipped}


def logloss(labels: np.ndarray, probabilities: np.ndarray, eps: float = 1e-7) -> float:
    p = np.clip(np.asarray(probabilities, np.float64), eps, 1 - eps)
    y = np.asarray(labels, np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def ctr_metrics(users: np.ndarray, labels: np.ndarray, probabilities: np.ndarray) -> dict:
    """AUC, GAUC (with the users it skipped) and log loss of click predictions."""
    return {
        "auc": auc(labels, probabilities),
        **gauc(users, labels, probabilities),
        "logloss": logloss(labels, probabilities),
    }
