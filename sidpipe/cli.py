"""The `sidpipe` command line: run the tokenization flow, inspect what it published.

`inspect` only reads the store (no Prefect, no models), so it is fast and safe to point at
production buckets.
"""

from __future__ import annotations

import io
import json
import os
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Annotated

import typer
import yaml
from rich.console import Console
from rich.markdown import Markdown
from rich.markup import escape
from rich.table import Table

from sidpipe.config import ConfigError, deep_merge, load_config

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
STAGE_COLUMNS = ("stage", "computed", "cached", "resumed", "skipped", "failed", "seconds")

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


def _catalog_settings(uri: str | None, name: str | None) -> dict | None:
    """--catalog / --catalog-name as a config section (None: neither given)."""
    chosen = {k: v for k, v in {"uri": uri, "name": name}.items() if v}
    return chosen or None


def _fail(message: str) -> typer.Exit:
    # Escaped (messages hold paths and `[...]`) and never hard-wrapped (paths stay copyable).
    err.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    return typer.Exit(code=2)


@app.command()
def run(
    config: ConfigOption = None,
    store: StoreOption = None,
    catalog: Annotated[
        str | None,
        typer.Option(
            help="Catalog file (Parquet/JSONL/CSV, local or s3://) (default: bundled sample)."
        ),
    ] = None,
    catalog_name: Annotated[
        str | None, typer.Option(help="Name used in artifact paths (default: fashion-sample).")
    ] = None,
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
    _prefect_defaults()
    try:
        cfg = load_config(config, store=store, catalog=_catalog_settings(catalog, catalog_name))
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
    from sidpipe.storage.lock import LockHeldError
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
        LockHeldError,
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
            f"{s['resumed']:,}",
            f"{s['skipped']:,}",
            f"{s['failed']:,}",
            f"{s['seconds']:.1f}",
        )
    console.print(table)
    if manifest.get("attempts", 1) > 1:
        console.print(
            f"attempt {manifest['attempts']}: continued an unfinished run; shards it had "
            "finished were kept (resumed)"
        )
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
    rows: Annotated[
        int, typer.Option(help="SID table rows (with --diff: changed items) to show.")
    ] = 10,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json", help="Machine-readable output: the raw manifest, diff or quality report."
        ),
    ] = False,
    diff: Annotated[
        str | None,
        typer.Option(
            "--diff",
            metavar="CATALOG[/DATE]",
            help="Compare TARGET's SID table (A) with this run's (B): items only in A or B, "
            "SIDs changed (per level), tokenizer_id changed.",
        ),
    ] = None,
    out: Annotated[
        str | None,
        typer.Option(
            help="With --diff: write every differing item (item_id, change, sid_a, sid_b, ...) "
            "to this Parquet file (local or s3://)."
        ),
    ] = None,
    quality: Annotated[
        bool,
        typer.Option(
            "--quality", help="Print TARGET's quality report and save its quality.png locally."
        ),
    ] = False,
    save_to: Annotated[
        Path | None,
        typer.Option(help="With --quality: folder for quality.png (default: a new temp folder)."),
    ] = None,
    open_png: Annotated[
        bool, typer.Option("--open", help="With --quality: open quality.png in a viewer.")
    ] = False,
) -> None:
    """List published runs and the run log, show one run (manifest, SID table head, quality
    report), diff two runs' SID tables (--diff) or fetch a run's quality report (--quality).
    Reads only published runs (those with _MANIFEST.json); works on a local folder or s3://."""
    from sidpipe.storage.manifest import published_runs, run_records
    from sidpipe.storage.store import ArtifactStore, StoreError

    if diff and quality:
        raise _fail("--diff and --quality do not go together: pick one")
    if out and not diff:
        raise _fail("--out needs --diff (it writes the items that differ)")
    if (save_to or open_png) and not quality:
        raise _fail("--save-to and --open need --quality")
    if (diff or quality) and target is None:
        raise _fail("--diff and --quality need a run: sidpipe inspect CATALOG[/DATE] ...")
    try:
        artifact_store = ArtifactStore(store or load_config().store)
        if target is None:
            _print_run_list(
                published_runs(artifact_store), run_records(artifact_store), artifact_store
            )
            return
        manifest = _resolve_run(artifact_store, target)
        if diff:
            other = _resolve_run(artifact_store, diff)
            _inspect_diff(artifact_store, manifest, other, rows, as_json, out)
        elif quality:
            _inspect_quality(artifact_store, manifest, save_to, open_png, as_json)
        else:
            _inspect_run(artifact_store, manifest, rows, as_json)
    except (StoreError, ConfigError) as exc:
        raise _fail(str(exc)) from None


