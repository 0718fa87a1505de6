"""Backfill: tokenize a catalog once per date of a range, oldest first, each run after the last.

Dates run in order and one at a time because each nightly run keeps the SIDs of the last
published table before its date (stable SIDs): a later date must see the earlier one published.

With `deployment` (the default when it runs on a worker), each date is a run of that deployment
(`nightly-tokenization/nightly`): it shows in the UI as a child of the backfill, runs on the
deployment's work pool under its concurrency limit, and gets an idempotency key, so retrying the
backfill never starts a date twice. Without one (`sidpipe backfill` on a laptop), each date runs
in this process as a subflow.
"""

from __future__ import annotations

from datetime import date, timedelta

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.runtime import flow_run

from sidpipe.config import PipelineConfig
from sidpipe.flows.nightly import nightly_tokenization

NIGHTLY_DEPLOYMENT = "nightly-tokenization/nightly"


def dates_between(start: date, end: date) -> list[date]:
    if end < start:
        raise ValueError(f"backfill range is empty: end {end} is before start {start}")
    return [start + timedelta(days=i) for i in range((end - start).days + 1)]


def config_overrides(config: PipelineConfig | None) -> dict:
    """The settings a caller chose, as a child run's parameter (the worker's SIDPIPE_* env
    fills in the rest). API keys never travel as parameters: workers get them from env."""
    if config is None:
        return {}
    overrides = config.model_dump(mode="json", exclude_unset=True)
    for section in overrides.values():
        if isinstance(section, dict):
            section.pop("api_key", None)
    return overrides


@flow(name="sidpipe-backfill", log_prints=True)
def backfill(
    start: date,
    end: date,
    deployment: str | None = NIGHTLY_DEPLOYMENT,
    config: PipelineConfig | None = None,
    stop_on_failure: bool = True,
) -> list[dict]:
    """Run the nightly tokenization for every date from `start` to `end` (inclusive)."""
    logger = get_run_logger()
    days = dates_between(start, end)
    overrides = config_overrides(config)
    results: list[dict] = []
    for day in days:
        if deployment:
            from prefect.deployments import run_deployment

            parameters: dict = {"run_date": day.isoformat()}
            if overrides:
                parameters["config"] = overrides
            child = run_deployment(
                deployment,
                parameters=parameters,
                flow_run_name=f"backfill-{day.isoformat()}",
                idempotency_key=f"sidpipe-backfill-{flow_run.id}-{day.isoformat()}",
                poll_interval=2,
            )
            ok = child.state is not None and child.state.is_completed()
            state = child.state.name if child.state else "unknown"
            result = {"run_date": day.isoformat(), "state": state, "flow_run": str(child.id)}
        else:
            state = nightly_tokenization(
                config or PipelineConfig(), run_date=day, return_state=True
            )
            ok = state.is_completed()
            result = {"run_date": day.isoformat(), "state": state.name, "flow_run": ""}
            if ok:
                manifest = state.result()
                result["run_id"] = manifest["run_id"]
                result["assigned"] = manifest["counts"]["assigned"]
        results.append(result)
        logger.info("backfill %s: %s", day, result["state"])
        if not ok and stop_on_failure:
            logger.error("backfill stops at %s (stop_on_failure): later dates not run", day)
            break
    create_table_artifact(results, key="backfill-summary", description=f"Backfill {start} .. {end}")
    failed = [r["run_date"] for r in results if r["state"] != "Completed"]
    if failed or len(results) < len(days):
        raise RuntimeError(
            f"backfill {start}..{end}: {len(results) - len(failed)} of {len(days)} dates "
            f"published; failed: {', '.join(failed) or 'none'}"
        )
    return results
