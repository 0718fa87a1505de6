"""The one ranking evaluator: full ranking of every item for each example, whatever the model.

A model that scores (`ranking = "score"`) is ranked exactly, ties counted against the target (a
collapsed model must not score well); a model that generates (`ranking = "generate"`) is ranked
by its constrained decoding, and two checks of that decoding are added: how often decoding
without the trie names no item (`invalid_rate`), and how its top 10 compares with exact scores
of every item (`beam_exact_*`). With cold items held out, the same metrics on the test users
whose target is a cold item (`cold_items`). The predictions the metrics come from are returned as a table
(one row per test user: target, rank, top 10), so anyone can recompute the metrics.
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import torch

from sidpipe.models.recommender import Examples, RecData, Recommender
from sidpipe.progress import Progress
from sidpipe.tasks.training.config import EvalConfig
from sidpipe.tasks.training.metrics import (
    BUCKETS,
    by_bucket,
    popularity_buckets,
    ranking_metrics,
)

TOP = 10


def rank_targets(
    rec: Recommender,
    examples: Examples,
    rows: np.ndarray,
    config: EvalConfig,
    label: str = "rank",
) -> tuple[np.ndarray, np.ndarray]:
    """0-based rank of each row's target (-1: not in the top `beams`) and the top 10 items."""
    ranks = np.full(len(rows), -1, np.int64)
    top = np.full((len(rows), TOP), -1, np.int64)
    with Progress(label, total=len(rows), unit="users", artifact=False) as bar:
        for start in range(0, len(rows), config.batch_size):
            chunk = examples.rows(rows[start : start + config.batch_size])
            where = slice(start, start + len(chunk))
            if rec.ranking == "score":
                scores = rec.score(chunk)
                target = scores[torch.arange(len(chunk)), torch.from_numpy(chunk.target)]
                ranks[where] = ((scores >= target[:, None]).sum(1) - 1).numpy()
                top[where] = scores.topk(TOP, dim=1).indices.numpy()
            else:
                items, _ = rec.generate(chunk, config.beams)
                hit = items == chunk.target[:, None]
                ranks[where] = np.where(hit.any(1), hit.argmax(1), -1)
                top[where] = items[:, :TOP]
            bar.advance(len(chunk))
    return ranks, top


def validation_metrics(
    rec: Recommender, examples: Examples, rows: np.ndarray, config: EvalConfig
) -> dict[str, float]:
    ranks, _ = rank_targets(rec, examples, rows, config, "validation")
    return ranking_metrics(ranks)


def invalid_rate(rec: Recommender, examples: Examples, config: EvalConfig) -> dict[str, float]:
    """Share of unconstrained decoding's top 10 (and top 1) that names no catalog item."""
    invalid = top1 = 0
    with Progress("decode without the trie", len(examples), "users", artifact=False) as bar:
        for start in range(0, len(examples), config.batch_size):
            chunk = examples.rows(np.arange(start, min(start + config.batch_size, len(examples))))
            items, _ = rec.generate(chunk, config.beams, constrained=False)
            invalid += int((items[:, :TOP] < 0).sum())
            top1 += int((items[:, 0] < 0).sum())
            bar.advance(len(chunk))
    return {
        "invalid_rate": invalid / max(len(examples) * TOP, 1),
        "invalid_rate_top1": top1 / max(len(examples), 1),
    }


def exact_check(rec: Recommender, examples: Examples, config: EvalConfig) -> dict[str, float]:
    """Decoding vs exact scores of every item: same top-1, top-10 overlap, score agreement."""
    exact = rec.score_exactly(examples)
    items, scores = rec.generate(examples, config.beams)
    same_top1, overlap, worst = 0, 0.0, 0.0
    for b in range(len(examples)):
        found = [k for k in range(TOP) if np.isfinite(scores[b, k])]
        beam_items = items[b, found].tolist()
        exact_top = exact[b].topk(min(TOP, len(beam_items))).indices.tolist()
        same_top1 += beam_items[0] == exact_top[0]
        overlap += len(set(beam_items) & set(exact_top)) / len(beam_items)
        beam_scores = torch.tensor(scores[b, found], device=exact.device)
        worst = max(worst, (exact[b, beam_items] - beam_scores).abs().max().item())
    n = max(len(examples), 1)
    return {
        "beam_exact_top1_agreement": same_top1 / n,
        "beam_exact_overlap@10": overlap / n,
        "beam_exact_max_score_diff": worst,
    }


def evaluate_ranking(
    rec: Recommender,
    data: RecData,
    test: Examples,
    popularity: np.ndarray,
    config: EvalConfig,
) -> tuple[dict, pa.Table]:
    """Test metrics of a trained model (overall, by popularity, decoding checks) and the
        predictions they were computed from (with each target's popularity bucket and whether it is a
    cold item, so every reported split can be recomputed from the table)."""
    rows = np.arange(len(test))
    started = time.perf_counter()
    ranks, top = rank_targets(rec, test, rows, config, "test ranking")
    metrics: dict = {**ranking_metrics(ranks), "users": len(rows)}
    metrics["eval_seconds"] = time.perf_counter() - started
    buckets = popularity_buckets(popularity)[test.target]
    metrics["by_popularity"] = by_bucket(ranking_metrics, buckets, ranks, count="users")
    if data.cold is not None:  # recall on test targets that no training sequence held
        cold = data.cold[test.target]
        metrics["cold_items"] = {"users": int(cold.sum()), **ranking_metrics(ranks[cold])}
    predicted = top[top >= 0]
    metrics["predictions_valid"] = bool((predicted < data.n_items).all())
    if rec.ranking == "generate":
        metrics.update(invalid_rate(rec, test.rows(rows[: config.invalid_users]), config))
        if config.exact_check_users:
            metrics.update(exact_check(rec, test.rows(rows[: config.exact_check_users]), config))
    else:
        metrics["invalid_rate"] = 0.0  # a scoring model never names an item that does not exist
    predictions = pa.table(
        {
            "user_id": pa.array([data.users[u] for u in test.user], pa.string()),
            "target": pa.array([data.item_ids[t] for t in test.target], pa.string()),
            "rank": pa.array(ranks, pa.int64()),
            "top10": pa.array(
                [[data.item_ids[i] for i in r if i >= 0] for r in top], pa.list_(pa.string())
            ),
            "target_popularity": pa.array([BUCKETS[b] for b in buckets], pa.string()),
            "target_cold": pa.array(
                data.cold[test.target] if data.cold is not None else np.zeros(len(rows), bool)
            ),
        }
    )
    return metrics, predictions
