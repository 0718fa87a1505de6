"""publish: write the run's tables to their published names and the manifest last.

Also checks the one invariant users rely on most: every input row is assigned, quarantined or
failed, with a reason (`input == assigned + quarantined + failed`).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from prefect import get_run_logger, task

import sidpipe
from sidpipe import artifacts
from sidpipe.config import PipelineConfig
from sidpipe.errors import CorruptArtifactError
from sidpipe.storage.layout import (
    EMBEDDINGS_FILE,
    ENRICHMENT_FILE,
    ENRICHMENT_SCHEMA,
    ERRORS_FILE,
    ERRORS_SCHEMA,
    ITEMS_FILE,
    MANIFEST_NAME,
    QUALITY_FILE,
    QUALITY_PNG,
    QUARANTINE_FILE,
    SIDS_FILE,
    TOKENS_FILE,
    catalog_dir,
    sids_dir,
    staging_dir,
)
from sidpipe.storage.lock import ensure_holder
from sidpipe.storage.manifest import Counts, Manifest, publish, read_manifest, utcnow
from sidpipe.storage.registry import TokenizerVersion, register
from sidpipe.storage.store import ArtifactStore, concat_tables
from sidpipe.tasks.stage import (
    TASK_OPTIONS,
    AssignOutcome,
    FitOutcome,
    IngestOutcome,
    RunInfo,
    StageOutcome,
    read_index,
    stage_rows,
    stage_values,
)


def code_version() -> dict:
    """sidpipe's version and, when run from a git checkout, the commit (and whether it is dirty)."""
    version: dict = {"sidpipe": sidpipe.__version__, "git_commit": None, "git_dirty": None}
    root = Path(sidpipe.__file__).resolve().parent.parent
    if not (root / ".git").exists():  # an installed package: no checkout to ask
        return version
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5
        )
        if commit.returncode == 0:
            version["git_commit"] = commit.stdout.strip()
            status = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=root,
                capture_output=True,
                text=True,
                timeout=5,
            )
            version["git_dirty"] = bool(status.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return version


def write_embeddings(store: ArtifactStore, run: RunInfo, stages: list[StageOutcome]) -> int:
    """Stage `embeddings.parquet`: item_id, embedding (float32) of every item that got a SID,
    the content the SIDs were made from, for training flows (AKT-Rec's content view, AsymRec's
    inputs). Written a block of rows at a time from a local spill of the embed stage, so it
    needs one block's memory at any catalog size. Returns its row count."""
    embed = next(s for s in stages if s.stage == "embed")
    index = read_index(store, run, embed)  # dropped once its sorted ids are taken
    ids = index.sort_by("item_id")["item_id"] if index is not None else pa.array([], pa.string())
    del index
    assigned = store.read_parquet(*staging_dir(run.run_id), SIDS_FILE, columns=["item_id"])
    keep = pc.is_in(ids, value_set=assigned["item_id"]).to_numpy(zero_copy_only=False)
    with stage_rows(store, run, embed, "embedding") as x:
        schema = pa.schema([("item_id", pa.string()), ("embedding", pa.list_(pa.float32(), x.dim))])

        def batches():
            start = 0
            for block in x.chunks():
                mask = keep[start : start + len(block)]
                yield pa.table(
                    {
                        "item_id": ids[start : start + len(block)].filter(pa.array(mask)),
                        "embedding": pa.FixedSizeListArray.from_arrays(
                            pa.array(block[mask].reshape(-1), pa.float32()), x.dim
                        ),
                    },
                    schema=schema,
                )
                start += len(block)

        _, rows = store.write_parquet_batches(
            schema, batches(), *staging_dir(run.run_id), EMBEDDINGS_FILE
        )
    return rows


def enrichment_table(
    store: ArtifactStore, run: RunInfo, stages: list[StageOutcome]
) -> pa.Table | None:
    """item_id, caption, interests of the items the model stages enriched (None: none ran)."""
    by_name = {s.stage: s for s in stages}
    values = {
        column: stage_values(store, run, by_name[column], column)
        for column in ("caption", "interests")
        if column in by_name and not by_name[column].skipped
    }
    if not values:
        return None
    ids = sorted(set().union(*(v.keys() for v in values.values())))
    return pa.table(
        {
            "item_id": ids,
            "caption": [values.get("caption", {}).get(i) for i in ids],
            "interests": [values.get("interests", {}).get(i) for i in ids],
        },
        schema=ENRICHMENT_SCHEMA,
    )


def publish_stage(
    store: ArtifactStore,
    run: RunInfo,
    config: PipelineConfig,
    ingest: IngestOutcome,
    stages: list[StageOutcome],
    fit: FitOutcome,
    assign: AssignOutcome,
) -> Manifest:
    staging = staging_dir(run.run_id)
    errors = (
        concat_tables(
            store.read_parquet(*staging, s.errors) for s in [*stages, fit] if s.errors is not None
        )
        or ERRORS_SCHEMA.empty_table()
    )
    store.write_parquet(errors, *staging, ERRORS_FILE)

    counts = Counts(
        input=ingest.input_rows,
        assigned=assign.assigned,
        quarantined=ingest.quarantined,
        failed=errors.num_rows,
    )
    by_name = {s.stage: s for s in [ingest, *stages, fit, assign]}
    manifest = Manifest(
        run_id=run.run_id,
        catalog=run.catalog,
        run_date=run.run_date,
        started_at=run.started_at,
        finished_at=utcnow(),
        code_version=code_version(),
        config=config.model_dump(mode="json"),
        models={name: s.model for name, s in by_name.items() if s.model},
        inputs={
            "catalog": config.catalog.uri,
            "catalog_sha256": ingest.catalog_sha256,
            "items_hash": ingest.items_hash,
            "rows": ingest.input_rows,
            "attribute_columns": ingest.attribute_columns,
        },
        tokenizer_id=fit.tokenizer_id,
        counts=counts,
        stages={name: s.stats for name, s in by_name.items()},
        attempts=run.attempt,
        warnings=assign.quality.get("warnings", []),
        notes=assign.quality.get("notes", []),
    )
    sids, cat = sids_dir(run.catalog, run.run_date), catalog_dir(run.catalog, run.run_date)
    items_rows = store.read_parquet(*staging, ITEMS_FILE, columns=["item_id"]).num_rows
    optional = {}
    enrichment = enrichment_table(store, run, stages)
    if enrichment is not None:
        store.write_parquet(enrichment, *staging, ENRICHMENT_FILE)
        optional["enrichment"] = (ENRICHMENT_FILE, sids, enrichment.num_rows)
    optional["embeddings"] = (EMBEDDINGS_FILE, sids, write_embeddings(store, run, stages))
    manifest = publish(
        store,
        manifest,
        {
            "items": (ITEMS_FILE, cat, items_rows),
            "quarantine": (QUARANTINE_FILE, cat, ingest.quarantined),
            "sids": (SIDS_FILE, sids, assign.assigned),
            "errors": (ERRORS_FILE, sids, errors.num_rows),
            "quality": (QUALITY_FILE, sids, None),
            "quality_png": (QUALITY_PNG, sids, None),
            "tokens": (TOKENS_FILE, sids, None),
            **optional,
        },
    )
    if fit.fitted:
        # Pinned only now: a fit whose run never published (and so never showed its drift
        # report) must not become the tokenizer of the next nightly run.
        register(
            store,
            run.catalog,
            TokenizerVersion(
                tokenizer_id=fit.tokenizer_id,
                method=fit.method,
                created_at=utcnow(),
                embed_key=fit.embed_key,
                items=fit.stats.computed + fit.stats.cached,
                codebook_sizes=fit.codebook_sizes,
                parent=fit.parent,
                drift=assign.quality.get("drift"),
            ),
            pin=True,
        )
    return manifest


def published_files_markdown(store: ArtifactStore, manifest: Manifest) -> str:
    """Where every published file is (full URIs, readable by polars/duckdb), with its rows."""
    c = manifest.counts
    lines = [
        f"### {manifest.catalog} {manifest.run_date} (run {manifest.run_id}, "
        f"attempt {manifest.attempts})",
        "",
        f"{c.input:,} items in = {c.assigned:,} assigned + {c.quarantined:,} quarantined + "
        f"{c.failed:,} failed",
        "",
        "| file | rows | bytes | URI |",
        "|---|---:|---:|---|",
    ]
    for role, f in manifest.files.items():
        uri = store.uri(f.path)
        rows = "" if f.rows is None else f"{f.rows:,}"
        lines.append(f"| {role} | {rows} | {f.bytes:,} | [{uri}]({uri}) |")
    manifest_uri = store.uri(*sids_dir(manifest.catalog, manifest.run_date), MANIFEST_NAME)
    lines += ["", f"Manifest (read it first): [{manifest_uri}]({manifest_uri})"]
    return "\n".join(lines)


def already_published(store: ArtifactStore, run: RunInfo) -> Manifest | None:
    """This run's manifest if it is already published: a retry after a publish that completed
    (e.g. a storage error while cleaning staging) must not redo it from emptied staging."""
    try:
        manifest = read_manifest(store, run.catalog, run.run_date)
    except (FileNotFoundError, CorruptArtifactError):
        return None  # a corrupt manifest is replaced by this run's
    return manifest if manifest.run_id == run.run_id else None


@task(name="publish", **TASK_OPTIONS)
def publish_task(
    store: ArtifactStore,
    config: PipelineConfig,
    run: RunInfo,
    ingest: IngestOutcome,
    stages: list[StageOutcome],
    fit: FitOutcome,
    assign: AssignOutcome,
) -> Manifest:
    ensure_holder(store, run.lock_name, run.lock_token)
    manifest = already_published(store, run) or publish_stage(
        store, run, config, ingest, stages, fit, assign
    )
    artifacts.table(
        [{"stage": name, **s.model_dump()} for name, s in manifest.stages.items()],
        key="tokenization-stages",
        description=f"Stages of run {run.run_id}",
    )
    artifacts.link(
        store.uri(manifest.files["sids"].path),
        text="SID table",
        key="sid-table",
        description=f"{run.catalog} {run.run_date}",
    )
    artifacts.markdown(
        published_files_markdown(store, manifest),
        key="published-files",
        description=f"Published files of {run.catalog} {run.run_date}",
    )
    get_run_logger().info(
        "publish: %s/%s published (%d assigned, %d quarantined, %d failed)",
        run.catalog,
        run.run_date,
        manifest.counts.assigned,
        manifest.counts.quarantined,
        manifest.counts.failed,
    )
    return manifest
