"""Options several commands share, declared once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML config file (SIDPIPE_* env vars override it)."),
]
StoreOption = Annotated[
    str | None,
    typer.Option(
        "--store",
        "-s",
        help="Artifact store root: a folder or s3://bucket/prefix "
        "(env SIDPIPE_STORE; default ./artifacts).",
    ),
]
CatalogOption = Annotated[
    str | None,
    typer.Option(
        help="Catalog file (Parquet/JSONL/CSV, local or s3://) (default: bundled sample)."
    ),
]
CatalogNameOption = Annotated[
    str | None,
    typer.Option(
        help="Name used in artifact paths (default: from the file name, e.g. "
        "data/shop.jsonl -> shop; catalog.csv in folder acme/ -> acme)."
    ),
]
SameCatalogOption = Annotated[
    bool,
    typer.Option(
        "--same-catalog",
        help="The file is a new snapshot or location of the catalog already published under "
        "this name (otherwise another source under a taken name is refused).",
    ),
]

# What a training flow reads: a catalog's published run, plus interactions.
PublishedCatalogOption = Annotated[
    str | None, typer.Option("--catalog", help="Catalog of the published SIDs.")
]
PublishedDateOption = Annotated[
    str | None, typer.Option("--run-date", help="Published run date (default: the latest).")
]
InteractionsOption = Annotated[
    str | None, typer.Option("--interactions", help="Parquet with user_id, item_id, timestamp.")
]
DeviceOption = Annotated[str | None, typer.Option("--device", help="auto, cpu or cuda.")]


def catalog_settings(uri: str | None, name: str | None, same: bool = False) -> dict | None:
    """--catalog / --catalog-name / --same-catalog as a config section (None: none given)."""
    chosen = {k: v for k, v in {"uri": uri, "name": name, "same_catalog": same}.items() if v}
    return chosen or None
