"""A run's life in the store: start (or resume) it, then mark it published or failed.

Every run leaves one record in the run log (`runs/<run_id>/_RUN.json`). When a run is killed or
fails, its record stays `running`/`failed` and its staged work stays in `runs/<run_id>/`: the
next run of the same catalog, date and result-shaping settings adopts that run id as a new
attempt, so finished shards are not computed again (see `tasks.shards.run_shard`). Call these
while holding the catalog's lock (`storage.lock`): only then is a `running` record a dead run.
"""

from __future__ import annotations

import uuid
from datetime import date

from sidpipe.config import PipelineConfig
from sidpipe.errors import SidpipeError
from sidpipe.storage.hashing import stable_hash
from sidpipe.storage.layout import sids_dir
from sidpipe.storage.manifest import Manifest, RunRecord, resumable_run, utcnow, write_run_record
from sidpipe.storage.store import ArtifactStore
from sidpipe.tasks.stage import RunInfo

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
    catalog = config.catalog.name
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
    _finish(store, record, status="failed", finished_at=utcnow(), error=error)
