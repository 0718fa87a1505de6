"""A run's life in the store: start (or resume) it, then mark it published or failed.

Every run leaves one record in the run log (`runs/<run_id>/_RUN.json`). When a run is killed or
fails, its record stays `running`/`failed` and its staged work stays in `runs/<run_id>/`: the
next run of the same catalog, date and result-shaping settings adopts that run id as a new
attempt, so finished shards are not computed again (see `tasks.shards.run_shard`). Call these
while holding the catalog's lock (`storage.lock`): only then is a `running` record a dead run.
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from datetime import date

import pyarrow as pa

from sidpipe.config import PipelineConfig
from sidpipe.errors import NoItemsLeftError, SidpipeError, StoreError
from sidpipe.storage.catalog_source import record_source
from sidpipe.storage.hashing import stable_hash
from sidpipe.storage.layout import ERRORS_FILE, ERRORS_SCHEMA, sids_dir, staging_dir
from sidpipe.storage.manifest import (
    Counts,
    Manifest,
    RunRecord,
    StageStats,
    resumable_run,
    utcnow,
    write_run_record,
)
from sidpipe.storage.store import ArtifactStore, concat_tables
from sidpipe.tasks.preflight import fits_tokenizer, items_needed, too_small
from sidpipe.tasks.stage import IngestOutcome, RunInfo, StageOutcome, read_items

log = logging.getLogger(__name__)

# How a model server is reached, not what it computes: moving a replica must not block resume.
ENDPOINT_OPERATIONS = {"url", "api_key", "max_in_flight", "timeout_seconds", "max_retries"}


def settings_fingerprint(config: PipelineConfig) -> str:
    """Hash of the settings that can change a result: not how the work is spread, not how the
    model servers are reached."""
    return stable_hash(
        config.model_dump(
            mode="json",
            exclude={
                "orchestration": True,
                **{s: ENDPOINT_OPERATIONS for s in ("caption", "interests", "embed")},
            },
        ),
        16,
    )


def new_run_id(prefect_flow_run_id: str | None = None) -> str:
    started = utcnow().strftime("%Y%m%dT%H%M%S")
    return f"{started}-{(prefect_flow_run_id or uuid.uuid4().hex)[:8]}"


def start_run(
    store: ArtifactStore,
    config: PipelineConfig,
    run_date: date,
    run_id: str,
    prefect_flow_run_id: str | None = None,
) -> tuple[RunInfo, RunRecord]:
    """A new run, or the next attempt of an unfinished one with the same settings."""
    fingerprint = settings_fingerprint(config)
    catalog = config.catalog.store_name
    record_source(store, catalog, config.catalog.uri, config.catalog.same_catalog)
    previous = (
        resumable_run(store, catalog, run_date, fingerprint)
        if config.orchestration.resume
        else None
    )
    if previous is not None:
        record = previous.model_copy(
            update={
                "status": "running",
                "attempts": previous.attempts + 1,
                "error": None,
                "finished_at": None,
                "prefect_flow_run_id": prefect_flow_run_id,
            }
        )
    else:
        record = RunRecord(
            run_id=run_id,
            catalog=catalog,
            run_date=run_date,
            status="running",
            started_at=utcnow(),
            fingerprint=fingerprint,
            prefect_flow_run_id=prefect_flow_run_id,
        )
    write_run_record(store, record)
    run = RunInfo(
        run_id=record.run_id,
        run_date=run_date,
        catalog=catalog,
        started_at=record.started_at,
        attempt=record.attempts,
    )
    return run, record


def _finish(store: ArtifactStore, record: RunRecord, **update) -> None:
    write_run_record(store, record.model_copy(update=update))


def mark_published(store: ArtifactStore, record: RunRecord, manifest: Manifest) -> None:
    _finish(
        store,
        record,
        status="published",
        finished_at=manifest.finished_at,
        counts=manifest.counts,
        stages=manifest.stages,
        published="/".join(sids_dir(record.catalog, record.run_date)),
    )


def mark_failed(store: ArtifactStore, record: RunRecord, exc: BaseException) -> None:
    expected = isinstance(exc, SidpipeError)
    error = exc.one_line if expected else f"{type(exc).__name__}: {exc}"
    accounting = (exc.accounting if expected else None) or {}
    if accounting:
        accounting = {
            "counts": Counts(**accounting["counts"]),
            "stages": {k: StageStats(**v) for k, v in accounting["stages"].items()},
        }
    try:
        _finish(store, record, status="failed", finished_at=utcnow(), error=error, **accounting)
    except StoreError as failure:  # e.g. the store refuses writes: the run's own error matters
        log.warning("run log: cannot record the failure of run %s: %s", record.run_id, failure)


def check_items_left(
    store: ArtifactStore,
    config: PipelineConfig,
    run: RunInfo,
    ingest: IngestOutcome,
    stages: list[StageOutcome],
) -> None:
    """Stop the run before fit when the items left (ingested, not failed in `stages`) cannot be
    tokenized: none at all, or fewer than a tokenizer fit needs when this run fits one.

    Nothing is published; the run's staged `errors.parquet` holds every item's reason (the
    items left over count as failed: "not tokenized: ..."), and the error carries the counts
    (input = quarantined + failed) and stage stats for the run log."""
    errors = concat_tables(
        store.read_parquet(*staging_dir(run.run_id), s.errors) for s in stages if s.errors
    )
    failed = set(errors["item_id"].to_pylist()) if errors is not None else set()
    items = read_items(store, run)["item_id"].to_pylist()
    left = [i for i in items if i not in failed]
    fits = fits_tokenizer(store, config)
    if left and not (fits and len(left) < items_needed(config)):
        return
    if left:
        error: SidpipeError = too_small(config, f"{len(left):,} items are left to tokenize")
    else:
        by_stage = Counter(errors["stage"].to_pylist()) if errors is not None else Counter()
        messages = errors["error"].to_pylist() if errors is not None else []
        reasons = Counter(e[:80] for e in messages)
        top = "; ".join(f"{n:,} x {reason!r}" for reason, n in reasons.most_common(2))
        error = NoItemsLeftError(
            f"no item is left to tokenize: {ingest.input_rows:,} rows, {ingest.quarantined:,} "
            f"quarantined, {len(failed):,} failed "
            f"({', '.join(f'{n:,} in {s}' for s, n in by_stage.items()) or 'none'})"
            + (f"; most common: {top}" if top else "")
        )
    unfit = [(i, "tokenize", f"not tokenized: {error.message}") for i in left]
    table = concat_tables(
        [
            errors,
            pa.Table.from_pylist(
                [{"item_id": i, "stage": s, "error": e} for i, s, e in unfit], ERRORS_SCHEMA
            ),
        ]
    )
    table = table if table is not None else ERRORS_SCHEMA.empty_table()
    store.write_parquet(table, *staging_dir(run.run_id), ERRORS_FILE)
    counts = Counts(
        input=ingest.input_rows, assigned=0, quarantined=ingest.quarantined, failed=len(items)
    )
    counts.check()
    stages_stats = {s.stage: s.stats.model_dump() for s in [ingest, *stages]}
    error.accounting = {"counts": counts.model_dump(), "stages": stages_stats}
    raise error
