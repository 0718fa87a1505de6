"""assign: give every item its SID with the fit's tokenizer, keeping every SID that exists.

Gathers the codes `encode` staged per shard and builds the SID table against the catalog's last
published one (`models.sid_table`: unchanged items keep their rows, collisions get a suffix or a
free code, a refit gets a drift report); writes the table, its quality report and picture, and
the token vocabulary into the run's staging folder for `publish`.
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from prefect import get_run_logger, task

from sidpipe import artifacts
from sidpipe.config import PipelineConfig, TokenizerConfig
from sidpipe.models.sid_table import assign_sids, drift_report, table_quality
from sidpipe.models.sids import (
    codebook_tokens,
    quality_markdown,
    quality_warnings,
    suffix_tokens,
)
from sidpipe.storage.layout import QUALITY_FILE, QUALITY_PNG, SIDS_FILE, TOKENS_FILE, staging_dir
from sidpipe.storage.manifest import StageStats
from sidpipe.storage.published import latest_published, read_published_table
from sidpipe.storage.store import ArtifactStore
from sidpipe.tasks.encode import read_codes
from sidpipe.tasks.fitting import load_tokenizer
from sidpipe.tasks.report import quality_png
from sidpipe.tasks.stage import (
    TASK_OPTIONS,
    AssignOutcome,
    FitOutcome,
    RunInfo,
    StageOutcome,
    failed_items,
    read_items,
    stage_ids,
    stage_rows,
)


def assign_stage(
    store: ArtifactStore,
    run: RunInfo,
    items: pa.Table,
    embed: StageOutcome,
    fit: FitOutcome,
    codes_files: list[str],
    config: TokenizerConfig | None = None,
) -> AssignOutcome:
    started = time.perf_counter()
    config = config or TokenizerConfig()
    # Item ids, hashes and codes stay Arrow and numpy columns: no Python object per item.
    item_ids = stage_ids(store, run, embed)[0].combine_chunks()
    rejected = pa.array(sorted(failed_items(store, run, [fit])), pa.string())
    keep = np.flatnonzero(~pc.is_in(item_ids, value_set=rejected).to_numpy(zero_copy_only=False))
    item_ids = item_ids.take(pa.array(keep))
    tokenizer, _ = load_tokenizer(store, fit.tokenizer_id)
    staged_ids, staged_codes = read_codes(store, run, codes_files)
    codes = staged_codes[_positions(item_ids, staged_ids, "encoded codes")]
    previous_run = latest_published(store, run.catalog, not_after=run.run_date)
    previous = None
    if previous_run is not None and "sids" in previous_run.files:
        previous = read_published_table(store, previous_run, "sids")
    hashes = items["item_hash"].take(_positions(item_ids, items["item_id"], "ingested items"))
    # The embeddings (for reassignment's nearby tuples and the reconstruction report) are spilled
    # to a local file and read a block at a time: never the whole N x D matrix at once.
    with stage_rows(store, run, embed, "embedding") as spill:
        x = spill.subset(keep)
        nearby = None
        if config.collisions == "reassign":

            def nearby(rows: list[int], count: int) -> tuple[np.ndarray, np.ndarray]:
                return tokenizer.nearby_tuples(x[rows], count)

        table, stats = assign_sids(
            item_ids,
            codes,
            fit.tokenizer_id,
            run.run_date,
            hashes,
            previous,
            nearby,
            config.reassign_max_loss,
        )

        final_codes, quality = table_quality(
            table, stats, tokenizer, x, fit.codebook_sizes, config.collisions
        )
    quality |= {
        "tokenizer_id": fit.tokenizer_id,
        "method": fit.method,
        "kept_from_previous_run": stats["kept_exactly"],
        "encoded_this_run": stats["encoded"],
        "sizing_message": fit.sizing_message,
    }
    if previous is not None and previous.num_rows:
        if previous["tokenizer_id"][0].as_py() != fit.tokenizer_id or fit.unchanged:
            quality["drift"] = drift_report(previous, table)  # zero for an unchanged refit
    quality["notes"] = []
    if fit.unchanged:
        changed = quality.get("drift", {}).get("sid_changed", 0.0)
        quality["notes"].append(
            f"refit: settings and embeddings are unchanged, so the fit reproduced the pinned "
            f"tokenizer {fit.tokenizer_id} (SID drift {changed:.1%}); change tokenizer settings "
            "for a new version"
        )
    quality["warnings"] = quality_warnings(
        quality, config.warn_distinct_tuple_rate, config.warn_max_bucket
    )

    staging = staging_dir(run.run_id)
    store.write_parquet(table, *staging, SIDS_FILE)
    store.write_json(quality, *staging, QUALITY_FILE)
    store.write_bytes(
        quality_png(final_codes, quality, f"{run.catalog} {run.run_date}: {fit.tokenizer_id}"),
        *staging,
        QUALITY_PNG,
    )
    tokens = codebook_tokens(fit.codebook_sizes) + suffix_tokens(
        len(fit.codebook_sizes), quality["max_suffix"]
    )
    store.write_text("\n".join(tokens) + "\n", *staging, TOKENS_FILE)
    return AssignOutcome(
        stage="assign",
        key=fit.tokenizer_id,
        index=SIDS_FILE,
        stats=StageStats(
            computed=stats["encoded"],
            cached=stats["kept_exactly"],
            seconds=time.perf_counter() - started,
        ),
        assigned=table.num_rows,
        quality=quality,
    )


def _positions(item_ids: pa.Array, among: pa.Array | pa.ChunkedArray, what: str) -> np.ndarray:
    """Row of each item id in `among` (which holds every one of them)."""
    position = pc.index_in(item_ids, value_set=among)
    if position.null_count:
        raise RuntimeError(f"assign: {position.null_count} embedded items have no {what}")
    return position.to_numpy(zero_copy_only=False).astype(np.int64)


@task(name="assign", **TASK_OPTIONS)
def assign_task(
    store: ArtifactStore,
    config: PipelineConfig,
    run: RunInfo,
    embed: StageOutcome,
    fit: FitOutcome,
    codes_files: list[str],
) -> AssignOutcome:
    items = read_items(store, run)
    outcome = assign_stage(store, run, items, embed, fit, codes_files, config.tokenizer)
    artifacts.markdown(
        quality_markdown(outcome.quality), key="sid-quality", description="SID quality of this run"
    )
    get_run_logger().info(
        "assign: %d SIDs (%d kept, %d encoded), %.1f%% distinct code tuples",
        outcome.assigned,
        outcome.stats.cached,
        outcome.stats.computed,
        100 * outcome.quality["distinct_tuple_rate"],
    )
    for warning in outcome.quality["warnings"]:
        get_run_logger().warning("SID quality: %s", warning)
    return outcome
