"""Backfill: tokenize a catalog once per date of a range, oldest first, each run after the last.

Dates run in order and one at a time because each nightly run keeps the SIDs of the last
published table before its date (stable SIDs): a later date must see the earlier one published.

With `deployment` (the default when it runs on a worker), each date is a run of that deployment
(`nightly-tokenization/nightly`): it shows in the UI as a child of the backfill, runs on the
deployment's work pool under its concurrency limit, and gets an idempotency key, so retrying the
backfill never runs a date twice that already succeeded (a failed date runs again). Without one (`sidpipe backfill` on a laptop), each date runs
in this process as a subflow.
"""

from __future__ import annotations

from datetime import date, timedelta

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.runtime import flow_run

from sidpipe.config import PipelineConfig, load_config
from sidpipe.errors import (
    BackfillError,
    ConfigError,
    DeploymentNotFound,
    PrefectServerUnavailable,
)
from sidpipe.flows.clean_failures import fail_cleanly
from sidpipe.flows.nightly import nightly_tokenization
from sidpipe.redact import redact_urls

NIGHTLY_DEPLOYMENT = "nightly-tokenization/nightly"


def _completed(child) -> bool:
    return child.state is not None and child.state.is_completed()


def dates_between(start: date, end: date) -> list[date]:
    if end < start:
        raise ConfigError(
            f"backfill range is empty: end {end} is before start {start}",
            hint="start (--from) is the first date, end (--to) the last",
        )
    return [start + timedelta(days=i) for i in range((end - start).days + 1)]


def without_secrets(overrides: dict | None) -> dict:
    """Settings for a child run's `config` parameter. API keys and URLs with credentials in
    them (http://user:password@host) never travel as parameters (Prefect shows parameters in
    the UI): workers get them from their environment."""

    def secret(key: str, value: object) -> bool:
        return key == "api_key" or (key == "url" and redact_urls(str(value)) != str(value))

    cleaned = {}
    for key, value in (overrides or {}).items():
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if not secret(k, v)}
        cleaned[key] = value
    return cleaned


def run_deployment(name: str, **options):
    """Prefect's run_deployment, with a missing deployment or server as one clear error."""
    import os

    import httpx
    from prefect.deployments import run_deployment as start
    from prefect.exceptions import ObjectNotFound

    try:
        return start(name, **options)
    except ObjectNotFound:
        raise DeploymentNotFound(
            f"the Prefect server at {os.environ.get('PREFECT_API_URL', '?')} has no deployment "
            f"{name}"
        ) from None
    except httpx.HTTPError as exc:
        raise PrefectServerUnavailable(
            f"cannot reach the Prefect server at {os.environ.get('PREFECT_API_URL', '?')}: {exc}"
        ) from None


def submit_backfill(start: date, end: date, deployment: str | None, overrides: dict):
    """Start the server's backfill deployment for the range and return its flow run at once."""
    parameters = {"start": start.isoformat(), "end": end.isoformat()}
    if deployment:
        parameters["deployment"] = deployment
    if overrides:
        parameters["overrides"] = overrides
    return run_deployment(
        "sidpipe-backfill/backfill", parameters=parameters, timeout=0, as_subflow=False
    )


@flow(name="sidpipe-backfill", log_prints=True)
@fail_cleanly
def backfill(
    start: date,
    end: date,
    deployment: str | None = NIGHTLY_DEPLOYMENT,
    overrides: dict | None = None,
    config: PipelineConfig | None = None,
    stop_on_failure: bool = True,
) -> list[dict]:
    """Run the nightly tokenization for every date from `start` to `end` (inclusive).

    Args:
        start: The first date to tokenize.
        end: The last date to tokenize (inclusive); not before `start`.
        deployment: The deployment that runs each date (empty: each date runs in this
            process).
        overrides: Settings for every date's run, as a partial config, e.g. {"catalog": {"uri":
            "s3://shop/catalog.parquet"}}; the workers fill in the rest from their SIDPIPE_*
            environment.
        config: The whole config, for dates run in this process (no deployment).
        stop_on_failure: Stop at the first date that fails (later dates depend on it).
    """
    logger = get_run_logger()
    days = dates_between(start, end)
    overrides = without_secrets(overrides)
    results: list[dict] = []
    for day in days:
        if deployment:
            parameters: dict = {"run_date": day.isoformat()}
            if overrides:
                parameters["config"] = overrides
            key = f"sidpipe-backfill-{flow_run.id}-{day.isoformat()}"
            child = run_deployment(
                deployment,
                parameters=parameters,
                flow_run_name=f"backfill-{day.isoformat()}",
                idempotency_key=key,  # a retried backfill gets the date's finished run back
                poll_interval=2,
            )
            if not _completed(child) and (flow_run.run_count or 1) > 1:
                # A retry of the backfill: run a date that failed before once more.
                child = run_deployment(
                    deployment,
                    parameters=parameters,
                    flow_run_name=f"backfill-{day.isoformat()}",
                    idempotency_key=f"{key}-retry-{flow_run.run_count}",
                    poll_interval=2,
                )
            ok = _completed(child)
            state = child.state.name if child.state else "unknown"
            result = {"run_date": day.isoformat(), "state": state, "flow_run": str(child.id)}
            if not ok:
                result["error"] = (child.state.message if child.state else None) or state
        else:
            state = nightly_tokenization(
                config or load_config(**overrides), run_date=day, return_state=True
            )
            ok = state.is_completed()
            result = {"run_date": day.isoformat(), "state": state.name, "flow_run": ""}
            if not ok:
                result["error"] = state.message or state.name
            if ok:
                manifest = state.result()
                result["run_id"] = manifest["run_id"]
                result["assigned"] = manifest["counts"]["assigned"]
        result["ok"] = ok
        results.append(result)
        why = "" if ok else f" ({result['error']})"
        logger.info("backfill %s: %s%s", day, result["state"], why)
        if not ok and stop_on_failure:
            logger.error("backfill stops at %s (stop_on_failure): later dates not run", day)
            break
    create_table_artifact(results, key="backfill-summary", description=f"Backfill {start} .. {end}")
    failed = [f"{r['run_date']} ({r['error']})" for r in results if not r["ok"]]
    if failed or len(results) < len(days):
        raise BackfillError(
            f"backfill {start}..{end}: {len(results) - len(failed)} of {len(days)} dates "
            f"published; failed: {'; '.join(failed) or 'none'}"
        )
    return results