def _resolve_run(store, target: str):
    """The manifest of CATALOG/DATE (or of CATALOG's latest published run); exit 2 with what is
    missing (catalog, date, or the manifest of a run that failed or is still running)."""
    from sidpipe.storage.manifest import published_runs, read_manifest, run_records

    catalog, _, day = target.partition("/")
    if not catalog:
        raise _fail(f"{target!r} is not CATALOG or CATALOG/RUN_DATE")
    if not day:
        runs = published_runs(store, catalog)
        if runs:
            return runs[-1]
        catalogs = sorted({m.catalog for m in published_runs(store)})
        known = f"published catalogs: {', '.join(catalogs)}" if catalogs else "nothing is published"
        raise _fail(f"no published run of catalog {catalog!r} in {store.root_uri} ({known})")
    try:
        return read_manifest(store, catalog, day)
    except FileNotFoundError:
        pass
    attempts = [r for r in run_records(store) if r.catalog == catalog and str(r.run_date) == day]
    dates = [str(m.run_date) for m in published_runs(store, catalog)]
    if attempts:
        last = attempts[-1]
        detail = f"the run log's last run of that date, {last.run_id}, is {last.status}"
        detail += f": {last.error[:200]}" if last.error else ""
    elif dates:
        detail = f"published dates of {catalog}: {', '.join(dates[-10:])}"
    else:
        detail = f"catalog {catalog!r} has no published run"
    raise _fail(
        f"run {catalog}/{day} is not published in {store.root_uri}: no _MANIFEST.json ({detail})"
    )


PUBLISHED_FILES = {
    "sids": "SID table (sids.parquet)",
    "quality": "quality report (quality.json)",
    "quality_png": "quality plot (quality.png)",
}


def _read_published(store, manifest, role: str) -> bytes:
    """A published file's bytes, checked against the sha256 its manifest recorded."""
    from sidpipe.storage.hashing import sha256_bytes

    run = f"{manifest.catalog}/{manifest.run_date}"
    what = PUBLISHED_FILES.get(role, role)
    entry = manifest.files.get(role)
    if entry is None:
        raise _fail(f"run {run} has no {what}: its manifest lists {', '.join(manifest.files)}")
    try:
        data = store.read_bytes(entry.path)
    except FileNotFoundError:
        raise _fail(f"{what} of run {run} is missing: {store.uri(entry.path)}") from None
    if sha256_bytes(data) != entry.sha256:
        raise _fail(
            f"{store.uri(entry.path)} does not match the manifest of {run} (sha256): "
            "republished while being read? Try again"
        )
    return data


def _run_ref(m) -> dict:
    return {
        "catalog": m.catalog,
        "run_date": str(m.run_date),
        "run_id": m.run_id,
        "tokenizer_id": m.tokenizer_id,
        "sids": m.files["sids"].path if "sids" in m.files else None,
    }


