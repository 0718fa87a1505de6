"""fit: make sure the catalog has a tokenizer to encode with, training one only when needed.

The lifecycle (stable SIDs):
- the catalog's **pinned** tokenizer (see `storage.registry`) is reused by every nightly run, so
  existing items keep their SIDs; nothing is trained;
- with no pinned tokenizer (the first run) or with `tokenizer.refit`, a tokenizer is fitted on the
  run's embeddings (`tasks.fitting`: id, quality gates, files); `assign` writes a drift report
  against the previous SIDs, and `publish` registers and pins the new version only once the run
  is published;
- a pinned tokenizer fitted on another embedding space (embedder or text template changed) is
  never used silently: the run stops and says to refit.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
from prefect import task

from sidpipe.config import PipelineConfig, TokenizerConfig
from sidpipe.errors import TokenizerMismatchError
from sidpipe.models.tokenizer import embedding_norms, screen_norms
from sidpipe.storage.hashing import hash_strings
from sidpipe.storage.layout import TOKENIZER_CONFIG, tokenizer_dir
from sidpipe.storage.manifest import StageStats
from sidpipe.storage.registry import TokenizerVersion, read_registry
from sidpipe.storage.spill import SpilledRows
from sidpipe.storage.store import ArtifactStore
from sidpipe.tasks.fitting import fit_and_store
from sidpipe.tasks.stage import (
    TASK_OPTIONS,
    FitOutcome,
    RunInfo,
    StageOutcome,
    stage_ids,
    stage_rows,
    write_errors,
)

log = logging.getLogger(__name__)


def _pinned_outcome(
    pinned: TokenizerVersion, embed: StageOutcome, config: TokenizerConfig, **common
) -> FitOutcome:
    if pinned.embed_key != embed.key:
        raise TokenizerMismatchError(
            f"the pinned tokenizer {pinned.tokenizer_id} was fitted on embeddings "
            f"{pinned.embed_key}, this run's are {embed.key} (embedder or text template changed)"
        )
    log.info("fit: encoding with the pinned tokenizer %s (no training)", pinned.tokenizer_id)
    if pinned.method != config.method or len(pinned.codebook_sizes) != len(config.codebook_sizes):
        log.warning(
            "fit: tokenizer settings differ from the pinned %s (%s, %d levels); they "
            "take effect only with a refit",
            pinned.tokenizer_id,
            pinned.method,
            len(pinned.codebook_sizes),
        )
    return FitOutcome(
        stage="fit",
        key=pinned.tokenizer_id,
        tokenizer_id=pinned.tokenizer_id,
        method=pinned.method,
        codebook_sizes=pinned.codebook_sizes,
        parent=pinned.tokenizer_id,
        model={
            "name": pinned.method,
            "tokenizer_id": pinned.tokenizer_id,
            "codebook_sizes": pinned.codebook_sizes,
            "pinned": True,
        },
        **common,
    )


def fit_stage(
    store: ArtifactStore, run: RunInfo, embed: StageOutcome, config: TokenizerConfig
) -> FitOutcome:
    started = time.perf_counter()
    # The embeddings are spilled to a local file and read a block at a time: screening needs
    # every row's norm, the fit only its sample, the quality report one slice at a time.
    item_ids, hashes = stage_ids(store, run, embed)
    with stage_rows(store, run, embed, "embedding") as x:
        return _screen_and_fit(store, run, embed, config, started, item_ids, hashes, x)


def _screen_and_fit(
    store: ArtifactStore,
    run: RunInfo,
    embed: StageOutcome,
    config: TokenizerConfig,
    started: float,
    item_ids: pa.ChunkedArray,
    hashes: pa.ChunkedArray,
    x: SpilledRows,
) -> FitOutcome:
    parts = [embedding_norms(block) for block in x.chunks()] or [(np.zeros(0, bool), np.zeros(0))]
    finite, norms = (np.concatenate(part) for part in zip(*parts, strict=True))
    keep, rejects = screen_norms(finite, norms)
    rejected = item_ids.take(pa.array([row for row, _ in rejects], pa.int64())).to_pylist()
    reasons = [
        (item_id, f"fit: {why}") for item_id, (_, why) in zip(rejected, rejects, strict=True)
    ]
    errors = write_errors(store, run, "fit", reasons)
    registry = read_registry(store, run.catalog)
    pinned = registry.version(registry.pinned) if registry.pinned else None

    if pinned is not None and not config.refit:
        stats = StageStats(
            cached=len(keep), failed=len(rejects), seconds=time.perf_counter() - started
        )
        # The pinned tokenizer's sizing note stays true for as long as it is pinned.
        sizing = store.read_json(*tokenizer_dir(pinned.tokenizer_id), TOKENIZER_CONFIG).get(
            "sizing_message"
        )
        return _pinned_outcome(
            pinned, embed, config, errors=errors, stats=stats, sizing_message=sizing
        )

    fitted = fit_and_store(
        store,
        x.subset(keep),
        config,
        embed=embed.model | {"key": embed.key},
        data_hash=hash_strings(_rows(hashes, keep)),
        trained_on={"run_id": run.run_id, "catalog": run.catalog},
    )
    seconds = time.perf_counter() - started
    done = {"computed" if fitted.trained else "cached": len(keep)}
    parent = pinned.tokenizer_id if pinned is not None else None
    if parent == fitted.tokenizer_id:
        log.info(
            "fit: refit asked, but settings and embeddings are unchanged: it reproduced the "
            "pinned tokenizer %s",
            parent,
        )
    return FitOutcome(
        stage="fit",
        key=fitted.tokenizer_id,
        errors=errors,
        stats=StageStats(**done, failed=len(rejects), seconds=seconds),
        tokenizer_id=fitted.tokenizer_id,
        method=config.method,
        codebook_sizes=fitted.codebook_sizes,
        sizing_message=fitted.sizing_message,
        fitted=True,
        embed_key=embed.key,
        parent=parent,
        unchanged=parent == fitted.tokenizer_id,
        model={
            "name": config.method,
            "tokenizer_id": fitted.tokenizer_id,
            "codebook_sizes": fitted.codebook_sizes,
            "requested_codebook_sizes": list(config.codebook_sizes),
            "sizing_message": fitted.sizing_message,
            "parent": parent,
            "pinned": True,
        },
    )


def _rows(column: pa.ChunkedArray, rows: np.ndarray, block: int = 1 << 16) -> Iterator[str]:
    """`column[rows]` (`rows` ascending) as Python strings, a block at a time from each chunk in
    place: never a list of them all, nor a copy of the column."""
    offset = 0
    for chunk in column.chunks:
        first, end = np.searchsorted(rows, [offset, offset + len(chunk)])
        for start in range(first, end, block):
            picked = rows[start : min(end, start + block)] - offset
            yield from chunk.take(pa.array(picked)).to_pylist()
        offset += len(chunk)


@task(name="fit", **TASK_OPTIONS)
def fit_task(
    store: ArtifactStore, config: PipelineConfig, run: RunInfo, embed: StageOutcome
) -> FitOutcome:
    return fit_stage(store, run, embed, config.tokenizer)
