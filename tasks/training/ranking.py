"""Prefect tasks of a next-item ranking run: train (with early stopping) and evaluate.

Any registered recommender goes through the same two tasks; they talk through the store
(`training/<flow>/<run_id>/`): `train_task` writes the checkpoint (weights, its own config, the
learning curve), `evaluate_task` reloads it and writes `metrics.json` and `predictions.parquet`
(one row per test user: user_id, target, rank, top10), plus Prefect artifacts.
"""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import dataclass

import numpy as np
import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from sidpipe.models.recommender import Recommender
from sidpipe.storage.layout import METRICS_FILE, PREDICTIONS_FILE, training_dir
from sidpipe.storage.store import ArtifactStore
from sidpipe.tasks.training.checkpoint import build, load_checkpoint, save_checkpoint
from sidpipe.tasks.training.config import TrainConfig
from sidpipe.tasks.training.data import TrainingData, load_training_data, split
from sidpipe.tasks.training.evaluate import evaluate_ranking, validation_metrics
from sidpipe.tasks.training.loop import count_parameters, pick_device, seed_everything, train

log = logging.getLogger(__name__)
METRIC_KEYS = ("recall@5", "recall@10", "ndcg@5", "ndcg@10")


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads"


def epoch_lines(config: TrainConfig):
    """One log line per finished epoch (the steps' progress comes from the training loop)."""
    logger = get_run_logger()

    def report(epoch: int, epochs: int, row: dict) -> None:
        valid = f", valid NDCG@10 {row['valid_ndcg@10']:.4f}" if "valid_ndcg@10" in row else ""
        logger.info(
            "epoch %d/%d: loss %.4f in %.1fs%s", epoch, epochs, row["loss"], row["seconds"], valid
        )

    return report


@dataclass
class Trained:
    rec: Recommender
    training: TrainingData
    history: list[dict]
    steps_per_epoch: int
    seconds: float


def train_model(
    store: ArtifactStore, config: TrainConfig, progress=None, training: TrainingData | None = None
) -> Trained:
    """Load the data (unless given), build the configured model and train it (the best
    weights kept)."""
    started = time.perf_counter()
    if training is None:
        log.info(
            "prepare: reading %s's published SIDs and %s",
            config.data.catalog,
            config.data.interactions,
        )
        training = load_training_data(store, config.data)
    data = training.data
    log.info(
        "prepare: %s users, %s items read in %.1fs; building %s",
        f"{len(data.users):,}",
        f"{data.n_items:,}",
        time.perf_counter() - started,
        config.model.kind,
    )
    seed_everything(config)
    device = pick_device(config)
    rec = build(config, training)
    rec.module.to(device)
    train_examples = split(data, config.data.max_history, "train")
    valid = split(data, config.data.max_history, "valid")
    valid_rows = np.arange(len(valid))
    if config.loop.valid_users and config.loop.valid_users < len(valid_rows):
        rng = np.random.default_rng(config.seed)
        valid_rows = np.sort(rng.choice(valid_rows, config.loop.valid_users, replace=False))
    batches = rec.batches(data, train_examples, config.loop.batch_size, config.seed)
    log.info(
        "training %s (%s params) on %s: %d users, %d items, tasks %s, %d steps/epoch",
        config.model.kind,
        f"{count_parameters(rec.module):,}",
        device,
        len(data.users),
        data.n_items,
        ",".join(rec.summary().get("tasks", [])),
        batches.steps_per_epoch,
    )
    started = time.perf_counter()
    history = train(
        rec,
        batches,
        lambda: validation_metrics(rec, valid, valid_rows, config.eval),
        config.loop,
        progress,
        f"train {config.name}",
    )
    seconds = time.perf_counter() - started
    return Trained(rec, training, history, batches.steps_per_epoch, seconds)


def evaluate_run(store: ArtifactStore, flow: str, run_id: str, device=None) -> tuple[dict, object]:
    """Test metrics and predictions of a trained run, from its checkpoint alone (its config.json
    says which data, model and evaluation settings). Writes nothing."""
    config, training, rec = load_checkpoint(store, training_dir(flow, run_id), device or "cpu")
    test = split(training.data, config.data.max_history, "test")
    metrics, predictions = evaluate_ranking(
        rec, training.data, test, training.popularity(), config.eval
    )
    return {**metrics, "published": training.published, "run_id": run_id}, predictions


@task(name="train-recommender", cache_policy=NO_CACHE)
def train_task(store: ArtifactStore, config: TrainConfig, flow: str, run_id: str) -> dict:
    trained = train_model(store, config, epoch_lines(config))
    where = training_dir(flow, run_id)
    save_checkpoint(store, where, config, trained.training, trained.rec, trained.history)
    best = [row["epoch"] for row in trained.history if row.get("best")]
    return {
        "epochs": len(trained.history),
        "best_epoch": best[-1] if best else None,
        "train_seconds": trained.seconds,
        "users": len(trained.training.data.users),
        "items": trained.training.data.n_items,
        "tasks": trained.rec.summary().get("tasks", []),
        "dropped_interactions": trained.training.dropped_interactions,
    }


@task(name="evaluate-recommender", cache_policy=NO_CACHE)
def evaluate_task(
    store: ArtifactStore, config: TrainConfig, flow: str, run_id: str, trained: dict
) -> dict:
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    metrics, predictions = evaluate_run(store, flow, run_id, pick_device(config))
    metrics = {
        **metrics,
        **trained,
        "model": config.model.kind,
        "config": config.name,
        "seed": config.seed,
        "machine": machine(),
        "published": metrics["published"],
        "run_id": run_id,
    }
    where = training_dir(flow, run_id)
    store.write_parquet(predictions, *where, PREDICTIONS_FILE)
    store.write_json(metrics, *where, METRICS_FILE)
    keys = (*METRIC_KEYS, "invalid_rate")
    create_table_artifact(
        [{"metric": k, "value": round(metrics[k], 4)} for k in keys],
        key=f"{flow}-metrics",
        description=f"{config.name} ({config.model.kind}) test metrics, run {run_id}",
    )
    create_markdown_artifact(
        report_markdown(metrics), key=f"{flow}-report", description=f"{config.name} report"
    )
    return metrics


def metric_rows(metrics: dict) -> list[tuple[str, dict]]:
    """("all", overall metrics) then one row per popularity bucket."""
    return [("all", metrics), *metrics["by_popularity"].items()]


def report_markdown(m: dict) -> str:
    lines = [
        f"### {m['config']} ({m['model']}), run {m['run_id']}",
        f"{m['users']:,} test users, {m['items']:,} items, {m['epochs']} epochs in "
        f"{m['train_seconds']:.0f}s on {m['machine']}",
        "",
        "| | R@5 | R@10 | N@5 | N@10 | users |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, row in metric_rows(m):
        cells = " | ".join(f"{row[k]:.4f}" for k in METRIC_KEYS)
        lines.append(f"| {name} | {cells} | {row['users']:,} |")
    lines.append(f"\ninvalid SIDs without the trie: {m['invalid_rate']:.2%} of the top 10")
    return "\n".join(lines)
