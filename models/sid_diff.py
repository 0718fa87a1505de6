"""Diff two SID tables: which items appeared, disappeared or got a new SID, and at which level.

Pure: two pyarrow tables in (the `sids.parquet` of two published runs, A the base and B the one
compared with it), a `SidDiff` out. It reads no store and imports neither Prefect nor torch; the
CLI (`sidpipe inspect A --diff B`) reads the tables and prints the report. The join runs in
polars, so a few million rows per side take seconds.

What is counted (items are matched on `item_id`):

- `only_in_a` / `only_in_b`: items in one table only.
- `sid_changed`: items in both whose `sid` differs. Each has a *first changed level*: the first
  code level (1-based) whose code differs, or `levels + 1` when only the collision suffix
  differs (`suffix_only`). Per level, `code_changed` counts the changed SIDs whose code at that
  level differs (an item counts at every level it changed at) and `first_changed` counts them by
  first changed level, so `sum(first_changed) + suffix_only == sid_changed`. A level that only
  one side has counts as changed.
- `tokenizer_changed`: items in both whose `tokenizer_id` differs (with or without a new SID).
- `unchanged`: items in both with the same `sid` and the same `tokenizer_id`.

`changes` lists every item that differs, one row each, sorted by `item_id` (`CHANGES_SCHEMA`);
`change` is one of `CHANGE_KINDS` (`tokenizer_changed` only where the SID stayed the same).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import polars as pl
import pyarrow as pa

from sidpipe.errors import SidDiffError
from sidpipe.models.sids import LEVEL_LETTERS

REQUIRED_COLUMNS = ("item_id", "codes", "suffix", "sid", "tokenizer_id")
CHANGE_KINDS = ("only_in_a", "only_in_b", "sid_changed", "tokenizer_changed")
CHANGES_SCHEMA = pa.schema(
    [
        ("item_id", pa.string()),
        ("change", pa.string()),
        ("sid_a", pa.string()),
        ("sid_b", pa.string()),
        ("tokenizer_a", pa.string()),
        ("tokenizer_b", pa.string()),
        # 1..levels: the first code level that differs; levels + 1: only the suffix differs.
        ("first_changed_level", pa.int32()),
    ]
)


@dataclass
class LevelChange:
    level: int  # 1-based
    token: str  # the level's token letter: a, b, c, ...
    code_changed: int  # changed SIDs whose code at this level differs
    first_changed: int  # changed SIDs that first differ at this level


@dataclass
class SidDiff:
    items_a: int
    items_b: int
    only_in_a: int
    only_in_b: int
    in_both: int
    sid_changed: int
    suffix_only: int
    tokenizer_changed: int
    unchanged: int
    levels: list[LevelChange]
    tokenizers_a: dict[str, int]  # tokenizer_id -> items, in each table
    tokenizers_b: dict[str, int]
    changes: pa.Table = field(repr=False)  # one row per differing item (CHANGES_SCHEMA)

    def to_dict(self) -> dict:
        """The counts as plain JSON-ready data (without the `changes` table)."""
        return {
            "items_a": self.items_a,
            "items_b": self.items_b,
            "only_in_a": self.only_in_a,
            "only_in_b": self.only_in_b,
            "in_both": self.in_both,
            "sid_changed": self.sid_changed,
            "suffix_only": self.suffix_only,
            "tokenizer_changed": self.tokenizer_changed,
            "unchanged": self.unchanged,
            "levels": [vars(level).copy() for level in self.levels],
            "tokenizers_a": self.tokenizers_a,
            "tokenizers_b": self.tokenizers_b,
        }

    def rows(self, change: str = "sid_changed", limit: int | None = None) -> list[dict]:
        """The first `limit` rows of `changes` of one kind, as dicts (sorted by item_id)."""
        if change not in CHANGE_KINDS:
            raise ValueError(f"unknown change kind {change!r}; one of {', '.join(CHANGE_KINDS)}")
        picked = pl.from_arrow(self.changes).filter(pl.col("change") == change)
        if limit is not None:
            picked = picked.head(limit)
        return picked.to_dicts()


def _frame(table: pa.Table, side: str) -> pl.DataFrame:
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise SidDiffError(f"SID table {side} has no column {', '.join(map(repr, missing))}")
    frame = pl.from_arrow(table.select(list(REQUIRED_COLUMNS)))
    duplicates = frame.height - frame["item_id"].n_unique()
    if duplicates:
        raise SidDiffError(
            f"SID table {side} repeats {duplicates:,} item_id(s): items cannot be matched"
        )
    return frame.rename({c: f"{c}_{side}" for c in REQUIRED_COLUMNS if c != "item_id"})


def _tokenizers(frame: pl.DataFrame, column: str) -> dict[str, int]:
    counts = frame[column].value_counts(sort=True)
    return {str(k): int(v) for k, v in counts.iter_rows()}


def diff_sids(a: pa.Table, b: pa.Table) -> SidDiff:
    """Compare SID table `a` (the base) with `b`: see the module docstring for what is counted."""
    fa, fb = _frame(a, "a"), _frame(b, "b")
    levels = max(
        int(fa["codes_a"].list.len().max() or 0),
        int(fb["codes_b"].list.len().max() or 0),
    )
    joined = fa.with_columns(in_a=pl.lit(True)).join(
        fb.with_columns(in_b=pl.lit(True)), on="item_id", how="full", coalesce=True
    )
    in_a, in_b = pl.col("in_a").fill_null(False), pl.col("in_b").fill_null(False)
    both = in_a & in_b
    sid_changed = both & pl.col("sid_a").ne_missing(pl.col("sid_b"))
    tokenizer_changed = both & pl.col("tokenizer_id_a").ne_missing(pl.col("tokenizer_id_b"))
    level_changed = [
        sid_changed
        & pl.col("codes_a")
        .list.get(k, null_on_oob=True)
        .ne_missing(pl.col("codes_b").list.get(k, null_on_oob=True))
        for k in range(levels)
    ]
    first_changed = pl.when(sid_changed).then(
        pl.coalesce(
            *[
                pl.when(changed).then(pl.lit(k + 1, pl.Int32))
                for k, changed in enumerate(level_changed)
            ],
            pl.lit(levels + 1, pl.Int32),
        )
    )
    joined = joined.with_columns(
        _both=both,
        _sid_changed=sid_changed,
        _tokenizer_changed=tokenizer_changed,
        first_changed_level=first_changed,
        **{f"_level_{k}": changed for k, changed in enumerate(level_changed)},
        change=pl.when(~in_b)
        .then(pl.lit("only_in_a"))
        .when(~in_a)
        .then(pl.lit("only_in_b"))
        .when(sid_changed)
        .then(pl.lit("sid_changed"))
        .when(tokenizer_changed)
        .then(pl.lit("tokenizer_changed")),
    )
    first = pl.col("first_changed_level")
    sums = joined.select(
        in_both=pl.col("_both").sum(),
        sid_changed=pl.col("_sid_changed").sum(),
        tokenizer_changed=pl.col("_tokenizer_changed").sum(),
        unchanged=(pl.col("_both") & ~pl.col("_sid_changed") & ~pl.col("_tokenizer_changed")).sum(),
        suffix_only=(first == levels + 1).sum(),
        **{f"code_{k}": pl.col(f"_level_{k}").sum() for k in range(levels)},
        **{f"first_{k}": (first == k + 1).sum() for k in range(levels)},
    ).row(0, named=True)
    changes = (
        joined.filter(pl.col("change").is_not_null())
        .select(
            "item_id",
            "change",
            "sid_a",
            "sid_b",
            pl.col("tokenizer_id_a").alias("tokenizer_a"),
            pl.col("tokenizer_id_b").alias("tokenizer_b"),
            "first_changed_level",
        )
        .sort("item_id")
    )
    return SidDiff(
        items_a=fa.height,
        items_b=fb.height,
        only_in_a=fa.height - int(sums["in_both"] or 0),
        only_in_b=fb.height - int(sums["in_both"] or 0),
        in_both=int(sums["in_both"] or 0),
        sid_changed=int(sums["sid_changed"] or 0),
        suffix_only=int(sums["suffix_only"] or 0),
        tokenizer_changed=int(sums["tokenizer_changed"] or 0),
        unchanged=int(sums["unchanged"] or 0),
        levels=[
            LevelChange(
                level=k + 1,
                token=LEVEL_LETTERS[k],
                code_changed=int(sums[f"code_{k}"] or 0),
                first_changed=int(sums[f"first_{k}"] or 0),
            )
            for k in range(levels)
        ],
        tokenizers_a=_tokenizers(fa, "tokenizer_id_a"),
        tokenizers_b=_tokenizers(fb, "tokenizer_id_b"),
        changes=changes.to_arrow().cast(CHANGES_SCHEMA),
    )
