"""encode: the codes of one shard of the run's embedded items, with the fit's tokenizer.

The heavy half of assignment, mapped over shards so it spreads over the run's task runner
(thread, process, Dask or Ray workers): a shard reads only its own rows (item_id order,
`orchestration.shard_size` of them), encodes them and stages (item_id, codes) for `assign`.
A tokenizer's codes are a per-item function of the embedding (a balanced tokenizer's prices are
fitted once, not per batch), so any runner gives the same codes for the same shards. Another
shard size can flip a float32 near-tie between two codewords (faiss's distance computation
depends on the size of a search and a row's place in it); an unchanged item keeps its published
codes whatever its shard (`models.sid_table`).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from prefect import task

from sidpipe.config import PipelineConfig
from sidpipe.models.sid_table import code_matrix
from sidpipe.storage.layout import staging_dir
from sidpipe.storage.store import ArtifactStore
from sidpipe.tasks.fitting import encode, load_tokenizer
from sidpipe.tasks.stage import (
    TASK_OPTIONS,
    FitOutcome,
    RunInfo,
    StageOutcome,
    failed_items,
    stage_matrix,
)


def encode_shard_stage(
    store: ArtifactStore,
    run: RunInfo,
    embed: StageOutcome,
    fit: FitOutcome,
    shard: int,
    shard_size: int,
) -> str:
    """Encode shard `shard` of the embedded items; returns the staged file's name."""
    rows = slice(shard * shard_size, (shard + 1) * shard_size)
    item_ids, _, x = stage_matrix(store, run, embed, "embedding", rows)
    rejected = failed_items(store, run, [fit])  # vectors the fit set aside (NaN, zero, huge)
    if rejected:
        keep = [i for i, item_id in enumerate(item_ids) if item_id not in rejected]
        item_ids, x = [item_ids[i] for i in keep], x[keep]
    levels = len(fit.codebook_sizes)
    codes = np.zeros((0, levels), np.int32)
    if item_ids:
        tokenizer, _ = load_tokenizer(store, fit.tokenizer_id)
        codes = encode(tokenizer, x, f"encode: shard {shard}")
    values = pa.array(np.ascontiguousarray(codes, np.int32).ravel())
    table = pa.table(
        {
            "item_id": pa.array(item_ids, pa.string()),
            "codes": pa.FixedSizeListArray.from_arrays(values, levels),
        }
    )
    name = f"codes-{shard:05d}.parquet"
    store.write_parquet(table, *staging_dir(run.run_id), name)
    return name


def read_codes(
    store: ArtifactStore, run: RunInfo, names: list[str]
) -> tuple[pa.ChunkedArray, np.ndarray]:
    """(item_ids, codes [N, L]) of the staged shards, in shard order."""
    tables = [store.read_parquet(*staging_dir(run.run_id), name) for name in names]
    table = pa.concat_tables(tables)
    levels = table.schema.field("codes").type.list_size
    codes = code_matrix(table["codes"], levels)
    return table["item_id"], codes


@task(name="encode", **TASK_OPTIONS)
def encode_task(
    store: ArtifactStore,
    config: PipelineConfig,
    run: RunInfo,
    embed: StageOutcome,
    fit: FitOutcome,
    shard: int,
) -> str:
    return encode_shard_stage(store, run, embed, fit, shard, config.orchestration.shard_size)
