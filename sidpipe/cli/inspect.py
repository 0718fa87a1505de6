"""`sidpipe inspect`: what a store has published, without Prefect or models.

Reads only published runs (those with _MANIFEST.json), each file checked against its manifest,
so it is fast and safe to point at production buckets; works on a local folder or s3://.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from sidpipe.cli.options import StoreOption
from sidpipe.cli.render import (
    console,
    err,
    print_diff,
    print_json,
    print_manifest,
    print_markdown,
    print_run_list,
    print_sid_head,
)
from sidpipe.config import load_config
from sidpipe.errors import ConfigError, StoreError


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
    from sidpipe.storage.manifest import run_records
    from sidpipe.storage.published import published_runs, resolve_target
    from sidpipe.storage.store import existing_store

    for problem, message in (
        (diff and quality, "--diff and --quality do not go together: pick one"),
        (out and not diff, "--out needs --diff (it writes the items that differ)"),
        ((save_to or open_png) and not quality, "--save-to and --open need --quality"),
        ((diff or quality) and target is None, "--diff and --quality need a run"),
    ):
        if problem:
            raise ConfigError(message, hint="sidpipe inspect CATALOG[/DATE] [--diff ...|--quality]")
    artifact_store = existing_store(store or load_config().store)
    if target is None:
        print_run_list(
            published_runs(artifact_store), run_records(artifact_store), artifact_store.root_uri
        )
        return
    manifest = resolve_target(artifact_store, target)
    if diff:
        _diff(artifact_store, manifest, resolve_target(artifact_store, diff), rows, as_json, out)
    elif quality:
        _quality(artifact_store, manifest, save_to, open_png, as_json)
    else:
        _run(artifact_store, manifest, rows, as_json)


def _ref(manifest) -> dict:
    from sidpipe.storage.published import run_ref

    sids = manifest.files.get("sids")
    return run_ref(manifest) | {"sids": sids.path if sids else None}


def _run(store, manifest, rows: int, as_json: bool) -> None:
    from sidpipe.models.sids import quality_markdown
    from sidpipe.storage.published import read_published, read_published_table

    if as_json:
        print_json(manifest.model_dump(mode="json"))
        return
    print_manifest(manifest)
    print_sid_head(read_published_table(store, manifest, "sids"), rows)
    if "quality" in manifest.files:
        print_markdown(quality_markdown(json.loads(read_published(store, manifest, "quality"))))


def _diff(store, a, b, rows: int, as_json: bool, out: str | None) -> None:
    from sidpipe.models.sid_diff import diff_sids
    from sidpipe.storage.published import read_published_table
    from sidpipe.storage.store import ArtifactStore

    report = diff_sids(*(read_published_table(store, m, "sids") for m in (a, b)))
    if out:
        folder, name = out.rsplit("/", 1) if "://" in out else os.path.split(out)
        ArtifactStore(os.path.expanduser(folder) or ".").write_parquet(report.changes, name)
    if as_json:
        head = report.rows("sid_changed", rows)
        print_json(
            {"a": _ref(a), "b": _ref(b), **report.to_dict(), "sid_changed_head": head, "out": out}
        )
        return
    print_diff(a, b, report, rows)
    differing = report.changes.num_rows
    if out:
        console.print(f"wrote {differing:,} differing items to {out}", soft_wrap=True, markup=False)
    elif differing:
        console.print(f"all {differing:,} differing items: add --out FILE.parquet")


def _quality(store, manifest, save_to: Path | None, open_png: bool, as_json: bool) -> None:
    from sidpipe.models.sids import quality_markdown
    from sidpipe.storage.published import read_published

    report = json.loads(read_published(store, manifest, "quality"))
    png = read_published(store, manifest, "quality_png")
    try:
        folder = save_to or Path(tempfile.mkdtemp(prefix="sidpipe-quality-"))
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{manifest.catalog}-{manifest.run_date}-quality.png"
        path.write_bytes(png)
    except OSError as exc:
        raise StoreError(
            f"cannot save quality.png: {exc}", hint="pick a writable --save-to"
        ) from None
    if as_json:
        print_json({"run": _ref(manifest), "quality": report, "png": str(path)})
    else:
        print_markdown(quality_markdown(report))
        console.print(f"quality.png saved to {path}", soft_wrap=True, markup=False)
    if open_png and typer.launch(str(path)) not in (0, None):
        # On stderr: with --json, stdout is the report alone.
        err.print(f"no image viewer could be started here; open {path} yourself", markup=False)


def register(app: typer.Typer) -> None:
    app.command()(inspect)
