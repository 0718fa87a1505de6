"""Item shards: how the per-item stages spread over task runners and survive a killed run.

Ingest splits the items into shards by a hash of `item_id`
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

import pyarrow as pa
import pyarrow.compute as pc
from prefect import task

from sidpipe.storage.hashing import hash_strings
from sidpipe.storage.layout import INPUT_HASH, SHARDS_DIR, shard_items_name, staging_dir
from sidpipe.storage.lock import ensure_holder
from sidpipe.storage.manifest import StageStats
from sidpipe.storage.store import ArtifactStore, concat_tables
from sidpipe.tasks.stage import TASK_OPTIONS, RunInfo, StageOutcome, read_items, write_index

log = logging.getLogger(__name__)


def shard_count(n_items: int, shard_size: int) -> int:
    return max(1, -(-n_items // shard_size))


def shard_of(item_ids: list[str], n_shards: int) -> list[int]:
    """The shard of each item: a hash of its id, so an item's shard never depends on the others."""
    return [
        int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "big") % n_shards
        for i in item_ids
    ]


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
    get another try. So is a shard that left items out because they failed in an earlier stage
    (its stats then account for fewer items than the shard has): that stage's shard is computed
    again, and items it now finishes must not stay missing here."""
    parts = (*staging_dir(run.run_id), *_checkpoint(stage, run.shard))
    if run.attempt == 1 or not store.exists(*parts):
        return None
    saved = store.read_json(*parts)
    if saved.get("items") != hash_strings(items["item_hash"].to_pylist()):
        return None  # the catalog changed between attempts: compute the shard again
    outcome = StageOutcome.model_validate(saved["outcome"])
    s = outcome.stats
    if s.failed or s.computed + s.cached + s.resumed + s.skipped < items.num_rows:
        return None
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
        index[INPUT_HASH].to_pylist() if index is not None else [],
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


@task(name="gather-shards", **TASK_OPTIONS)
def gather_task(store: ArtifactStore, run: RunInfo, shards: list[StageOutcome]) -> StageOutcome:
    return gather_shards(store, run, shards)
