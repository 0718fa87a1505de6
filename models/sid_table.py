"""A SID table from code tuples: collision suffixes, stable SIDs, reassignment, drift, quality.

Rules, against the catalog's last published SID table (`previous`):
- an item with the same tokenizer and the same content (`item_hash`) keeps its row exactly:
  codes, suffix and `first_assigned` are copied, never re-derived;
- a new or changed item keeps its old suffix and date if its codes came out unchanged, otherwise
  it takes the smallest free suffix of its code tuple;
- with collision handling `reassign`, a new item that would collide first moves to the nearest
  last-level code whose tuple is still free (capacity 1), and gets a suffix only if none is;
- after a refit (another tokenizer than the previous table's) every item is encoded afresh, and
  `drift_report` says which share of items changed SID, per level.

Pure: arrays and Arrow tables in, tables and dicts out.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Callable
from datetime import date

import numpy as np
import pyarrow as pa

from sidpipe.models.sids import sid_quality, sid_string
from sidpipe.models.tokenizer import reconstruction_cosine
from sidpipe.storage.layout import SID_SCHEMA


def assign_sids(
    item_ids: list[str],
    codes: np.ndarray,
    tokenizer_id: str,
    run_date: date,
    item_hashes: list[str] | None = None,
    previous: pa.Table | None = None,
    last_level_ranking: Callable[[list[int]], np.ndarray] | None = None,
) -> tuple[pa.Table, dict]:
    """The SID table for items with code tuples [N, L], and collision stats.

    `previous` is the last published table; `last_level_ranking(rows)` (reassign mode) returns,
    for those rows, their last-level codes from nearest to farthest.
    """
    hashes = item_hashes or [None] * len(item_ids)
    prev: dict[str, dict] = {}
    if previous is not None:
        for row in previous.to_pylist():
            if row["tokenizer_id"] == tokenizer_id:
                prev[row["item_id"]] = row

    codes = np.array(codes, dtype=np.int32, copy=True)
    kept_exactly = np.zeros(len(item_ids), dtype=bool)
    for i, item_id in enumerate(item_ids):
        old = prev.get(item_id)
        if old is not None and hashes[i] is not None and old["item_hash"] == hashes[i]:
            codes[i] = old["codes"]  # unchanged item: its SID is copied, not re-derived
            kept_exactly[i] = True
    raw_codes = codes.copy()

    suffix = np.zeros(len(item_ids), dtype=np.int32)
    first = [run_date] * len(item_ids)
    taken: dict[tuple[int, ...], set[int]] = defaultdict(set)
    newcomers: list[int] = []
    for i, item_id in enumerate(item_ids):
        old = prev.get(item_id)
        t = tuple(codes[i].tolist())
        if old is not None and tuple(old["codes"]) == t and old["suffix"] not in taken[t]:
            suffix[i], first[i] = old["suffix"], old["first_assigned"]
            taken[t].add(old["suffix"])
        else:
            newcomers.append(i)
    newcomers.sort(key=lambda j: item_ids[j])

    reassigned = 0
    if last_level_ranking is not None and newcomers:
        # Capacity 1 per tuple: a newcomer whose tuple is occupied moves to the nearest free
        # last-level code under the same prefix.
        occupied = {t for t, s in taken.items() if s}
        crowded = []
        for i in newcomers:
            t = tuple(codes[i].tolist())
            if t in occupied:
                crowded.append(i)
            else:
                occupied.add(t)
        if crowded:
            ranking = last_level_ranking(crowded)
            for row, i in enumerate(crowded):
                prefix = tuple(codes[i, :-1].tolist())
                for code in ranking[row]:
                    if prefix + (int(code),) not in occupied:
                        codes[i, -1] = int(code)
                        occupied.add(prefix + (int(code),))
                        reassigned += 1
                        break
    for i in newcomers:
        t = tuple(codes[i].tolist())
        free = next(s for s in itertools.count() if s not in taken[t])
        suffix[i] = free
        taken[t].add(free)

    table = pa.table(
        {
            "item_id": pa.array(item_ids, pa.string()),
            "codes": pa.array(codes.tolist(), pa.list_(pa.int32())),
            "suffix": pa.array(suffix, pa.int32()),
            "sid": pa.array(
                [sid_string(c, int(s)) for c, s in zip(codes.tolist(), suffix, strict=True)],
                pa.string(),
            ),
            "tokenizer_id": pa.array([tokenizer_id] * len(item_ids), pa.string()),
            "first_assigned": pa.array(first, pa.date32()),
            "item_hash": pa.array(hashes, pa.string()),
        },
        schema=SID_SCHEMA,
    )
    return table, {
        "raw_codes": raw_codes,
        "kept_exactly": int(kept_exactly.sum()),
        "encoded": int((~kept_exactly).sum()),
        "reassigned": reassigned,
    }


def drift_report(previous: pa.Table, current: pa.Table) -> dict:
    """Share of items (present in both tables) whose SID changed, overall and per level."""
    old = {r["item_id"]: r for r in previous.select(["item_id", "codes", "sid"]).to_pylist()}
    rows = [
        (old[r["item_id"]], r)
        for r in current.select(["item_id", "codes", "sid"]).to_pylist()
        if r["item_id"] in old
    ]
    n = len(rows)
    levels = max((len(r["codes"]) for _, r in rows), default=0)
    per_level = [
        sum(
            1 for o, r in rows if level >= len(o["codes"]) or o["codes"][level] != r["codes"][level]
        )
        / n
        if n
        else 0.0
        for level in range(levels)
    ]
    return {
        "from_tokenizer": previous["tokenizer_id"][0].as_py() if previous.num_rows else None,
        "to_tokenizer": current["tokenizer_id"][0].as_py() if current.num_rows else None,
        "items_compared": n,
        "sid_changed": sum(1 for o, r in rows if o["sid"] != r["sid"]) / n if n else 0.0,
        "code_changed_per_level": per_level,
    }


def table_quality(
    table: pa.Table, stats: dict, tokenizer, x: np.ndarray, codebook_sizes: list[int], mode: str
) -> tuple[np.ndarray, dict]:
    """The final code matrix and the quality report of a SID table, with the collision picture
    before (the tokenizer's raw codes) and after (the codes items were given)."""
    final_codes = np.asarray(table["codes"].to_pylist(), dtype=np.int32).reshape(
        table.num_rows, len(codebook_sizes)
    )
    quality = sid_quality(final_codes, codebook_sizes)
    before = sid_quality(stats["raw_codes"], codebook_sizes)
    suffixes = table["suffix"].to_numpy()
    quality |= {
        "codebook_sizes": codebook_sizes,
        "collisions": {
            "mode": mode,
            "before": {
                k: before[k]
                for k in ("distinct_tuple_rate", "unique_item_rate", "max_bucket", "bucket_gini")
            },
            "reassigned": stats["reassigned"],
        },
        "max_suffix": int(suffixes.max()) if len(suffixes) else 0,
        "items_with_suffix": int((suffixes > 0).sum()),
        "reconstruction_cosine_by_depth": tokenizer.reconstruction_cosine_by_depth(x),
        # Of the codes items were actually given (after any reassignment):
        "reconstruction_cosine": reconstruction_cosine(tokenizer, x, final_codes),
    }
    return final_codes, quality
