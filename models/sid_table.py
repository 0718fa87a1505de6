"""A SID table from code tuples: collision suffixes, stable SIDs, reassignment, drift, quality.

Rules, against the catalog's last published SID table (`previous`):
- an item with the same tokenizer and the same content (`item_hash`) keeps its row exactly:
  codes, suffix and `first_assigned` are copied, never re-derived;
- a new or changed item keeps its old suffix and date if its codes came out unchanged, otherwise
  it takes the smallest free suffix of its code tuple;
- with collision handling `reassign`, of the new items that would share a tuple the one that
  would lose most by moving keeps it (none, if a kept item holds it); the others, tuple by tuple
  in item_id order, take their lowest-error free tuple among their nearby ones (the last two levels
  re-searched, the levels above kept) if it costs them at most `max_loss` more squared error (as
  a share of the item's squared norm); an item gets a suffix if no free tuple is that close;
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

# (rows, count) -> each row's `count` nearest tuples [len(rows), count, L] and their errors
# [len(rows), count], lowest first (a tokenizer's `nearby_tuples` on those rows' embeddings)
Nearby = Callable[[list[int], int], tuple[np.ndarray, np.ndarray]]


def assign_sids(
    item_ids: list[str],
    codes: np.ndarray,
    tokenizer_id: str,
    run_date: date,
    item_hashes: list[str] | None = None,
    previous: pa.Table | None = None,
    nearby: Nearby | None = None,
    max_loss: float | None = None,
) -> tuple[pa.Table, dict]:
    """The SID table for items with code tuples [N, L], and collision stats.

    `previous` is the last published table; `nearby(rows, count)` (reassign mode) returns, for
    those rows, their `count` nearest tuples [len(rows), count, L] and reconstruction errors
    [len(rows), count], lowest first (a tokenizer's `nearby_tuples`); a move may add at most
    `max_loss` to an item's error (None: any move to a free tuple).
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

    reassigned, declined = 0, 0
    if nearby is not None and newcomers:
        held = {t for t, s in taken.items() if s}
        reassigned, declined = reassign(codes, newcomers, held, nearby, max_loss)
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
        "reassign_declined": declined,
    }


def reassign(
    codes: np.ndarray,
    newcomers: list[int],
    held: set[tuple[int, ...]],
    nearby: Nearby,
    max_loss: float | None = None,
    batch_rows: int = 2048,
    counts: tuple[int, int] = (32, 4096),
) -> tuple[int, int]:
    """Move newcomers (in place) off tuples another item keeps, each to its lowest-error free
    tuple from `nearby` if that adds at most `max_loss` to its error; returns how many moved and
    how many stay on a shared tuple (their nearest free tuple costs more, or none is free among
    their `counts[1]` nearest). Of the newcomers sharing a tuple that no `held` (kept) item
    holds, the one that loses most by moving stays. Tuples are settled one at a time in
    `newcomers`' order, from each item's `counts[0]` nearest tuples, then, for the few with none
    of those free, from its `counts[1]` nearest."""
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, t in zip(newcomers, map(tuple, codes[newcomers].tolist()), strict=True):
        groups[t].append(i)
    crowded = [(t, m) for t, m in groups.items() if len(m) > 1 or t in held]
    occupied = held | set(groups)
    limit = np.inf if max_loss is None else max_loss
    moved, declined, stuck = 0, 0, []

    def settle(i: int, tuples: np.ndarray, errors: np.ndarray) -> bool | None:
        """Move item i to its first free tuple if that is close enough: True moved, False
        declined (too far), None (none of these tuples is free)."""
        own = _own_error(tuples, errors, tuple(codes[i].tolist())) if max_loss is not None else 0
        for t, error in zip(map(tuple, tuples.tolist()), errors.tolist(), strict=True):
            if t not in occupied:
                if error - own > limit:
                    return False
                codes[i] = t
                occupied.add(t)
                return True
        return None

    for batch in _whole_groups(crowded, batch_rows):
        rows = [i for _, members in batch for i in members]
        tuples, errors = nearby(rows, counts[0])
        at = {i: k for k, i in enumerate(rows)}
        for t, members in batch:
            stays = None
            if t not in held:
                stays = max(members, key=lambda i: _loss_by_moving(tuples[at[i]], errors[at[i]], t))
            for i in members:
                if i == stays:
                    continue
                done = settle(i, tuples[at[i]], errors[at[i]])
                if done is None:
                    stuck.append(i)
                moved, declined = moved + (done is True), declined + (done is False)
    for start in range(0, len(stuck), 64):
        rows = stuck[start : start + 64]
        tuples, errors = nearby(rows, counts[1])
        for k, i in enumerate(rows):
            done = settle(i, tuples[k], errors[k])
            moved, declined = moved + (done is True), declined + (done is not True)
    return moved, declined


def _whole_groups(groups: list, rows: int):
    """`groups` ((tuple, members) pairs) in runs of about `rows` members, never split."""
    batch, size = [], 0
    for group in groups:
        batch.append(group)
        size += len(group[1])
        if size >= rows:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _own_error(tuples: np.ndarray, errors: np.ndarray, own: tuple[int, ...]) -> float:
    """An item's error on its own tuple (`tuples`, `errors`: its nearby tuples, lowest error
    first; its own is taken as the best if not among them)."""
    mine = (tuples == np.asarray(own)).all(axis=1)
    return float(errors[mine][0] if mine.any() else errors[0])


def _loss_by_moving(tuples: np.ndarray, errors: np.ndarray, own: tuple[int, ...]) -> float:
    """How much more error an item's best other tuple has than its own."""
    mine = (tuples == np.asarray(own)).all(axis=1)
    if mine.all():
        return np.inf
    return float(errors[~mine].min() - _own_error(tuples, errors, own))


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
            "reassign_declined": stats["reassign_declined"],
        },
        "max_suffix": int(suffixes.max()) if len(suffixes) else 0,
        "items_with_suffix": int((suffixes > 0).sum()),
        "reconstruction_cosine_by_depth": tokenizer.reconstruction_cosine_by_depth(x),
        # Of the codes items were actually given (after any reassignment):
        "reconstruction_cosine": reconstruction_cosine(tokenizer, x, final_codes),
    }
    return final_codes, quality
