"""The nightly tokenization flow: catalog in, published SID table out.

    ingest -> [caption -> interests -> embed] per item shard -> fit -> [encode] per shard
    -> assign -> publish

`nightly_tokenization` is what deployments run: it settles the run's date and picks the task
runner from the config, then runs `tokenize_catalog`, whose body is the DAG, one call per stage.
Tasks hand each other small values (keys, file names, counts); the data lives in the artifact
store. Every stage caches per item, a run holds its catalog's lock in the store, and a killed
run started again continues where it stopped (finished shards are kept).
"""

from __future__ import annotations

from datetime import date, datetime
from zoneinfo import ZoneInfo

from prefect import flow, get_run_logger, unmapped
from prefect.futures import wait
from prefect.runtime import deployment, flow_run

from sidpipe.config import PipelineConfig, documented_defaults, resolve_config
from sidpipe.flows.clean_failures import fail_cleanly
from sidpipe.flows.runners import make_task_runner
from sidpipe.progress import show_sidpipe_info
from sidpipe.storage.lock import StoreLock, catalog_lock_name
from sidpipe.storage.manifest import utcnow
from sidpipe.storage.store import ArtifactStore
from sidpipe.tasks.assign import assign_task
from sidpipe.tasks.caption import caption_task
from sidpipe.tasks.embed import embed_task
from sidpipe.tasks.encode import encode_task
from sidpipe.tasks.fit import fit_task
from sidpipe.tasks.ingest import ingest_task
from sidpipe.tasks.interests import interests_task
from sidpipe.tasks.preflight import preflight
from sidpipe.tasks.publish import publish_task
from sidpipe.tasks.runs import (
    check_items_left,
    mark_failed,
    mark_published,
    new_run_id,
    start_run,
)
from sidpipe.tasks.shards import gather_task


def logical_date(run_date: date | None, timezone: str = "UTC") -> date:
    """The run's date: as given (backfills), else the scheduled start in the schedule's time
    zone (nightly), else today there."""
    if run_date is not None:
        return run_date
    scheduled: datetime | None = flow_run.scheduled_start_time
    moment = scheduled if scheduled is not None else utcnow()
    return moment.astimezone(ZoneInfo(timezone)).date()


@flow(name="nightly-tokenization", log_prints=True)
@fail_cleanly
def nightly_tokenization(
    config: PipelineConfig = documented_defaults(),  # noqa: B008 - Prefect renders it as a form
    run_date: date | None = None,
) -> dict:
    """Tokenize a catalog into Semantic IDs and publish them under <store>/sids/<catalog>/<date>/.

    Args:
        config: Settings of this run; what it leaves at the documented defaults comes from the
            worker's SIDPIPE_* environment.
        run_date: The date to publish under (empty: the scheduled start's date, or today).
    """
    # Stage cores log through the `sidpipe` logger: this sends it to the runs' logs in the UI.
    show_sidpipe_info()
    config = resolve_config(config, from_deployment=deployment.id is not None)
    day = logical_date(run_date, config.orchestration.timezone)
    runner = make_task_runner(config.orchestration)
    # The DAG runs as a subflow that carries the configured task runner; its artifacts attach
    # to this run (sidpipe.artifacts), its stage lines stay in its own log, named for the day.
    name = f"tokenize-{config.catalog.store_name}-{day.isoformat()}"
    manifest = tokenize_catalog.with_options(task_runner=runner, flow_run_name=name)(
        config, day, flow_run.id
    )
    counts = manifest["counts"]
    get_run_logger().info(
        "published %s/%s as run %s: %d items in, %d assigned, %d quarantined, %d failed "
        "(stage lines: subflow %s)",
        manifest["catalog"],
        manifest["run_date"],
        manifest["run_id"],
        counts["input"],
        counts["assigned"],
        counts["quarantined"],
        counts["failed"],
        name,
    )
    return manifest


@flow(name="tokenize-catalog")
@fail_cleanly
def tokenize_catalog(config: PipelineConfig, run_date: date, parent_run: str | None = None) -> dict:
    """The DAG of one run, under the catalog's lock."""
    logger = get_run_logger()
    store = ArtifactStore(config.store)  # one store for every task of the run
    preflight(config, store)
    orchestration = config.orchestration
    run_id = new_run_id(parent_run)
    lock = StoreLock(
        store,
        catalog_lock_name(config.catalog.store_name),
        run_id=run_id,
        ttl_seconds=orchestration.lock_ttl_seconds,
        wait_seconds=orchestration.lock_wait_seconds,
    )
    with lock:
        run, record = start_run(store, config, run_date, run_id, parent_run)
        lock.set_run_id(run.run_id)  # a resumed run goes on under the older run id
        run = run.model_copy(update={"lock_token": lock.token})
        logger.info(
            "run %s (attempt %d): catalog %s for %s into %s",
            run.run_id,
            run.attempt,
            run.catalog,
            run.run_date,
            store.root_uri,
        )
        shards_in_flight: list = []
        try:
            ingest = ingest_task(store, config, run)
            check_items_left(store, config, run, ingest, [])  # enough for a fit: else stop here
            shards = list(range(ingest.shard_count))
            # Per shard, interests waits only for its own shard's captions, embed for its own
            # interests: shards flow through the three stages independently.
            same = {"store": unmapped(store), "config": unmapped(config), "run": unmapped(run)}
            captions = caption_task.map(**same, shard=shards)
            interests = interests_task.map(
                **same, ingest=unmapped(ingest), shard=shards, caption=captions
            )
            embeds = embed_task.map(
                **same, ingest=unmapped(ingest), shard=shards, caption=captions, interests=interests
            )
            shards_in_flight = [*captions, *interests, *embeds]
            # .result() raises a shard's own error (e.g. a model server that is down).
            caption = gather_task(store, run, [f.result() for f in captions])
            interest = gather_task(store, run, [f.result() for f in interests])
            embed = gather_task(store, run, [f.result() for f in embeds])
            check_items_left(store, config, run, ingest, [caption, interest, embed])
            fit = fit_task(store, config, run, embed)
            # Encoding maps over shards too (each reads only its own rows); assign gathers.
            codes = encode_task.map(**same, embed=unmapped(embed), fit=unmapped(fit), shard=shards)
            shards_in_flight = [*shards_in_flight, *codes]
            assign = assign_task(store, config, run, embed, fit, [f.result() for f in codes])
            lock.ensure_held()
            manifest = publish_task(
                store, config, run, ingest, [caption, interest, embed], fit, assign
            )
        except BaseException as exc:
            # Shards still running keep writing into this run's folder: let them finish
            # before the lock is given back and another attempt may adopt the folder.
            wait(shards_in_flight)
            mark_failed(store, record, exc)
            raise
        mark_published(store, record, manifest)
    return manifest.model_dump(mode="json")
