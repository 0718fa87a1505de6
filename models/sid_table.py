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
from dataclasses import dataclass
from datetime import date

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sidpipe.models.sids import sid_quality, sid_strings
from sidpipe.models.tokenizer import reconstruction_cosine
from sidpipe.storage.layout import SID_SCHEMA

# (rows, count) -> each row's `count` nearest tuples [len(rows), count, L] and their errors
# [len(rows), count], lowest first (a tokenizer's `nearby_tuples` on those rows' embeddings)
Nearby = Callable[[list[int], int], tuple[np.ndarray, np.ndarray]]
CHUNK_ROWS = 1 << 20  # rows of a chunk of the table's codes and sid columns


def assign_sids(
    item_ids: list[str] | pa.Array,
    codes: np.ndarray,
    tokenizer_id: str,
    run_date: date,
    item_hashes: list[str | None] | pa.Array | None = None,
    previous: pa.Table | None = None,
    nearby: Nearby | None = None,
    max_loss: float | None = None,
) -> tuple[pa.Table, dict]:
    """The SID table for items with code tuples [N, L], and collision stats.

    `previous` is the last published table; `nearby(rows, count)` (reassign mode) returns, for
    those rows, their `count` nearest tuples [len(rows), count, L] and reconstruction errors
    [len(rows), count], lowest first (a tokenizer's `nearby_tuples`); a move may add at most
    `max_loss` to an item's error (None: any move to a free tuple). Columnar throughout (Arrow
    and numpy, no row objects), so a nightly run over millions of items stays small.
    """
    ids = pa.array(item_ids, pa.string())
    n = len(ids)
    hashes = pa.array(item_hashes if item_hashes is not None else [None] * n, pa.string())
    codes = np.array(codes, dtype=np.int32, copy=True)
    old = _previous_rows(previous, tokenizer_id, ids, codes.shape[1])

    # An unchanged item (same tokenizer, same content) keeps its codes: copied, not re-derived.
    kept_exactly = old.found & pc.fill_null(pc.equal(old.hashes, hashes), False).to_numpy(
        zero_copy_only=False
    )
    codes[kept_exactly] = old.codes[kept_exactly]
    raw_codes = codes.copy()

    # An item whose codes came out as before keeps its suffix and date, unless an earlier item
    # (input order) already holds that suffix of the tuple.
    same = np.flatnonzero(old.found & (old.codes == codes).all(axis=1))
    key = np.column_stack([codes[same], old.suffix[same]])
    keepers = same[np.sort(np.unique(key, axis=0, return_index=True)[1])] if len(same) else same
    kept = np.zeros(n, dtype=bool)
    kept[keepers] = True
    suffix = np.where(kept, old.suffix, 0).astype(np.int32)
    by_id = np.asarray(pc.sort_indices(ids), dtype=np.int64)
    newcomers = by_id[~kept[by_id]]  # in item_id order

    reassigned, declined = 0, 0
    if nearby is not None and len(newcomers):
        reassigned, declined = reassign(codes, newcomers, codes[keepers], nearby, max_loss)
    suffix[newcomers] = _free_suffixes(codes, kept, newcomers, suffix)

    run_day = pa.scalar(run_date, pa.date32())
    table = pa.table(
        {
            "item_id": ids,
            "codes": _in_chunks(codes, suffix, _code_lists, pa.list_(pa.int32())),
            "suffix": pa.array(suffix, pa.int32()),
            "sid": _in_chunks(codes, suffix, sid_strings, pa.string()),
            "tokenizer_id": pa.repeat(pa.scalar(tokenizer_id, pa.string()), n),
            "first_assigned": pc.if_else(pa.array(kept), old.first_assigned, run_day),
            "item_hash": hashes,
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


def _in_chunks(codes: np.ndarray, suffix: np.ndarray, build, kind: pa.DataType):
    """`build(codes, suffix)` a CHUNK_ROWS block at a time, as one chunked column: an Arrow
    array's 32-bit offsets hold 2 GiB of strings, about 80M SIDs."""
    blocks = range(0, len(codes), CHUNK_ROWS)
    parts = [build(codes[i : i + CHUNK_ROWS], suffix[i : i + CHUNK_ROWS]) for i in blocks]
    return pa.chunked_array(parts, kind)


def _code_lists(codes: np.ndarray, _suffix: np.ndarray) -> pa.Array:
    offsets = pa.array(np.arange(len(codes) + 1) * codes.shape[1], pa.int32())
    return pa.ListArray.from_arrays(offsets, pa.array(codes.ravel(), pa.int32()))


@dataclass
class _Previous:
    """The previous table's row of each current item, aligned with the items (`found` False
    where the item had none under this tokenizer)."""

    found: np.ndarray  # [N] bool
    codes: np.ndarray  # [N, L] int32 (0 where not found)
    suffix: np.ndarray  # [N] int32
    hashes: pa.Array  # [N] string (null where not found)
    first_assigned: pa.Array  # [N] date32


def _previous_rows(
    previous: pa.Table | None, tokenizer_id: str, ids: pa.Array, levels: int
) -> _Previous:
    n = len(ids)
    prev = previous
    if prev is not None:
        prev = prev.filter(
            pc.and_(
                pc.equal(prev["tokenizer_id"], tokenizer_id),
                pc.equal(pc.list_value_length(prev["codes"]), levels),
            )
        )
    if prev is None or prev.num_rows == 0:
        return _Previous(
            np.zeros(n, bool),
            np.zeros((n, levels), np.int32),
            np.zeros(n, np.int32),
            pa.nulls(n, pa.string()),
            pa.nulls(n, pa.date32()),
        )
    position = pc.index_in(ids, value_set=prev["item_id"])  # item ids are unique in a table
    found = position.is_valid().to_numpy(zero_copy_only=False)
    take = np.asarray(pc.fill_null(position, 0))
    old_codes = code_matrix(prev["codes"], levels)[take]
    old_suffix = prev["suffix"].to_numpy(zero_copy_only=False).astype(np.int32)[take]
    return _Previous(
        found,
        np.where(found[:, None], old_codes, 0).astype(np.int32),
        np.where(found, old_suffix, 0).astype(np.int32),
        pc.take(prev["item_hash"], position),
        pc.take(prev["first_assigned"], position),
    )


def _free_suffixes(
    codes: np.ndarray, kept: np.ndarray, newcomers: np.ndarray, suffix: np.ndarray
) -> np.ndarray:
    """The suffix of each newcomer (in `newcomers`' order): the smallest one of its tuple that
    no kept item and no earlier newcomer holds."""
    if len(newcomers) == 0:
        return np.zeros(0, np.int32)
    _, group = np.unique(codes, axis=0, return_inverse=True)
    group = group.ravel()
    mine = group[newcomers]
    order = np.argsort(mine, kind="stable")  # by tuple, then in newcomers' order
    ordered = mine[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    rank = np.arange(len(ordered)) - np.repeat(starts, np.diff(np.r_[starts, len(ordered)]))
    out = np.empty(len(newcomers), np.int32)
    out[order] = rank  # a tuple no kept item holds: 0, 1, 2, ... in order
    shared = np.isin(mine, group[kept])
    if shared.any():  # tuples kept items hold: skip their suffixes
        taken: dict[int, set[int]] = defaultdict(set)
        keep_rows = np.flatnonzero(kept & np.isin(group, mine[shared]))
        for g, s in zip(group[keep_rows].tolist(), suffix[keep_rows].tolist(), strict=True):
            taken[g].add(s)
        for j in np.flatnonzero(shared).tolist():
            held = taken[int(mine[j])]
            free = next(s for s in itertools.count() if s not in held)
            out[j] = free
            held.add(free)
    return out


def reassign(
    codes: np.ndarray,
    newcomers: np.ndarray,
    held: np.ndarray,
    nearby: Nearby,
    max_loss: float | None = None,
    batch_rows: int = 2048,
    counts: tuple[int, int] = (32, 4096),
) -> tuple[int, int]:
    """Move newcomers (in place) off tuples another item keeps, each to its lowest-error free
    tuple from `nearby` if that adds at most `max_loss` to its error; returns how many moved and
    how many stay on a shared tuple (their nearest free tuple costs more, or none is free among
    their `counts[1]` nearest). Of the newcomers sharing a tuple that no `held` (the kept items'
    tuples, [M, L]) holds, the one that loses most by moving stays. Tuples are settled one at a
    time in order of their first newcomer, from each item's `counts[0]` nearest tuples, then,
    for the few with none of those free, from its `counts[1]` nearest. Tuples are held as
    sorted arrays of packed rows, not Python objects: a few bytes an item, at any size."""
    newcomers = np.asarray(newcomers, np.int64)
    held_keys = np.unique(_keys(held))
    tuple_keys, first, group, size = np.unique(
        _keys(codes[newcomers]), return_index=True, return_inverse=True, return_counts=True
    )
    members = np.argsort(group, kind="stable")  # newcomers' positions by tuple, in their order
    starts = np.r_[0, np.cumsum(size)[:-1]]
    is_held = _isin(tuple_keys, held_keys)
    crowded = [g for g in np.argsort(first, kind="stable").tolist() if size[g] > 1 or is_held[g]]
    taken, added = np.union1d(held_keys, tuple_keys), set()  # occupied: taken, or added by moves
    limit = np.inf if max_loss is None else max_loss
    moved, declined, stuck = 0, 0, []

    def settle(i: int, tuples: np.ndarray, errors: np.ndarray) -> bool | None:
        """Move item i to its first free tuple if that is close enough: True moved, False
        declined (too far), None (none of these tuples is free)."""
        own = _own_error(tuples, errors, codes[i]) if max_loss is not None else 0
        keys = _keys(tuples)
        free = ~_isin(keys, taken)
        for k in np.flatnonzero(free).tolist():
            if keys[k].tobytes() in added:
                continue
            if errors[k] - own > limit:
                return False
            codes[i] = tuples[k]
            added.add(keys[k].tobytes())
            return True
        return None

    batches = _whole_groups([(g, int(size[g])) for g in crowded], batch_rows)
    for batch in batches:
        groups = [newcomers[members[starts[g] : starts[g] + size[g]]] for g in batch]
        rows = np.concatenate(groups).tolist()
        tuples, errors = nearby(rows, counts[0])
        at = {i: k for k, i in enumerate(rows)}
        for g, items in zip(batch, groups, strict=True):
            stays = None
            if not is_held[g]:
                own = codes[items[0]].copy()
                stays = max(
                    items.tolist(), key=lambda i: _loss_by_moving(tuples[at[i]], errors[at[i]], own)
                )
            for i in items.tolist():
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


def _keys(rows: np.ndarray) -> np.ndarray:
    """Each row of an int [..., L] array as one packed, sortable value (a tuple's key)."""
    rows = np.ascontiguousarray(rows, np.int32)
    return rows.reshape(-1, rows.shape[-1]).view(np.dtype((np.void, 4 * rows.shape[-1]))).ravel()


def _isin(keys: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    """Which `keys` are in `sorted_keys` (sorted, unique)."""
    if len(sorted_keys) == 0:
        return np.zeros(len(keys), bool)
    at = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return sorted_keys[at] == keys


def _whole_groups(groups: list, rows: int):
    """The first items of `groups` ((group, size) pairs) in runs of about `rows` members, never
    split."""
    batch, total = [], 0
    for group, size in groups:
        batch.append(group)
        total += size
        if total >= rows:
            yield batch
            batch, total = [], 0
    if batch:
        yield batch


def _own_error(tuples: np.ndarray, errors: np.ndarray, own: np.ndarray) -> float:
    """An item's error on its own tuple (`tuples`, `errors`: its nearby tuples, lowest error
    first; its own is taken as the best if not among them)."""
    mine = (tuples == np.asarray(own)).all(axis=1)
    return float(errors[mine][0] if mine.any() else errors[0])


def _loss_by_moving(tuples: np.ndarray, errors: np.ndarray, own: np.ndarray) -> float:
    """How much more error an item's best other tuple has than its own."""
    mine = (tuples == np.asarray(own)).all(axis=1)
    if mine.all():
        return np.inf
    return float(errors[~mine].min() - _own_error(tuples, errors, own))


def drift_report(previous: pa.Table, current: pa.Table) -> dict:
    """Share of items (present in both tables) whose SID changed, overall and per level (a level
    an item's old codes lack counts as changed)."""
    position = pc.index_in(current["item_id"], value_set=previous["item_id"])
    both = np.flatnonzero(position.is_valid().to_numpy(zero_copy_only=False))
    rows = position.to_numpy(zero_copy_only=False)[both].astype(np.int64)  # previous's rows
    n = len(rows)
    new_codes = _padded(current["codes"], both)
    old_codes = _padded(previous["codes"], rows, width=new_codes.shape[1])
    sid_changed = pc.not_equal(pc.take(previous["sid"], rows), pc.take(current["sid"], both))
    return {
        "from_tokenizer": previous["tokenizer_id"][0].as_py() if previous.num_rows else None,
        "to_tokenizer": current["tokenizer_id"][0].as_py() if current.num_rows else None,
        "items_compared": n,
        "sid_changed": pc.sum(sid_changed).as_py() / n if n else 0.0,
        "code_changed_per_level": [float(c) for c in (old_codes != new_codes).mean(axis=0)]
        if n
        else [],
    }


def code_matrix(codes: pa.ChunkedArray | pa.Array, levels: int) -> np.ndarray:
    """A `codes` column of `levels` codes a row as an [N, levels] int32 matrix."""
    flat = pc.list_flatten(codes).to_numpy(zero_copy_only=False)
    return flat.astype(np.int32).reshape(len(codes), levels)


def _padded(codes: pa.ChunkedArray, rows: np.ndarray, width: int | None = None) -> np.ndarray:
    """The codes of these rows as an [len(rows), width] matrix (default: the longest row's
    length), -1 past a row's end."""
    picked = codes.take(pa.array(rows, pa.int64()))
    lengths = pc.list_value_length(picked).to_numpy(zero_copy_only=False).astype(np.int64)
    longest = int(lengths.max()) if len(lengths) else 0
    out = np.full((len(rows), max(longest, width or 0)), -1, np.int32)
    out[np.arange(out.shape[1]) < lengths[:, None]] = pc.list_flatten(picked).to_numpy(
        zero_copy_only=False
    )
    return out if width is None else out[:, :width]


def table_quality(
    table: pa.Table, stats: dict, tokenizer, x: np.ndarray, codebook_sizes: list[int], mode: str
) -> tuple[np.ndarray, dict]:
    """The final code matrix and the quality report of a SID table, with the collision picture
    before (the tokenizer's raw codes) and after (the codes items were given)."""
    final_codes = code_matrix(table["codes"], len(codebook_sizes))
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
