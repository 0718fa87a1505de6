"""What stages hand each other: small values (keys, paths, counts), never the data itself.

Each per-item stage writes two things: its results into the content-addressed stage cache, and a
small run-scoped index (`runs/<run_id>/<stage>-index.parquet`: item_id -> input_hash) saying which
cached row belongs to which item in this run. Per-item failures go to
`runs/<run_id>/errors-<stage>.parquet`. Downstream stages read the index and look rows up in the
cache, so a stage's output is never copied per run.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import date, datetime

import pyarrow as pa
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from sidpipe.storage.cache import StageCache
from sidpipe.storage.manifest import StageStats, staging_dir
from sidpipe.storage.store import ArtifactStore, StoreError

# Errors worth retrying a whole stage for: storage and network trouble. A bad catalog or a bug
# fails at once instead of three times.
PERMANENT_OS_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def retry_if_transient(task, task_run, state) -> bool:
    """Prefect `retry_condition_fn`: retry only storage, connection and timeout errors."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        exc = state.result(raise_on_failure=False)
    if isinstance(exc, PERMANENT_OS_ERRORS):
        return False
    return isinstance(exc, (StoreError, ConnectionError, TimeoutError, OSError))


# Every stage task: retried on transient errors only; caching is per item in the store, so
# Prefect's own result cache is off (task inputs are small and results are not persisted).
TASK_OPTIONS = {
    "retries": 2,
    "retry_delay_seconds": [5, 30],
    "retry_condition_fn": retry_if_transient,
    "cache_policy": NO_CACHE,
}

ERRORS_SCHEMA = pa.schema(
    [("item_id", pa.string()), ("stage", pa.string()), ("error", pa.string())]
)


class RunInfo(BaseModel):
    run_id: str
    run_date: date
    catalog: str
    started_at: datetime


class StageOutcome(BaseModel):
    """A stage's result as the flow sees it."""

    stage: str
    key: str | None = None  # stage cache key; None when the stage was skipped
    index: str | None = None  # file name of the item index in the run's staging folder
    errors: str | None = None  # file name of the per-item errors in staging
    stats: StageStats = StageStats()
    model: dict = {}  # model name, revision, ... for the manifest

    @property
    def skipped(self) -> bool:
        return self.key is None


def write_index(
    store: ArtifactStore, run: RunInfo, stage: str, item_ids: list[str], input_hashes: list[str]
) -> str:
    name = f"{stage}-index.parquet"
    table = pa.table(
        {
            "item_id": pa.array(item_ids, pa.string()),
            "input_hash": pa.array(input_hashes, pa.string()),
        }
    )
    store.write_parquet(table, *staging_dir(run.run_id), name)
    return name


def read_index(store: ArtifactStore, run: RunInfo, outcome: StageOutcome) -> pa.Table | None:
    if outcome.index is None:
        return None
    return store.read_parquet(*staging_dir(run.run_id), outcome.index)


def write_errors(
    store: ArtifactStore, run: RunInfo, stage: str, errors: list[tuple[str, str]]
) -> str | None:
    """Per-item errors as (item_id, message); returns the staged file name, if any."""
    if not errors:
        return None
    name = f"errors-{stage}.parquet"
    table = pa.Table.from_pylist(
        [{"item_id": i, "stage": stage, "error": e} for i, e in errors], schema=ERRORS_SCHEMA
    )
    store.write_parquet(table, *staging_dir(run.run_id), name)
    return name


def stage_values(
    store: ArtifactStore, run: RunInfo, outcome: StageOutcome, column: str
) -> dict[str, object]:
    """item_id -> a cached result column of an upstream stage ({} if it was skipped)."""
    index = read_index(store, run, outcome)
    if index is None or index.num_rows == 0:
        return {}
    cached = StageCache(store, outcome.stage, outcome.key).lookup(index["input_hash"].to_pylist())
    if cached is None:
        return {}
    by_hash = dict(zip(cached["input_hash"].to_pylist(), cached[column].to_pylist(), strict=True))
    return {
        item_id: by_hash[h]
        for item_id, h in zip(
            index["item_id"].to_pylist(), index["input_hash"].to_pylist(), strict=True
        )
        if h in by_hash
    }


def read_items(store: ArtifactStore, run: RunInfo) -> pa.Table:
    """The run's ingested items (written by ingest into staging)."""
    return store.read_parquet(*staging_dir(run.run_id), "items.parquet")


def failed_items(store: ArtifactStore, run: RunInfo, outcomes: list[StageOutcome]) -> set[str]:
    """item_ids that failed in any of these stages (later stages leave them out)."""
    failed: set[str] = set()
    for outcome in outcomes:
        if outcome.errors is not None:
            table = store.read_parquet(
                *staging_dir(run.run_id), outcome.errors, columns=["item_id"]
            )
            failed.update(table["item_id"].to_pylist())
    return failed


def progress_artifact(stage: str) -> Callable[[int, int], None]:
    """A Prefect progress artifact for a long stage; returns the callback that updates it."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    artifact = create_progress_artifact(0.0, description=f"{stage}: share of items done")

    def update(done: int, total: int) -> None:
        update_progress_artifact(artifact, 100.0 * done / max(total, 1))

    return update
