"""`sidpipe bootstrap` (prepare a Prefect server) and `sidpipe config` (the effective settings)."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
import yaml

from sidpipe.cli.options import ConfigOption
from sidpipe.cli.render import console, table
from sidpipe.config import load_config
from sidpipe.errors import BootstrapError


def bootstrap(
    limit: Annotated[
        int,
        typer.Option(
            min=1,
            help="Slots of each global concurrency limit (sidpipe-caption, sidpipe-interests, "
            "sidpipe-embed): shards of one stage that may hit its model server at once.",
        ),
    ] = 4,
    results_uri: Annotated[
        str,
        typer.Option(
            help="Where Prefect keeps task results (the sidpipe-results block): a local folder "
            "when the server and its workers share one machine, else a URI such as "
            "s3://sidpipe/prefect-results.",
        ),
    ] = "~/.sidpipe/prefect-results",
    deploy: Annotated[
        bool,
        typer.Option(
            "--deploy/--no-deploy",
            help="Afterwards register prefect.yaml's deployments (prefect --no-prompt deploy "
            "--all in the repo root).",
        ),
    ] = False,
) -> None:
    """Prepare a Prefect server for sidpipe (idempotent): work pools cpu-pool and gpu-pool,
    the global concurrency limits, the sidpipe-results storage block; optionally deploy."""
    from sidpipe.cli import prefect_defaults

    prefect_defaults()
    from sidpipe.deploy import bootstrap as run_bootstrap
    from sidpipe.deploy import deploy as run_deploy
    from sidpipe.deploy import results_slug

    summary = run_bootstrap(limit=limit, results_uri=results_uri)
    out = table("Prefect bootstrap", ("object", "status"))
    for status, names in summary.items():
        for name in names:
            out.add_row(name, status)
    console.print(out)
    console.print(f"workers use PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK={results_slug(results_uri)}")
    if deploy:
        code = run_deploy()
        if code:
            raise BootstrapError(f"prefect deploy --all failed (exit code {code})", hint="")
        console.print("deployments registered from prefect.yaml")


def show_config(config: ConfigOption = None) -> None:
    """Print the effective configuration (defaults < YAML < SIDPIPE_* env) as YAML."""
    sys.stdout.write(yaml.safe_dump(load_config(config).model_dump(mode="json"), sort_keys=False))


def register(app: typer.Typer) -> None:
    app.command("bootstrap")(bootstrap)
    app.command("config")(show_config)
