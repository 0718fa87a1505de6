"""Prefect tasks of a model comparison (the AsymRec flow): one data load, then every model
trained and evaluated on it with the same protocol and budget, then one report.

    prepare (published run + interactions, cold items held out) -> for each model:
    train (shared loop, early stopping) + evaluate (full ranking) -> report

Each model's checkpoint goes to `training/<flow>/<run_id>/<model>/` (reloadable with
`load_checkpoint`); its metrics come back with its cost: steps, sequences/s, ms a step, peak
memory (process RSS on the CPU, allocated GPU memory on CUDA) while it trained.
"""

from __future__ import annotations

import threading
import uuid

import numpy as np
import pyarrow as pa
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from sidpipe.storage.layout import training_dir
from sidpipe.storage.manifest import utcnow
from sidpipe.storage.store import ArtifactStore
from sidpipe.tasks.training.checkpoint import save_checkpoint
from sidpipe.tasks.training.config import AsymRecTrainConfig
from sidpipe.tasks.training.data import TrainingData, load_training_data, split
from sidpipe.tasks.training.evaluate import evaluate_ranking
from sidpipe.tasks.training.loop import count_parameters, pick_device
from sidpipe.tasks.training.ranking import epoch_lines, train_model


def comparison_run_id(config: AsymRecTrainConfig) -> str:
    return f"{utcnow():%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}-{config.name}"


class PeakMemory:
    """Peak memory while the block runs, in MiB: process RSS sampled every 50 ms on the CPU
    (the whole process: data included), `torch.cuda.max_memory_allocated` on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak_mib = device, 0.0

    def __enter__(self) -> PeakMemory:
        import psutil

        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        process, self._stop = psutil.Process(), threading.Event()

        def sample() -> None:
            while True:
                self.peak_mib = max(self.peak_mib, process.memory_info().rss / 2**20)
                if self._stop.wait(0.05):
                    return

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak_mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self._stop.set()
            self._thread.join()


@task(name="prepare-comparison", cache_policy=NO_CACHE)
def prepare_task(store: ArtifactStore, config: AsymRecTrainConfig) -> TrainingData:
    return load_training_data(store, config.data)


@task(name="train-and-evaluate", cache_policy=NO_CACHE, task_run_name="train-and-evaluate-{label}")
def compare_task(
    store: ArtifactStore,
    config: AsymRecTrainConfig,
    label: str,
    training: TrainingData,
    flow: str,
    run_id: str,
) -> tuple[dict, pa.Table]:
    """Train and evaluate one model; (its metrics and cost, its predictions with `model`)."""
    run = config.model_run(label)
    device = pick_device(run)
    with PeakMemory(device) as peak:
        trained = train_model(store, run, epoch_lines(run), training)
    where = training_dir(flow, run_id, label)
    save_checkpoint(store, where, run, training, trained.rec, trained.history)
    test = split(training.data, run.data.max_history, "test")
    metrics, predictions = evaluate_ranking(
        trained.rec, training.data, test, training.popularity(), run.eval
    )
    history = trained.history
    steps = sum(row["steps"] for row in history)
    seconds = sum(row["seconds"] for row in history)  # training steps only (no validation)
    best = [row["epoch"] for row in history if row.get("best")]
    metrics.update(
        model=label,
        kind=run.model.kind,
        parameters=count_parameters(trained.rec.module),
        epochs=len(history),
        best_epoch=best[-1] if best else None,
        stopped_by=history[-1].get("stopped_by", "epochs") if history else None,
        train_seconds=trained.seconds,
        steps=steps,
        batch_size=run.loop.batch_size,
        ms_per_step=1000 * seconds / max(steps, 1),
        sequences_per_second=steps * run.loop.batch_size / max(seconds, 1e-9),
        peak_memory_mib=peak.peak_mib,
        memory_kind="cuda allocated" if device.type == "cuda" else "process RSS",
        model_summary=trained.rec.summary(),
    )
    predictions = predictions.add_column(0, "model", pa.array([label] * len(test), pa.string()))
    del trained
    return metrics, predictions


def relative_gain(metrics: dict[str, dict], model: str, baseline: str, key: str) -> float | None:
    """`model`'s `key` over `baseline`'s, minus 1 (None if either is missing or zero)."""
    if model not in metrics or baseline not in metrics or not metrics[baseline][key]:
        return None
    return float(metrics[model][key] / metrics[baseline][key] - 1)


def cold_items_count(training: TrainingData) -> int:
    cold = training.data.cold
    return int(np.sum(cold)) if cold is not None else 0
