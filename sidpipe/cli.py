"""The `sidpipe` command line: run the tokenization flow, inspect what it published.

`inspect` only reads the store (no Prefect, no models), so it is fast and safe to point at
production buckets.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import date
from pathlib import Path
from typing import Annotated

import typer
import yaml
from rich.console import Console
from rich.markdown import Markdown
from rich.table import Table

from sidpipe.config import ConfigError, load_config

app = typer.Typer(
    name="sidpipe",
    help="Turn an item catalog into Semantic IDs (SIDs) for generative recommendation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
console = Console()
err = Console(stderr=True)

COSTLY_STAGES = ("caption", "interests", "embed", "fit")
STAGE_COLUMNS = ("stage", "computed", "cached", "skipped", "failed", "seconds")

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
        "[env: SIDPIPE_STORE; default ./artifacts].",
    ),
]


def _prefect_defaults() -> None:
    """Quiet, robust defaults for Prefect's ephemeral API; set before Prefect is imported."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "sidpipe")


def _table(title: str, columns: tuple[str, ...], right: tuple[str, ...] = ()) -> Table:
    """A rich table whose cells wrap instead of being cut: ids must stay readable."""
    table = Table(title=title)
    for column in columns:
        table.add_column(column, overflow="fold", justify="right" if column in right else "left")
    return table


def _fail(message: str) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code=2)