def _inspect_run(store, manifest, rows: int, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n")
        return
    import pyarrow.parquet as pq

    _print_manifest(manifest)
    sids = pq.read_table(io.BytesIO(_read_published(store, manifest, "sids")))
    head = _table(
        f"sids.parquet ({sids.num_rows:,} rows; first {min(rows, sids.num_rows)})",
        ("item_id", "sid", "codes", "suffix", "first_assigned"),
    )
    for row in sids.slice(0, rows).to_pylist():
        head.add_row(
            escape(row["item_id"]),
            row["sid"],
            str(row["codes"]),
            str(row["suffix"]),
            str(row["first_assigned"]),
        )
    console.print(head)
    if "quality" in manifest.files:
        from sidpipe.models.sids import quality_markdown

        console.print(Markdown(quality_markdown(store.read_json(manifest.files["quality"].path))))


def _inspect_diff(store, a, b, rows: int, as_json: bool, out: str | None) -> None:
    import pyarrow.parquet as pq

    from sidpipe.models.sid_diff import SidDiffError, diff_sids
    from sidpipe.storage.store import ArtifactStore

    tables = [pq.read_table(io.BytesIO(_read_published(store, m, "sids"))) for m in (a, b)]
    try:
        report = diff_sids(*tables)
    except SidDiffError as exc:
        raise _fail(str(exc)) from None
    if out:
        folder, name = out.rsplit("/", 1) if "://" in out else os.path.split(out)
        ArtifactStore(os.path.expanduser(folder) or ".").write_parquet(report.changes, name)
    if as_json:
        head = report.rows("sid_changed", rows)
        result = {"a": _run_ref(a), "b": _run_ref(b), **report.to_dict(), "sid_changed_head": head}
        sys.stdout.write(json.dumps(result | {"out": out}, indent=2) + "\n")
        return
    _print_diff(a, b, report, rows)
    differing = report.changes.num_rows
    if out:
        console.print(f"wrote {differing:,} differing items to {out}", soft_wrap=True, markup=False)
    elif differing:
        console.print(f"all {differing:,} differing items: add --out FILE.parquet")


def _print_diff(a, b, report, rows: int) -> None:
    def share(n: int, of: int) -> str:
        return f"{n / of:.1%}" if of else ""

    def tokenizers(counts: dict[str, int]) -> str:
        return ", ".join(f"{t} ({n:,})" for t, n in counts.items()) or "-"

    r = report
    label_a, label_b = f"{a.catalog}/{a.run_date}", f"{b.catalog}/{b.run_date}"
    console.print(f"[bold]A[/] {label_a}  run {a.run_id}  tokenizer {tokenizers(r.tokenizers_a)}")
    console.print(f"[bold]B[/] {label_b}  run {b.run_id}  tokenizer {tokenizers(r.tokenizers_b)}")
    summary = _table(f"SID diff {label_a} -> {label_b}", ("", "items", "share"), ("items", "share"))
    for name, n, of in (
        ("in A", r.items_a, 0),
        ("in B", r.items_b, 0),
        ("only in A (removed)", r.only_in_a, r.items_a),
        ("only in B (added)", r.only_in_b, r.items_b),
        ("in both", r.in_both, 0),
        ("  SID changed", r.sid_changed, r.in_both),
        ("  tokenizer_id changed", r.tokenizer_changed, r.in_both),
        ("  unchanged", r.unchanged, r.in_both),
    ):
        summary.add_row(name, f"{n:,}", share(n, of))
    console.print(summary)
    if r.sid_changed:
        levels = _table(
            f"where the {r.sid_changed:,} changed SIDs differ",
            ("level", "code changed", "first differs here"),
            ("code changed", "first differs here"),
        )
        for level in r.levels:
            levels.add_row(
                f"{level.level} ({level.token})",
                f"{level.code_changed:,} ({share(level.code_changed, r.sid_changed)})",
                f"{level.first_changed:,} ({share(level.first_changed, r.sid_changed)})",
            )
        levels.add_row(
            "suffix only", "", f"{r.suffix_only:,} ({share(r.suffix_only, r.sid_changed)})"
        )
        console.print(levels)
    if r.sid_changed and rows > 0:
        head = r.rows("sid_changed", rows)
        changed = _table(
            f"SID changed: first {len(head):,} of {r.sid_changed:,} (by item_id)",
            ("item_id", "sid A", "sid B", "first differs"),
        )
        for row in head:
            level = row["first_changed_level"]
            where = f"level {level}" if level <= len(r.levels) else "suffix"
            changed.add_row(escape(row["item_id"]), row["sid_a"], row["sid_b"], where)
        console.print(changed)


def _inspect_quality(store, manifest, save_to: Path | None, open_png: bool, as_json: bool) -> None:
    from sidpipe.models.sids import quality_markdown

    report = json.loads(_read_published(store, manifest, "quality"))
    png = _read_published(store, manifest, "quality_png")
    try:
        folder = save_to or Path(tempfile.mkdtemp(prefix="sidpipe-quality-"))
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{manifest.catalog}-{manifest.run_date}-quality.png"
        path.write_bytes(png)
    except OSError as exc:
        raise _fail(f"cannot save quality.png: {exc}") from None
    if as_json:
        result = {"run": _run_ref(manifest), "quality": report, "png": str(path)}
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    else:
        console.print(Markdown(quality_markdown(report)))
        console.print(f"quality.png saved to {path}", soft_wrap=True, markup=False)
    if open_png:
        typer.launch(str(path))


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
            f"{s.resumed:,}",
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
def backfill(
    start: Annotated[str, typer.Option("--from", help="First date, YYYY-MM-DD.")],
    end: Annotated[str, typer.Option("--to", help="Last date, YYYY-MM-DD (inclusive).")],
    config: ConfigOption = None,
    store: StoreOption = None,
    catalog: Annotated[
        str | None, typer.Option(help="Catalog file (default: the config's / bundled sample).")
    ] = None,
    catalog_name: Annotated[str | None, typer.Option(help="Name used in artifact paths.")] = None,
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
    _prefect_defaults()
    try:
        first, last = date.fromisoformat(start), date.fromisoformat(end)
        from sidpipe.flows.backfill import dates_between

        days = dates_between(first, last)
        cfg = load_config(config, store=store, catalog=_catalog_settings(catalog, catalog_name))
        # What the caller chose (YAML file and options), without this machine's SIDPIPE_*
        # environment: runs on workers take the rest from theirs.
        options = {"store": store, "catalog": _catalog_settings(catalog, catalog_name)}
        chosen = deep_merge(
            yaml.safe_load(Path(config).read_text()) or {} if config else {},
            {k: v for k, v in options.items() if v is not None},
        )
    except (ConfigError, ValueError) as exc:
        raise _fail(str(exc)) from None
    if (deployment or submit) and not os.environ.get("PREFECT_API_URL"):
        raise _fail("--deployment and --submit need a Prefect server: set PREFECT_API_URL")

    if submit:
        from prefect.deployments import run_deployment

        parameters = {"start": first.isoformat(), "end": last.isoformat()}
        if deployment:
            parameters["deployment"] = deployment
        if chosen:
            parameters["overrides"] = chosen
        child = run_deployment(
            "sidpipe-backfill/backfill", parameters=parameters, timeout=0, as_subflow=False
        )
        console.print(
            f"submitted backfill {first}..{last} ({len(days)} dates): flow run {child.id} "
            f"({child.name}); follow it in the Prefect UI"
        )
        return

    from sidpipe.flows.backfill import backfill as backfill_flow

    state = backfill_flow(
        first,
        last,
        deployment=deployment,
        overrides=chosen,
        config=None if deployment else cfg,
        stop_on_failure=not keep_going,
        return_state=True,
    )
    results = state.result(raise_on_failure=False)
    if isinstance(results, BaseException):
        raise _fail(str(results)) from None
    table = _table(f"backfill {first}..{last}", ("run_date", "state", "run_id / flow run"))
    for r in results:
        table.add_row(r["run_date"], r["state"], r.get("run_id") or r.get("flow_run", ""))
    console.print(table)


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


@app.command("bootstrap")
def bootstrap_command(
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
        typer.Option(help="Where Prefect keeps task results (the sidpipe-results block)."),
    ] = "s3://sidpipe/prefect-results",
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
    _prefect_defaults()
    import httpx

    from sidpipe.deploy import RESULTS_BLOCK_SLUG, BootstrapError
    from sidpipe.deploy import bootstrap as run_bootstrap
    from sidpipe.deploy import deploy as run_deploy

    try:
        summary = run_bootstrap(limit=limit, results_uri=results_uri)
    except BootstrapError as exc:
        raise _fail(str(exc)) from None
    except httpx.HTTPError as exc:  # an unreachable or failing API: one line, not a traceback
        raise _fail(f"Prefect API: {type(exc).__name__}: {exc}") from None
    table = _table("Prefect bootstrap", ("object", "status"))
    for status, names in summary.items():
        for name in names:
            table.add_row(name, status)
    console.print(table)
    console.print(f"workers use PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK={RESULTS_BLOCK_SLUG}")
    if deploy:
        try:
            code = run_deploy()
        except BootstrapError as exc:
            raise _fail(str(exc)) from None
        if code:
            raise _fail(f"prefect deploy --all failed (exit code {code})")
        console.print("deployments registered from prefect.yaml")


train_app = typer.Typer(help="Training flows that read the published artifacts.")
app.add_typer(train_app, name="train")


@train_app.command("genrec")
def train_genrec_command(
    config: Annotated[
        str,
        typer.Option(
            "--config",
            "-c",
            help="Preset (cpu-small, beauty-cpu, beauty-multitask-cpu, beauty, "
            "beauty-multitask, sasrec-beauty) or a YAML file (`base: <preset>` to start "
            "from one).",
        ),
    ] = "cpu-small",
    store: StoreOption = None,
    catalog: Annotated[str | None, typer.Option(help="Catalog of the published SIDs.")] = None,
    run_date: Annotated[
        str | None, typer.Option(help="Published run date (default: the latest).")
    ] = None,
    interactions: Annotated[
        str | None, typer.Option(help="Parquet with user_id, item_id, timestamp.")
    ] = None,
    model: Annotated[str | None, typer.Option(help="tiger or sasrec.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Most epochs (early stopping).")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    time_limit_minutes: Annotated[
        float | None,
        typer.Option(
            help="Minutes to train: stops before an epoch that would not fit, and cuts an "
            "epoch longer than the whole budget."
        ),
    ] = None,
) -> None:
    """Train the TIGER-style generative recommender (or SASRec) on a catalog's published SIDs
    and evaluate it (leave-one-out, full ranking, constrained beam search)."""
    from sidpipe.config import train_config

    _prefect_defaults()
    try:
        cfg = train_config(
            config,
            store=store or os.environ.get("SIDPIPE_STORE"),
            catalog=catalog,
            run_date=run_date,
            interactions=interactions,
            model=model,
            epochs=epochs,
            device=device,
            seed=seed,
            time_limit_minutes=time_limit_minutes,
        )
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    from sidpipe.flows.train_genrec import train_genrec
    from sidpipe.tasks.train_data import TrainingDataError

    try:
        metrics = train_genrec(cfg)
    except TrainingDataError as exc:
        raise _fail(str(exc)) from None
    table = _table(
        f"{cfg.name} ({cfg.model}): {metrics['users']:,} test users, {metrics['items']:,} items",
        ("", "R@5", "R@10", "N@5", "N@10", "users"),
        right=("R@5", "R@10", "N@5", "N@10", "users"),
    )
    rows = [("all", {**metrics})] + list(metrics["by_popularity"].items())
    for name, m in rows:
        table.add_row(
            name,
            f"{m['recall@5']:.4f}",
            f"{m['recall@10']:.4f}",
            f"{m['ndcg@5']:.4f}",
            f"{m['ndcg@10']:.4f}",
            f"{m['users']:,}",
        )
    console.print(table)
    console.print(
        f"invalid SIDs without the trie: {metrics['invalid_rate']:.2%}; {metrics['epochs']} "
        f"epochs in {metrics['train_seconds']:.0f}s on {metrics['machine']}; "
        f"written to training/genrec/{metrics['run_id']}/"
    )


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
