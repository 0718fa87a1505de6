"""What stages hand each other: small values (keys, paths, counts), never the data itself.

Each per-item stage writes two things: its results into the content-addressed stage cache, and a
small run-scoped index (`runs/<run_id>/<stage>-index.parquet`: item_id -> input_hash) saying which
cached row belongs to which item in this run. Per-item failures go to
`runs/<run_id>/errors-<stage>.parquet`. Downstream stages read the index and look rows up in the
cache, so a stage's output is never copied per run.

**Shards.** Ingest splits the items into shards by a hash of `item_id`
(`runs/<run_id>/shards/items-00003.parquet`); caption, interests and embed map over them (one
Prefect task per shard, on any task runner). A shard task writes its index and errors with the
shard's suffix, then a checkpoint (`shards/<stage>-00003.json`, last): when a killed run is
resumed, a shard with a checkpoint is not computed again. `gather_shards` joins a stage's shards
into the run-wide index the later stages read.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from contextlib import nullcontext
from datetime import date, datetime

import pyarrow as pa
import pyarrow.compute as pc
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from sidpipe.storage.cache import StageCache
from sidpipe.storage.hashing import hash_strings
from sidpipe.storage.lock import catalog_lock_name, ensure_holder
from sidpipe.storage.manifest import StageStats, staging_dir
from sidpipe.storage.store import ArtifactStore, StoreError, concat_tables

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


def write_index(
    store: ArtifactStore, run: RunInfo, stage: str, item_ids: list[str], input_hashes: list[str]
) -> str:
    name = f"{stage}-index{run.suffix}.parquet"
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
    name = f"errors-{stage}{run.suffix}.parquet"
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
    """The run's ingested items (written by ingest into staging); a shard task gets its shard."""
    if run.shard is not None:
        return store.read_parquet(*staging_dir(run.run_id), SHARDS_DIR, shard_items_name(run.shard))
    return store.read_parquet(*staging_dir(run.run_id), "items.parquet")


# -- shards ----------------------------------------------------------------------------------------
SHARDS_DIR = "shards"


def shard_count(n_items: int, shard_size: int) -> int:
    return max(1, -(-n_items // shard_size))


def shard_of(item_ids: list[str], n_shards: int) -> list[int]:
    """The shard of each item: a hash of its id, so an item's shard never depends on the others."""
    return [
        int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "big") % n_shards
        for i in item_ids
    ]


def shard_items_name(shard: int) -> str:
    return f"items-{shard:05d}.parquet"


def write_shards(store: ArtifactStore, run: RunInfo, items: pa.Table, shard_size: int) -> int:
    """Split the run's items into shard files; returns how many shards there are."""
    n = shard_count(items.num_rows, shard_size)
    shards = pa.array(shard_of(items["item_id"].to_pylist(), n), pa.int64())
    for shard in range(n):
        part = items.filter(pc.equal(shards, shard))
        store.write_parquet(part, *staging_dir(run.run_id), SHARDS_DIR, shard_items_name(shard))
    return n


def _checkpoint(stage: str, shard: int) -> tuple[str, str]:
    return SHARDS_DIR, f"{stage}-{shard:05d}.json"


def finished_shard(
    store: ArtifactStore, run: RunInfo, stage: str, items: pa.Table
) -> StageOutcome | None:
    """The outcome an earlier attempt of this run recorded for this shard, if it finished it on
    the same items without per-item failures; its work counts as `resumed`, not computed again.
    A shard with failures is computed again: its successes come from the cache, its failures
    get another try."""
    parts = (*staging_dir(run.run_id), *_checkpoint(stage, run.shard))
    if run.attempt == 1 or not store.exists(*parts):
        return None
    saved = store.read_json(*parts)
    if saved.get("items") != hash_strings(items["item_hash"].to_pylist()):
        return None  # the catalog changed between attempts: compute the shard again
    outcome = StageOutcome.model_validate(saved["outcome"])
    if outcome.stats.failed:
        return None
    s = outcome.stats
    outcome.stats = StageStats(
        resumed=s.computed + s.cached + s.resumed, skipped=s.skipped, failed=s.failed
    )
    return outcome


def save_checkpoint(
    store: ArtifactStore, run: RunInfo, outcome: StageOutcome, items: pa.Table
) -> None:
    """Written after the shard's index and errors: its presence means the shard is done."""
    store.write_json(
        {
            "items": hash_strings(items["item_hash"].to_pylist()),
            "outcome": outcome.model_dump(mode="json"),
        },
        *staging_dir(run.run_id),
        *_checkpoint(outcome.stage, run.shard),
    )


def run_shard(
    store: ArtifactStore,
    run: RunInfo,
    stage: str,
    compute: Callable[[pa.Table], StageOutcome],
    concurrency_limit: str | None = None,
) -> StageOutcome:
    """One shard of a per-item stage: reuse a finished checkpoint, else compute and checkpoint.

    `concurrency_limit` names a Prefect global concurrency limit to hold a slot of while
    computing (strict: a missing limit is an error, never silently no limit)."""
    items = read_items(store, run)
    done = finished_shard(store, run, stage, items)
    if done is not None:
        log.info("%s shard %d: finished by an earlier attempt, not recomputed", stage, run.shard)
        return done
    if concurrency_limit:
        from prefect.concurrency.sync import concurrency

        guard = concurrency(concurrency_limit, occupy=1, strict=True)
    else:
        guard = nullcontext()
    with guard:
        outcome = compute(items)
    ensure_holder(store, run.lock_name, run.lock_token)
    save_checkpoint(store, run, outcome, items)
    return outcome


def shard_limit(orchestration, stage: str, endpoint) -> str | None:
    """The Prefect global concurrency limit a model-served shard holds a slot of, if enabled."""
    if orchestration.concurrency_limits and endpoint.urls:
        return f"sidpipe-{stage}"
    return None


def gather_shards(store: ArtifactStore, run: RunInfo, shards: list[StageOutcome]) -> StageOutcome:
    """Join a stage's shard outcomes into one run-wide outcome (index, errors, summed stats)."""
    first = shards[0]
    stats = StageStats(
        **{field: sum(getattr(s.stats, field) for s in shards) for field in StageStats.model_fields}
    )
    if first.skipped:
        return first.model_copy(update={"stats": stats})
    staging = staging_dir(run.run_id)
    whole = run.model_copy(update={"shard": None})
    index = concat_tables(store.read_parquet(*staging, s.index) for s in shards if s.index)
    index_name = write_index(
        store,
        whole,
        first.stage,
        index["item_id"].to_pylist() if index is not None else [],
        index["input_hash"].to_pylist() if index is not None else [],
    )
    errors = concat_tables(store.read_parquet(*staging, s.errors) for s in shards if s.errors)
    errors_name = None
    if errors is not None:
        errors_name = f"errors-{first.stage}.parquet"
        store.write_parquet(errors, *staging, errors_name)
    model = dict(first.model)
    usages = [s.model.get("usage") for s in shards if s.model.get("usage")]
    if usages:
        model["usage"] = {k: sum(u.get(k, 0) for u in usages) for k in usages[0]}
    if model.get("dim") is None:
        model["dim"] = next((s.model["dim"] for s in shards if s.model.get("dim")), None)
    return first.model_copy(
        update={
            "index": index_name,
            "errors": errors_name,
            "stats": stats,
            "model": model,
            "shards": len(shards),
        }
    )


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


@task(name="gather-shards", **TASK_OPTIONS)
def gather_task(store_uri: str, run: RunInfo, shards: list[StageOutcome]) -> StageOutcome:
    return gather_shards(ArtifactStore(store_uri), run, shards)
