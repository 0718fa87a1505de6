"""The nightly tokenization flow: catalog in, published SID table out.

    ingest -> caption -> interests -> embed -> fit -> assign -> publish

Each call below is one stage (a Prefect task in `sidpipe.tasks`). Tasks hand each other small
values (keys, file names, counts); the data lives in the artifact store. Every stage caches per
item, so a re-run with unchanged inputs recomputes nothing costly.
"""

from __future__ import annotations

import logging
import uuid
from datetime import date

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from sidpipe.config import PipelineConfig
from sidpipe.storage.manifest import RunRecord, sids_dir, utcnow, write_run_record
from sidpipe.storage.store import ArtifactStore
from sidpipe.tasks.assign import assign_task
from sidpipe.tasks.embed import embed_task
from sidpipe.tasks.enrich import caption_task, check_endpoints, interests_task
from sidpipe.tasks.fit import fit_task
from sidpipe.tasks.ingest import ingest_task
from sidpipe.tasks.publish import publish_task
from sidpipe.tasks.stage import RunInfo


def _logical_date(run_date: date | None) -> date:
    """The run's date: as given (backfills), else the scheduled start (nightly), else today."""
    if run_date is not None:
        return run_date
    scheduled = flow_run.scheduled_start_time
    return scheduled.date() if scheduled is not None else utcnow().date()


def _run_id() -> str:
    started = utcnow().strftime("%Y%m%dT%H%M%S")
    prefect_id = flow_run.id
    return f"{started}-{(prefect_id or uuid.uuid4().hex)[:8]}"


@flow(name="nightly-tokenization", log_prints=True)
def nightly_tokenization(
    config: PipelineConfig = PipelineConfig(),  # noqa: B008 - Prefect renders it as a form
    run_date: date | None = None,
) -> dict:
    """Tokenize a catalog into Semantic IDs and publish them under <store>/sids/<catalog>/<date>/."""
    logger = get_run_logger()
    # Stage cores log through the `sidpipe` logger (Prefect forwards it: PREFECT_LOGGING_EXTRA_
    # LOGGERS); make their INFO lines visible unless the user chose a level.
    if logging.getLogger("sidpipe").level == logging.NOTSET:
        logging.getLogger("sidpipe").setLevel(logging.INFO)
    check_endpoints(config)
    run = RunInfo(
        run_id=_run_id(),
        run_date=_logical_date(run_date),
        catalog=config.catalog.name,
        started_at=utcnow(),
    )
    store = ArtifactStore(config.store)
    record = RunRecord(
        run_id=run.run_id,
        catalog=run.catalog,
        run_date=run.run_date,
        status="running",
        started_at=run.started_at,
    )
    write_run_record(store, record)
    logger.info(
        "run %s: catalog %s for %s into %s", run.run_id, run.catalog, run.run_date, store.root_uri
    )
    try:
        ingest = ingest_task(config, run)
        caption = caption_task(config, run, ingest)
        interests = interests_task(config, run, ingest, caption)
        embed = embed_task(config, run, ingest, caption, interests)
        fit = fit_task(config, run, embed)
        assign = assign_task(config, run, embed, fit)
        manifest = publish_task(config, run, ingest, [caption, interests, embed], fit, assign)
    except BaseException as exc:
        write_run_record(
            store,
            record.model_copy(
                update={
                    "status": "failed",
                    "finished_at": utcnow(),
                    "error": f"{type(exc).__name__}: {exc}",
                }
            ),
        )
        raise
    write_run_record(
        store,
        record.model_copy(
            update={
                "status": "published",
                "finished_at": manifest.finished_at,
                "counts": manifest.counts,
                "stages": manifest.stages,
                "published": "/".join(sids_dir(run.catalog, run.run_date)),
            }
        ),
    )
    return manifest.model_dump(mode="json")
