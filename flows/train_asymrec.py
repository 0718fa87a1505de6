"""Compare AsymRec with TIGER-style, its ablations and SASRec in one run (same data, protocol,
budget).

    load published SIDs + embeddings + interactions (cold items held out)
      -> for each model: train (early stopping / budget) + evaluate (full ranking)
      -> report (metrics.json, predictions.parquet, NDCG@10-by-popularity PNG, artifacts)

Reads only what the tokenization flow published, plus interactions; never runs a model stage.
Writes `<store>/training/asymrec/<run_id>/` (one checkpoint folder per model inside).
"""

from __future__ import annotations

import os

from prefect import flow

from sidpipe.flows.clean_failures import fail_cleanly
from sidpipe.progress import show_sidpipe_info
from sidpipe.storage.store import ArtifactStore
from sidpipe.tasks.training.compare import compare_task, comparison_run_id, prepare_task
from sidpipe.tasks.training.compare_report import report_task
from sidpipe.tasks.training.config import AsymRecTrainConfig, load_train_config

FLOW = "asymrec"


@flow(name="train-asymrec", log_prints=True)
@fail_cleanly
def train_asymrec(config: AsymRecTrainConfig | None = None, preset: str = "asymrec-beauty") -> dict:
    """Train and evaluate every model of `config.models` on the same published run. Without
    `config`, the named preset (what the deployment runs; SIDPIPE_STORE names the store)."""
    show_sidpipe_info()
    if config is None:
        config = load_train_config(preset, "asymrec", store=os.environ.get("SIDPIPE_STORE"))
    store = ArtifactStore(config.store)
    run_id = comparison_run_id(config)
    training = prepare_task(store, config)
    results = [
        compare_task(store, config, label, training, FLOW, run_id) for label in config.models
    ]
    return report_task(store, config, FLOW, run_id, training, results)
