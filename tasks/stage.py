"""What stages hand each other: small values (keys, file names, counts), never the data itself.

Each per-item stage writes two things: its results into the content-addressed stage cache, and a
small run-scoped index (`runs/<run_id>/<stage>-index.parquet`: item_id -> input_hash) saying which
cached row belongs to which item in this run. Per-item failures go to
`runs/<run_id>/errors-<stage>.parquet`. Later stages read the index and look rows up in the
cache (`stage_values`, `stage_matrix`), so a stage's output is never copied per run.

Every stage module imports this one and `storage`, never another stage: the outcome types of
every stage are defined here, so the flow and `publish` can pass them along.
"""

from __future__ import annotations

import logging
from datetime import date, datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from sidpipe.errors import SidpipeError, StoreError
from sidpipe.redact import redact_urls
from sidpipe.storage.cache import StageCache
from sidpipe.storage.layout import (
    ERRORS_SCHEMA,
    INDEX_SCHEMA,
    INPUT_HASH,
    ITEMS_FILE,
    SHARDS_DIR,
    shard_items_name,
    staging_dir,
)
from sidpipe.storage.lock import catalog_lock_name
from sidpipe.storage.manifest import StageStats
from sidpipe.storage.spill import SpilledRows
from sidpipe.storage.store import ArtifactStore

log = logging.getLogger(__name__)

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
    if isinstance(exc, SidpipeError):
        return isinstance(exc, StoreError)
    return isinstance(exc, (ConnectionError, TimeoutError, OSError))


# Every stage task: retried on transient errors only; caching is per item in the store, so
# Prefect's own result cache is off (task inputs are small and results are not persisted).
TASK_OPTIONS = {
    "retries": 2,
    "retry_delay_seconds": [5, 30],
    "retry_condition_fn": retry_if_transient,
    "cache_policy": NO_CACHE,
}


class RunInfo(BaseModel):
    run_id: str
    run_date: date
    catalog: str
    started_at: datetime
    attempt: int = 1  # 2+ when a killed or failed run is resumed
    shard: int | None = None  # set for a shard task: its files get the shard's suffix
    lock_token: str | None = None  # the catalog lock this run holds (checked before checkpoints)

    @property
    def lock_name(self) -> str:
        return catalog_lock_name(self.catalog)

    def for_shard(self, shard: int) -> RunInfo:
        return self.model_copy(update={"shard": shard})

    @property
    def suffix(self) -> str:
        return "" if self.shard is None else f"-{self.shard:05d}"


# -- outcomes: what each stage returns to the flow -------------------------------------------------
class StageOutcome(BaseModel):
    """A stage's result as the flow sees it."""

    stage: str
    key: str | None = None  # stage cache key; None when the stage was skipped
    index: str | None = None  # file name of the item index in the run's staging folder
    errors: str | None = None  # file name of the per-item errors in staging
    stats: StageStats = StageStats()
    model: dict = {}  # model name, revision, ... for the manifest
    shards: int = 1

    @property
    def skipped(self) -> bool:
        return self.key is None


class IngestOutcome(StageOutcome):
    input_rows: int = 0
    quarantined: int = 0
    catalog_sha256: str = ""
    items_hash: str = ""  # hash of every item hash, in item_id order
    attribute_columns: list[str] = []
    shard_count: int = 1  # item shards the per-item stages map over


class FitOutcome(StageOutcome):
    tokenizer_id: str = ""
    method: str = ""
    codebook_sizes: list[int] = []
    sizing_message: str | None = None
    fitted: bool = False  # a new version was fitted (first run or refit): pinned on publish
    embed_key: str = ""
    parent: str | None = None  # the version pinned before this run
    unchanged: bool = False  # a refit that reproduced the pinned tokenizer (same settings, data)


class AssignOutcome(StageOutcome):
    assigned: int = 0
    quality: dict = {}


# -- the run's staged files ------------------------------------------------------------------------
def write_index(
    store: ArtifactStore, run: RunInfo, stage: str, item_ids: list[str], input_hashes: list[str]
) -> str:
    name = f"{stage}-index{run.suffix}.parquet"
    table = pa.table({"item_id": item_ids, INPUT_HASH: input_hashes}, schema=INDEX_SCHEMA)
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
    name = f"errors-{stage}{run.suffix}.parquet"
    table = pa.Table.from_pylist(
        [{"item_id": i, "stage": stage, "error": redact_urls(e)} for i, e in errors],
        schema=ERRORS_SCHEMA,
    )
    store.write_parquet(table, *staging_dir(run.run_id), name)
    return name


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


def read_items(store: ArtifactStore, run: RunInfo) -> pa.Table:
    """The run's ingested items (written by ingest into staging); a shard task gets its shard."""
    if run.shard is not None:
        return store.read_parquet(*staging_dir(run.run_id), SHARDS_DIR, shard_items_name(run.shard))
    return store.read_parquet(*staging_dir(run.run_id), ITEMS_FILE)


