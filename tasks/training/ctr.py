"""Prefect tasks of a click-model comparison: prepare the rows once, train and score each model
and seed on them, and report.

Every model sees the same stored rows (`ctr_data.py`), the same loop and budget (`loop.py`,
validation AUC for early stopping), and is scored on the same test rows; `predictions.parquet`
holds every score (user_id, item_id, label, score, model, seed) and `metrics.json` what was
computed from it (`ctr_report`), so anyone can recompute the metrics.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pyarrow as pa
import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from sidpipe.errors import TrainingDataError
from sidpipe.models.ctr import ClickModel, CTRBatches, CTRNet, ItemSide
from sidpipe.storage.layout import TOKENIZER_CONFIG, tokenizer_dir
from sidpipe.storage.published import resolve_run
from sidpipe.storage.store import ArtifactStore
from sidpipe.tasks.training.config import AKTRecTrainConfig
from sidpipe.tasks.training.ctr_data import CTRData, load_ctr_data
from sidpipe.tasks.training.data import load_training_data
from sidpipe.tasks.training.loop import count_parameters, train
from sidpipe.tasks.training.metrics import auc, ctr_metrics

log = logging.getLogger(__name__)
SPLIT_NAMES = ("head_items", "tail_items", "low_activity_users")


def device_for(config: AKTRecTrainConfig) -> torch.device:
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(config.device)


def check_levels(levels: int, config: AKTRecTrainConfig) -> None:
    """Clusters are SID prefixes: there cannot be more cluster levels than SID levels."""
    if config.model.cluster_levels > levels:
        raise TrainingDataError(
            f"model.cluster_levels is {config.model.cluster_levels}, but the published SIDs of "
            f"{config.data.catalog} have {levels} levels",
            hint=f"set model.cluster_levels to at most {levels}",
        )


def check_published_levels(store: ArtifactStore, config: AKTRecTrainConfig) -> None:
    """`check_levels` from the published run's tokenizer, before Prefect starts."""
    manifest = resolve_run(store, config.data.catalog, config.data.run_date)
    tokenizer = store.read_json(*tokenizer_dir(manifest.tokenizer_id), TOKENIZER_CONFIG)
    check_levels(len(tokenizer["codebook_sizes"]), config)


@task(name="ctr-samples", cache_policy=NO_CACHE)
def prepare_task(store: ArtifactStore, config: AKTRecTrainConfig) -> CTRData:
    training = load_training_data(store, config.data)
    check_levels(training.data.codes.shape[1], config)
    d = config.data
    return load_ctr_data(store, training, d.max_history, d.negatives, d.sample_seed)


def ctr_report(
    data: CTRData, rows, probabilities: np.ndarray, head: np.ndarray, low_share: float
) -> dict:
    """AUC, GAUC, log loss overall and on head items, tail items, low-activity users."""
    low_cut = np.quantile(data.user_clicks, low_share)
    parts = {
        "head_items": head[rows.item],
        "tail_items": ~head[rows.item],
        "low_activity_users": data.user_clicks[rows.user] <= low_cut,
    }
    report = {"rows": len(rows), **ctr_metrics(rows.user, rows.label, probabilities)}
    for name, mask in parts.items():
        report[name] = {
            "rows": int(mask.sum()),
            **ctr_metrics(rows.user[mask], rows.label[mask], probabilities[mask]),
        }
    return report


def auc_by_decile(data: CTRData, rows, probabilities: np.ndarray) -> list[float]:
    """AUC of the rows whose item falls in each tenth of items by training clicks (most first)."""
    order = np.argsort(-data.item_clicks, kind="stable")
    decile = np.empty(len(order), np.int64)
    decile[order] = np.arange(len(order)) * 10 // len(order)
    return [
        auc(rows.label[mask], probabilities[mask])
        for d in range(10)
        for mask in [decile[rows.item] == d]
    ]


@task(name="train-click-model", cache_policy=NO_CACHE)
def fit_task(data: CTRData, config: AKTRecTrainConfig, model: str, seed: int) -> dict:
    """Train one model with one seed, early-stopped on validation AUC; score the test rows."""
    logger = get_run_logger()
    torch.manual_seed(seed)
    if config.threads:
        torch.set_num_threads(config.threads)
    device = device_for(config)
    side = ItemSide(data.training.data.codes, data.item_clicks, data.content, config.model)
    net = CTRNet(model, config.model, data.training.data.n_items, side.to(device)).to(device)
    rec = ClickModel(net)
    train_rows, valid_rows, test_rows = (data.splits[s] for s in ("train", "valid", "test"))
    batches = CTRBatches(
        train_rows.item,
        data.split_history("train"),
        train_rows.label,
        config.loop.batch_size,
        seed,
    )
    valid_history = data.split_history("valid")

    def validate() -> dict:
        p = rec.predict(valid_rows.item, valid_history)
        return ctr_metrics(valid_rows.user, valid_rows.label, p)

    def epoch_line(epoch: int, epochs: int, row: dict) -> None:
        logger.info(
            "%s seed %d: epoch %d/%d loss %.4f, valid AUC %.4f",
            model,
            seed,
            epoch,
            epochs,
            row["loss"],
            row.get("valid_auc", float("nan")),
        )

    started = time.perf_counter()
    history = train(
        rec, batches, validate, config.loop, epoch_line, f"{model} seed {seed}", metric="auc"
    )
    seconds = time.perf_counter() - started
    p = rec.predict(test_rows.item, data.split_history("test"))
    head = side.head.cpu().numpy()
    return {
        "model": model,
        "seed": seed,
        "parameters": count_parameters(net),
        "epochs": len(history),
        "best_epoch": max((r["epoch"] for r in history if r.get("best")), default=None),
        "train_seconds": seconds,
        "history": history,
        "test": ctr_report(data, test_rows, p, head, config.low_activity_share),
        "auc_by_decile": auc_by_decile(data, test_rows, p),
        "probabilities": p,
    }


def predictions_table(data: CTRData, results: list[dict]) -> pa.Table:
    """One row per model, seed and test row: what every metric is computed from."""
    rows = data.splits["test"]
    d = data.training.data
    users = np.asarray(d.users, dtype=object)[rows.user]
    items = np.asarray(d.item_ids, dtype=object)[rows.item]
    return pa.concat_tables(
        pa.table(
            {
                "user_id": pa.array(users, pa.string()),
                "item_id": pa.array(items, pa.string()),
                "label": pa.array(rows.label, pa.int8()),
                "score": pa.array(r["probabilities"], pa.float32()),
                "model": pa.array([r["model"]] * len(rows), pa.string()),
                "seed": pa.array([r["seed"]] * len(rows), pa.int64()),
            }
        )
        for r in results
    )


def summarize(results: list[dict]) -> dict[str, dict]:
    """Per model: mean and standard deviation over seeds of every metric, overall and per split."""
    out: dict[str, dict] = {}
    for model in dict.fromkeys(r["model"] for r in results):
        runs = [r["test"] for r in results if r["model"] == model]
        summary = {}
        for part in (None, *SPLIT_NAMES):
            values = [run if part is None else run[part] for run in runs]
            stats = {
                f"{k}_{agg}": float(fn([v[k] for v in values]))
                for k in ("auc", "gauc", "logloss")
                for agg, fn in (("mean", np.mean), ("std", _std))
            }
            if part is None:
                summary.update(stats)
            else:
                summary[part] = stats
        out[model] = summary
    return out


def _std(values: list[float]) -> float:
    """The sample standard deviation over seeds (0 for one seed)."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