@app.command()
def run(
    config: ConfigOption = None,
    store: StoreOption = None,
    catalog: Annotated[
        str | None,
        typer.Option(
            help="Catalog file (Parquet/JSONL/CSV, local or s3://) [default: bundled sample]."
        ),
    ] = None,
    catalog_name: Annotated[
        str | None, typer.Option(help="Name used in artifact paths [default: fashion-sample].")
    ] = None,
    run_date: Annotated[
        str | None,
        typer.Option(help="Logical date of the run, YYYY-MM-DD (backfills) [default: today]."),
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
    _prefect_defaults()
    try:
        cfg = load_config(config, store=store)
        if catalog or catalog_name:
            updates = {k: v for k, v in {"uri": catalog, "name": catalog_name}.items() if v}
            cfg = cfg.model_copy(
                update={"catalog": cfg.catalog.model_validate(cfg.catalog.model_dump() | updates)}
            )
        if refit:
            cfg = cfg.model_copy(
                update={"tokenizer": cfg.tokenizer.model_copy(update={"refit": True})}
            )
        day = date.fromisoformat(run_date) if run_date else None
    except (ConfigError, ValueError) as exc:
        raise _fail(str(exc)) from None

    from sidpipe.flows.nightly import nightly_tokenization
    from sidpipe.models.openai_client import EndpointUnavailableError
    from sidpipe.models.rqvae import CatalogTooSmallError
    from sidpipe.models.tokenizer import EmbeddingInputError
    from sidpipe.tasks.fit import QualityGateError, TokenizerMismatchError
    from sidpipe.tasks.ingest import CatalogError

    started = time.perf_counter()
    try:
        manifest = nightly_tokenization(cfg, run_date=day)
    except (
        CatalogError,
        CatalogTooSmallError,
        EndpointUnavailableError,
        ConfigError,
        QualityGateError,
        TokenizerMismatchError,
        EmbeddingInputError,
    ) as exc:
        # Problems of the input or the settings: one clear message, no traceback.
        raise _fail(str(exc)) from None
    _print_run_summary(manifest, time.perf_counter() - started)


def _print_run_summary(manifest: dict, seconds: float) -> None:
    table = _table(
        f"{manifest['catalog']} {manifest['run_date']}  (run {manifest['run_id']})",
        STAGE_COLUMNS,
        right=STAGE_COLUMNS[1:],
    )
    for name, s in manifest["stages"].items():
        table.add_row(
            name,
            f"{s['computed']:,}",
            f"{s['cached']:,}",
            f"{s['skipped']:,}",
            f"{s['failed']:,}",
            f"{s['seconds']:.1f}",
        )
    console.print(table)
    c = manifest["counts"]
    console.print(
        f"items: {c['input']:,} in = {c['assigned']:,} assigned + "
        f"{c['quarantined']:,} quarantined + {c['failed']:,} failed"
    )
    recomputed = {
        n: manifest["stages"][n]["computed"] for n in COSTLY_STAGES if n in manifest["stages"]
    }
    if not any(recomputed.values()):
        console.print(
            "[green]nothing costly recomputed[/]: caption, interests, embed and fit "
            "all came from the cache or were skipped"
        )
    else:
        done = ", ".join(f"{n} {v:,}" for n, v in recomputed.items() if v)
        console.print(f"computed: {done}")
    sids = manifest["files"]["sids"]["path"]
    console.print(
        f"tokenizer {manifest['tokenizer_id']}; published "
        f"[bold]{sids.rsplit('/', 1)[0]}/[/] in {seconds:.1f}s"
    )


@app.command()
def inspect(
    target: Annotated[
        str | None,
        typer.Argument(
            help="CATALOG or CATALOG/RUN_DATE to show one run (latest date if omitted); "
            "nothing to list all runs."
        ),
    ] = None,
    store: StoreOption = None,
    rows: Annotated[int, typer.Option(help="SID table rows to show.")] = 10,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the raw manifest as JSON.")
    ] = False,
) -> None:
    """List published runs and the run log, or show one run: manifest, SID table head and
    quality report. Works on a local folder or s3://."""
    from sidpipe.storage.manifest import published_runs, read_manifest, run_records
    from sidpipe.storage.store import ArtifactStore, StoreError

    try:
        artifact_store = ArtifactStore(store or load_config().store)
        if target is None:
            _print_run_list(
                published_runs(artifact_store), run_records(artifact_store), artifact_store
            )
            return
        catalog, _, day = target.partition("/")
        if not day:
            runs = published_runs(artifact_store, catalog)
            if not runs:
                raise _fail(f"no published run of catalog {catalog!r} in {artifact_store.root_uri}")
            day = runs[-1].run_date.isoformat()
        try:
            manifest = read_manifest(artifact_store, catalog, day)
        except FileNotFoundError:
            raise _fail(
                f"no published run {catalog}/{day} in {artifact_store.root_uri} "
                "(a run without _MANIFEST.json is not published)"
            ) from None
    except (StoreError, ConfigError) as exc:
        raise _fail(str(exc)) from None

    if as_json:
        sys.stdout.write(json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n")
        return
    _print_manifest(manifest)
    sids = artifact_store.read_parquet(manifest.files["sids"].path)
    head = _table(
        f"sids.parquet ({sids.num_rows:,} rows; first {min(rows, sids.num_rows)})",
        ("item_id", "sid", "codes", "suffix", "first_assigned"),
    )
    for row in sids.slice(0, rows).to_pylist():
        head.add_row(
            row["item_id"],
            row["sid"],
            str(row["codes"]),
            str(row["suffix"]),
            str(row["first_assigned"]),
        )
    console.print(head)
    if "quality" in manifest.files:
        from sidpipe.models.sids import quality_markdown

        console.print(
            Markdown(quality_markdown(artifact_store.read_json(manifest.files["quality"].path)))
        )


def _print_run_list(manifests, records, store) -> None:
    if not manifests and not records:
        console.print(f"no runs in {store.root_uri}")
        return
    counts = ("input", "assigned", "quarantined", "failed")
    published = _table(
        f"published runs in {store.root_uri}",
        ("catalog", "run_date", "run_id", *counts, "tokenizer"),
        right=counts,
    )
    for m in manifests:
        c = m.counts
        published.add_row(
            m.catalog,
            str(m.run_date),
            m.run_id,
            f"{c.input:,}",
            f"{c.assigned:,}",
            f"{c.quarantined:,}",
            f"{c.failed:,}",
            m.tokenizer_id or "",
        )
    console.print(published)
    log = _table(
        "run log (every run, newest last)",
        (
            "run_id",
            "catalog",
            "run_date",
            "status",
            "computed embed/fit",
            "cached embed/fit",
            "seconds",
            "error",
        ),
    )
    for r in records:
        embed, fit = r.stages.get("embed"), r.stages.get("fit")
        computed = f"{embed.computed:,}/{fit.computed:,}" if embed and fit else ""
        cached = f"{embed.cached:,}/{fit.cached:,}" if embed and fit else ""
        seconds = f"{(r.finished_at - r.started_at).total_seconds():.1f}" if r.finished_at else ""
        log.add_row(
            r.run_id,
            r.catalog,
            str(r.run_date),
            r.status,
            computed,
            cached,
            seconds,
            (r.error or "")[:80],
        )
    console.print(log)


def _print_manifest(m) -> None:
    c = m.counts
    console.print(
        f"[bold]{m.catalog} {m.run_date}[/]  run {m.run_id}  "
        f"finished {m.finished_at:%Y-%m-%d %H:%M:%S} UTC"
    )
    console.print(
        f"items: {c.input:,} in = {c.assigned:,} assigned + {c.quarantined:,} "
        f"quarantined + {c.failed:,} failed"
    )
    console.print(
        f"tokenizer: {m.tokenizer_id}; code: sidpipe {m.code_version.get('sidpipe')} "
        f"{(m.code_version.get('git_commit') or '')[:10]}"
    )
    stages = _table("stages", STAGE_COLUMNS, right=STAGE_COLUMNS[1:])
    for name, s in m.stages.items():
        stages.add_row(
            name,
            f"{s.computed:,}",
            f"{s.cached:,}",
            f"{s.skipped:,}",
            f"{s.failed:,}",
            f"{s.seconds:.1f}",
        )
    console.print(stages)
    files = _table("files", ("role", "path", "rows", "bytes"), right=("rows", "bytes"))
    for role, f in m.files.items():
        files.add_row(role, f.path, "" if f.rows is None else f"{f.rows:,}", f"{f.bytes:,}")
    console.print(files)


@app.command()
def fit(
    embeddings: Annotated[
        str,
        typer.Option(help="Parquet with item_id and embedding (list of floats); local or s3://."),
    ],
    out: Annotated[str, typer.Option(help="Output folder or s3:// prefix.")],
    codebooks: Annotated[
        str, typer.Option(help="Codes per level, e.g. 256,256,256.")
    ] = "256,256,256",
    method: Annotated[str, typer.Option(help="rqvae or rqkmeans.")] = "rqvae",
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same SIDs).")] = 42,
    collisions: Annotated[str, typer.Option(help="suffix or reassign.")] = "suffix",
    config: ConfigOption = None,
) -> None:
    """Tokenize your own embeddings: writes a tokenizer, sids.parquet, a quality report
    (JSON, markdown, PNG) and the rows set aside (quarantine.parquet) under --out."""
    from sidpipe.models.rqvae import CatalogTooSmallError
    from sidpipe.models.tokenizer import EmbeddingInputError
    from sidpipe.tasks.fit import QualityGateError, fit_from_embeddings

    try:
        sizes = [int(k) for k in codebooks.split(",") if k.strip()]
        cfg = load_config(config)
        tokenizer_config = cfg.tokenizer.model_validate(
            cfg.tokenizer.model_dump()
            | {"codebook_sizes": sizes, "method": method, "seed": seed, "collisions": collisions}
        )
    except (ConfigError, ValueError) as exc:
        raise _fail(str(exc)) from None

    def progress(epoch: int, epochs: int, losses: dict) -> None:
        if epoch == epochs or epoch % max(1, epochs // 10) == 0:
            err.print(f"epoch {epoch}/{epochs}  loss {losses.get('total', 0):.4f}")

    try:
        quality = fit_from_embeddings(embeddings, out, tokenizer_config, progress)
    except (FileNotFoundError, EmbeddingInputError, CatalogTooSmallError, QualityGateError) as exc:
        raise _fail(str(exc)) from None
    from sidpipe.models.sids import quality_markdown

    console.print(Markdown(quality_markdown(quality)))
    console.print(
        f"wrote tokenizer/, sids.parquet, quality.json|md|png, quarantine.parquet "
        f"({quality['quarantined']:,} rows) to {out}"
    )


@app.command()
def tokenizers(
    catalog: Annotated[str, typer.Argument(help="Catalog name.")],
    store: StoreOption = None,
    pin: Annotated[
        str | None, typer.Option(help="Pin this tokenizer version: later runs encode with it.")
    ] = None,
) -> None:
    """List a catalog's tokenizer versions (which one is pinned, drift), or pin one."""
    from sidpipe.storage.registry import pin as pin_version
    from sidpipe.storage.registry import read_registry
    from sidpipe.storage.store import ArtifactStore

    artifact_store = ArtifactStore(store or load_config().store)
    if pin:
        try:
            pin_version(artifact_store, catalog, pin)
        except KeyError as exc:
            raise _fail(str(exc.args[0])) from None
        console.print(f"pinned {pin} for {catalog}; the next run encodes with it")
    registry = read_registry(artifact_store, catalog)
    table = _table(
        f"tokenizers of {catalog} in {artifact_store.root_uri}",
        (
            "tokenizer_id",
            "pinned",
            "method",
            "codebooks",
            "items",
            "parent",
            "SID drift",
            "created",
        ),
    )
    for v in registry.versions:
        table.add_row(
            v.tokenizer_id,
            "*" if v.tokenizer_id == registry.pinned else "",
            v.method,
            "/".join(map(str, v.codebook_sizes)),
            f"{v.items:,}",
            v.parent or "",
            f"{v.drift['sid_changed']:.1%}" if v.drift else "",
            f"{v.created_at:%Y-%m-%d %H:%M}",
        )
    console.print(table)


@app.command("config")
def show_config(config: ConfigOption = None) -> None:
    """Print the effective configuration (defaults < YAML < SIDPIPE_* env) as YAML."""
    try:
        cfg = load_config(config)
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    sys.stdout.write(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


if __name__ == "__main__":
    app()