# -- an upstream stage's results for this run's items ----------------------------------------------
def _cached_rows(
    store: ArtifactStore, run: RunInfo, outcome: StageOutcome, rows: slice | None = None
) -> tuple[pa.Table, pa.Table | None, np.ndarray]:
    """The run's index of a stage (sorted by item_id; `rows` of it), its cached rows, and for
    each index row the position of its cached row (-1: not in the cache)."""
    index = read_index(store, run, outcome)
    if index is not None:
        index = index.sort_by("item_id")
        if rows is not None:
            start, stop, _ = rows.indices(index.num_rows)
            index = index.slice(start, max(stop - start, 0))
    if index is None or index.num_rows == 0:
        empty = pa.table(
            {"item_id": pa.array([], pa.string()), INPUT_HASH: pa.array([], pa.string())}
        )
        return empty, None, np.zeros(0, np.int64)
    hashes = index[INPUT_HASH].to_pylist()
    cached = StageCache(store, outcome.stage, outcome.key).lookup(hashes)
    row = {} if cached is None else {h: i for i, h in enumerate(cached[INPUT_HASH].to_pylist())}
    return index, cached, np.array([row.get(h, -1) for h in hashes], np.int64)


def stage_values(
    store: ArtifactStore, run: RunInfo, outcome: StageOutcome, column: str
) -> dict[str, object]:
    """item_id -> a cached result column of an upstream stage ({} if it was skipped)."""
    index, cached, positions = _cached_rows(store, run, outcome)
    if cached is None:
        return {}
    values = cached[column].to_pylist()
    return {
        item_id: values[p]
        for item_id, p in zip(index["item_id"].to_pylist(), positions, strict=True)
        if p >= 0
    }


def stage_matrix(
    store: ArtifactStore,
    run: RunInfo,
    outcome: StageOutcome,
    column: str,
    rows: slice | None = None,
) -> tuple[list[str], list[str], np.ndarray]:
    """(item_ids, input hashes, float32 matrix [N, D]) of a vector column, in item_id order
    (`rows` of that order: only their cached rows are read); every item must be cached."""
    index, cached, positions = _cached_rows(store, run, outcome, rows)
    ids, hashes = index["item_id"].to_pylist(), index[INPUT_HASH].to_pylist()
    if cached is None and ids:
        raise RuntimeError(f"{outcome.stage} cache {outcome.key} has none of this run's items")
    missing = [i for i, p in zip(ids, positions, strict=True) if p < 0]
    if missing:
        raise RuntimeError(
            f"{outcome.stage} cache {outcome.key} lacks {len(missing)} items, e.g. {missing[:3]}"
        )
    if cached is None:
        return ids, hashes, np.zeros((0, 0), np.float32)
    dim = cached.schema.field(column).type.list_size
    matrix = np.asarray(cached[column].combine_chunks().values, np.float32).reshape(-1, dim)
    return ids, hashes, matrix[positions]


def stage_rows(
    store: ArtifactStore, run: RunInfo, outcome: StageOutcome, column: str
) -> SpilledRows:
    """A vector column of an upstream stage in item_id order (as `stage_matrix`), spilled to a
    local temporary file in one pass over the stage cache, a part at a time: the caller reads
    it a block at a time and never holds the whole N x D matrix. Close it when done."""
    index = read_index(store, run, outcome)
    hashes = (
        index.sort_by("item_id")[INPUT_HASH] if index is not None else pa.array([], pa.string())
    )
    # Items with identical inputs share a hash (and a cached row): group positions by hash.
    unique = pc.unique(hashes)
    group = pc.index_in(hashes, unique).to_numpy(zero_copy_only=False)
    order = np.argsort(group, kind="stable")
    counts = np.bincount(group, minlength=len(unique))
    starts = np.cumsum(counts) - counts
    spill, done = None, np.zeros(len(unique), bool)
    for part in StageCache(store, outcome.stage, outcome.key).scan(unique.to_pylist(), [column]):
        if spill is None:
            spill = SpilledRows(len(hashes), part.schema.field(column).type.list_size)
        which = pc.index_in(part[INPUT_HASH], unique).to_numpy(zero_copy_only=False)
        rows = np.flatnonzero(~done[which])  # a hash cached twice: its first row
        which = which[rows]
        done[which] = True
        n = counts[which]
        within = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
        vectors = np.asarray(part[column].combine_chunks().values, np.float32)
        vectors = vectors.reshape(-1, spill.dim)[np.repeat(rows, n)]
        spill.write(order[np.repeat(starts[which], n) + within], vectors)
    if not done.all():
        missing = pc.filter(hashes, pa.array(~done[group])).to_pylist()[:3]
        raise RuntimeError(
            f"{outcome.stage} cache {outcome.key} lacks {int((~done[group]).sum())} items, "
            f"e.g. input hashes {missing}"
        )
    return spill if spill is not None else SpilledRows(0, 0)


def stage_ids(
    store: ArtifactStore, run: RunInfo, outcome: StageOutcome
) -> tuple[pa.ChunkedArray, pa.ChunkedArray]:
    """(item_ids, input hashes) of a stage's items in item_id order, without their values, as
    Arrow columns (no Python object per item)."""
    index = read_index(store, run, outcome)
    if index is None:
        return pa.chunked_array([], pa.string()), pa.chunked_array([], pa.string())
    index = index.sort_by("item_id")
    return index["item_id"], index[INPUT_HASH]
