"""Train a generative recommender (or the SASRec baseline) on published SIDs, then evaluate it.

    load published SIDs + items + interactions -> train (early stopping) -> evaluate

Reads only what the tokenization flow published, plus interactions; never runs a model stage.
Writes `<store>/training/genrec/<run_id>/`: config.json, model.safetensors, history.json,
metrics.json (recall@5, recall@10, ndcg@5, ndcg@10, invalid_rate, by popularity, ...),
predictions.parquet; and the `genrec-metrics` / `genrec-report` Prefect artifacts.
"""

from __future__ import annotations

from prefect import flow

from sidpipe.flows.clean_failures import fail_cleanly
from sidpipe.progress import show_sidpipe_info
from sidpipe.storage.store import ArtifactStore
from sidpipe.tasks.training.checkpoint import new_run_id
from sidpipe.tasks.training.config import TrainConfig
from sidpipe.tasks.training.ranking import evaluate_task, train_task

FLOW = "genrec"


@flow(name="train-genrec", log_prints=True)
@fail_cleanly
def train_genrec(config: TrainConfig) -> dict:
    """Train `config.model` (tiger or sasrec) on the catalog's published SIDs and evaluate it."""
    show_sidpipe_info()  # data preparation and progress lines
    store = ArtifactStore(config.store)
    run_id = new_run_id(config)
    trained = train_task(store, config, FLOW, run_id)
    return evaluate_task(store, config, FLOW, run_id, trained)
