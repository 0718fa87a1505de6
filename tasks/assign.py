"""assign: encode every item with the tokenizer, resolve collisions, build the SID table.

Items whose code tuples collide are told apart by a suffix token (TIGER's extra digit). Suffixes
are stable: an item that had a SID from the same tokenizer with the same codes in the previous
published run keeps its suffix and `first_assigned` date; newcomers take the smallest free suffix
of their tuple, in item_id order.
"""

from __future__ import annotations

import itertools
import time
from collections import defaultdict
from datetime import date

import numpy as np
import pyarrow as pa
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from sidpipe.config import PipelineConfig
from sidpipe.models.sids import (
    codebook_tokens,
    quality_markdown,
    sid_quality,
    sid_string,
    suffix_tokens,
)
from sidpipe.storage.manifest import StageStats, latest_published, staging_dir
from sidpipe.storage.store import ArtifactStore
from sidpipe.tasks.embed import load_embeddings
from sidpipe.tasks.fit import FitOutcome, load_tokenizer
from sidpipe.tasks.stage import TASK_OPTIONS, RunInfo, StageOutcome, read_items

SIDS_FILE = "sids.parquet"
QUALITY_FILE = "quality.json"
TOKENS_FILE = "tokens.txt"

SID_SCHEMA = pa.schema(
    [
        ("item_id", pa.string()),
        ("codes", pa.list_(pa.int32())),
        ("suffix", pa.int32()),
        ("sid", pa.string()),
        ("tokenizer_id", pa.string()),
        ("first_assigned", pa.date32()),
        ("item_hash", pa.string()),
    ]
)


def assign_sids(
    item_ids: list[str],
    codes: np.ndarray,
    tokenizer_id: str,
    run_date: date,
    item_hashes: list[str] | None = None,
    previous: pa.Table | None = None,
) -> pa.Table:
    """The SID table for items with code tuples [N, L]; `previous` is the last published table."""
    prev: dict[str, tuple[tuple[int, ...], int, date]] = {}
    if previous is not None:
        for row in previous.select(
            ["item_id", "codes", "suffix", "tokenizer_id", "first_assigned"]
        ).to_pylist():
            if row["tokenizer_id"] == tokenizer_id:
                prev[row["item_id"]] = (tuple(row["codes"]), row["suffix"], row["first_assigned"])

    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    tuples = [tuple(int(c) for c in row) for row in codes]
    for i, t in enumerate(tuples):
        groups[t].append(i)

    suffix = np.zeros(len(item_ids), dtype=np.int32)
    first = [run_date] * len(item_ids)
    for t, members in groups.items():
        taken: set[int] = set()
        newcomers = []
        for i in members:
            old = prev.get(item_ids[i])
            if old is not None and old[0] == t and old[1] not in taken:
                suffix[i], first[i] = old[1], old[2]
                taken.add(old[1])
            else:
                newcomers.append(i)
        free = (s for s in itertools.count() if s not in taken)
        for i in sorted(newcomers, key=lambda j: item_ids[j]):
            suffix[i] = next(free)

    return pa.table(
        {
            "item_id": pa.array(item_ids, pa.string()),
            "codes": pa.array([list(t) for t in tuples], pa.list_(pa.int32())),
            "suffix": pa.array(suffix, pa.int32()),
            "sid": pa.array(
                [sid_string(list(t), int(s)) for t, s in zip(tuples, suffix, strict=True)],
                pa.string(),
            ),
            "tokenizer_id": pa.array([tokenizer_id] * len(item_ids), pa.string()),
            "first_assigned": pa.array(first, pa.date32()),
            "item_hash": pa.array(item_hashes or [None] * len(item_ids), pa.string()),
        },
        schema=SID_SCHEMA,
    )


class AssignOutcome(StageOutcome):
    assigned: int = 0
    quality: dict = {}


def assign_stage(
    store: ArtifactStore, run: RunInfo, items: pa.Table, embed: StageOutcome, fit: FitOutcome
) -> AssignOutcome:
    started = time.perf_counter()
    item_ids, _, x = load_embeddings(store, run, embed)
    model, _ = load_tokenizer(store, fit.tokenizer_id)
    codes = model.encode(x)
    previous_run = latest_published(store, run.catalog, not_after=run.run_date)
    previous = None
    if previous_run is not None and "sids" in previous_run.files:
        previous = store.read_parquet(previous_run.files["sids"].path)
    hashes = dict(zip(items["item_id"].to_pylist(), items["item_hash"].to_pylist(), strict=True))
    table = assign_sids(
        item_ids, codes, fit.tokenizer_id, run.run_date, [hashes[i] for i in item_ids], previous
    )

    quality = sid_quality(codes, fit.codebook_sizes)
    suffixes = table["suffix"].to_numpy()
    quality |= {
        "tokenizer_id": fit.tokenizer_id,
        "codebook_sizes": fit.codebook_sizes,
        "max_suffix": int(suffixes.max()) if len(suffixes) else 0,
        "items_with_suffix": int((suffixes > 0).sum()),
        "reconstruction_cosine_by_depth": model.reconstruction_cosine_by_depth(x),
        "sizing_message": fit.sizing_message,
    }
    staging = staging_dir(run.run_id)
    store.write_parquet(table, *staging, SIDS_FILE)
    store.write_json(quality, *staging, QUALITY_FILE)
    tokens = codebook_tokens(fit.codebook_sizes) + suffix_tokens(
        len(fit.codebook_sizes), quality["max_suffix"]
    )
    store.write_text("\n".join(tokens) + "\n", *staging, TOKENS_FILE)
    return AssignOutcome(
        stage="assign",
        key=fit.tokenizer_id,
        index=SIDS_FILE,
        stats=StageStats(computed=table.num_rows, seconds=time.perf_counter() - started),
        assigned=table.num_rows,
        quality=quality,
    )


@task(name="assign", **TASK_OPTIONS)
def assign_task(
    config: PipelineConfig, run: RunInfo, embed: StageOutcome, fit: FitOutcome
) -> AssignOutcome:
    store = ArtifactStore(config.store)
    outcome = assign_stage(store, run, read_items(store, run), embed, fit)
    create_markdown_artifact(
        quality_markdown(outcome.quality), key="sid-quality", description="SID quality of this run"
    )
    get_run_logger().info(
        "assign: %d SIDs, %.1f%% distinct code tuples",
        outcome.assigned,
        100 * outcome.quality["distinct_tuple_rate"],
    )
    return outcome
