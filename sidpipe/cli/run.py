"""`sidpipe run` and `sidpipe backfill`: the tokenization flow, once or once per date."""

from __future__ import annotations

import os
import time
from datetime import date
from typing import Annotated

import typer

from sidpipe.cli.options import (
    CatalogNameOption,
    CatalogOption,
    ConfigOption,
    SameCatalogOption,
    StoreOption,
    catalog_settings,
)
from sidpipe.cli.render import console, print_run_summary, table
from sidpipe.config import chosen_settings, load_config
from sidpipe.errors import ConfigError


def parse_date(text: str | None, option: str) -> date | None:
    if text is None:
        return None
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"{option} {text!r} is not a date", hint="dates are YYYY-MM-DD") from None


def run(
    config: ConfigOption = None,
    store: StoreOption = None,
    catalog: CatalogOption = None,
    catalog_name: CatalogNameOption = None,
    same_catalog: SameCatalogOption = False,
    run_date: Annotated[
        str | None,
        typer.Option(help="Logical date of the run, YYYY-MM-DD (backfills) (default: today)."),
    ] = None,
    refit: Annotated[
        bool,
        typer.Option(
            "--refit",
            help="Fit a new tokenizer version, pin it and report SID drift, instead of encoding "
            "with the catalog's pinned tokenizer.",
        ),
    ] = False,
) -> None:
    """Run the nightly tokenization flow once: ingest, caption, interests, embed, fit, assign,
    publish. Unchanged items and tokenizers come from the cache."""
    from sidpipe.cli import prefect_defaults
    from sidpipe.tasks.preflight import preflight

    prefect_defaults()
    cfg = load_config(
        config,
        store=store,
        catalog=catalog_settings(catalog, catalog_name, same_catalog),
        tokenizer={"refit": True} if refit else None,
    )
    day = parse_date(run_date, "--run-date")
    preflight(cfg, servers=True)  # seconds, before Prefect's server starts: fails at once

    from sidpipe.flows.nightly import nightly_tokenization

    started = time.perf_counter()
    manifest = nightly_tokenization(cfg, run_date=day)
    print_run_summary(manifest, time.perf_counter() - started)


def backfill(
    start: Annotated[str, typer.Option("--from", help="First date, YYYY-MM-DD.")],
    end: Annotated[str, typer.Option("--to", help="Last date, YYYY-MM-DD (inclusive).")],
    config: ConfigOption = None,
    store: StoreOption = None,
    catalog: CatalogOption = None,
    catalog_name: CatalogNameOption = None,
    same_catalog: SameCatalogOption = False,
    deployment: Annotated[
        str | None,
        typer.Option(
            help="Run each date as a run of this deployment on the Prefect server "
            "(e.g. nightly-tokenization/nightly; needs PREFECT_API_URL). Default: run each date "
            "here, in this process."
        ),
    ] = None,
    submit: Annotated[
        bool,
        typer.Option(
            "--submit",
            help="Start the server's sidpipe-backfill/backfill deployment for the range and "
            "return at once (workers run it; follow it in the UI).",
        ),
    ] = False,
    keep_going: Annotated[
        bool, typer.Option("--keep-going", help="Go on with later dates after a failed one.")
    ] = False,
) -> None:
    """Tokenize the catalog once per date from --from to --to, oldest first, one after another
    (each date keeps the SIDs published before it)."""
    from sidpipe.cli import prefect_defaults

    prefect_defaults()
    first, last = parse_date(start, "--from"), parse_date(end, "--to")
    options = {"store": store, "catalog": catalog_settings(catalog, catalog_name, same_catalog)}
    cfg = load_config(config, **options)
    # What the caller chose, without this machine's SIDPIPE_* environment: runs on workers take
    # the rest from theirs.
    chosen = chosen_settings(config, **options)
    if (deployment or submit) and not os.environ.get("PREFECT_API_URL"):
        raise ConfigError(
            "--deployment and --submit need a Prefect server", hint="set PREFECT_API_URL"
        )
    from sidpipe.flows.backfill import backfill as backfill_flow
    from sidpipe.flows.backfill import dates_between, submit_backfill, without_secrets

    chosen = without_secrets(chosen)  # the backfill's own parameters are shown in the UI too
    days = dates_between(first, last)
    if submit:
        child = submit_backfill(first, last, deployment, chosen)
        console.print(
            f"submitted backfill {first}..{last} ({len(days)} dates): flow run {child.id} "
            f"({child.name}); follow it in the Prefect UI"
        )
        return
    results = backfill_flow(
        first,
        last,
        deployment=deployment,
        overrides=chosen,
        config=None if deployment else cfg,
        stop_on_failure=not keep_going,
    )
    out = table(f"backfill {first}..{last}", ("run_date", "state", "run_id / flow run"))
    for r in results:
        out.add_row(r["run_date"], r["state"], r.get("run_id") or r.get("flow_run", ""))
    console.print(out)


def register(app: typer.Typer) -> None:
    app.command()(run)
    app.command()(backfill)
