"""Train a generative recommender on published SIDs, then evaluate it.

    prepare (published SIDs + items + interactions) -> train (early stopping) -> evaluate

Reads only what the tokenization flow published, plus interactions; never runs a model stage.
Writes `<store>/training/genrec/<run_id>/`: config.json, model.safetensors, history.json,
metrics.json (recall@5, recall@10, ndcg@5, ndcg@10, invalid_rate, by popularity, ...),
predictions.parquet; and the `genrec-metrics` / `genrec-report` Prefect artifacts.
"""

from __future__ import annotations

import uuid

from prefect import flow

from sidpipe.config import GenRecTrainConfig
from sidpipe.storage.manifest import utcnow
from sidpipe.tasks.train_genrec import evaluate_task, train_task


@flow(name="train-genrec", log_prints=True)
def train_genrec(config: GenRecTrainConfig) -> dict:
    """Train `config.model` (tiger or sasrec) on the catalog's published SIDs and evaluate it."""
    # Time first so runs list in order; the random part keeps two runs in one second apart.
    run_id = f"{utcnow():%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}-{config.name}-{config.model}"
    trained = train_task(config, run_id)
    return evaluate_task(config, run_id, trained)
