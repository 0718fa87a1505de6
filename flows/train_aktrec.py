"""Compare click models on a catalog's published SIDs: a base model, DIN, SID features
concatenated, AKT-Rec and its ablations, each with several seeds, on the same rows and budget.

    published SIDs + embeddings + interactions -> CTR rows (drawn once, stored)
      -> for each model and seed: train (early stopping on validation AUC) and score the test rows
      -> report

Reads only what the tokenization flow published, plus interactions. Writes
`<store>/training/aktrec/<run_id>/`: metrics.json (per model and seed, and mean/std: AUC, GAUC,
log loss overall, on head items, tail items and low-activity users), predictions.parquet,
auc_by_popularity.png; and the `aktrec-metrics` / `aktrec-report` Prefect artifacts.
"""

from __future__ import annotations

import os
import uuid

from prefect import flow

from sidpipe.flows.clean_failures import fail_cleanly
from sidpipe.progress import show_sidpipe_info
from sidpipe.storage.manifest import utcnow
from sidpipe.storage.store import ArtifactStore
from sidpipe.tasks.training.config import AKTRecTrainConfig, load_train_config
from sidpipe.tasks.training.ctr import fit_task, prepare_task
from sidpipe.tasks.training.ctr_report import report_task


@flow(name="train-aktrec", log_prints=True)
@fail_cleanly
def train_aktrec(config: AKTRecTrainConfig | None = None, preset: str = "aktrec-gpu") -> dict:
    """Train and score every configured click model with every seed; report them side by side.
    Without `config`, the named preset (what the deployment runs; SIDPIPE_STORE names the
    store)."""
    show_sidpipe_info()
    if config is None:
        config = load_train_config(preset, "aktrec", store=os.environ.get("SIDPIPE_STORE"))
    store = ArtifactStore(config.store)
    run_id = f"{utcnow():%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}-{config.name}"
    data = prepare_task(store, config)
    results = [
        fit_task(data, config, model, seed) for model in config.models for seed in config.seeds
    ]
    return report_task(store, config, run_id, data, results)
