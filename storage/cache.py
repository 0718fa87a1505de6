"""Content-addressed stage cache: `<root>/cache/<stage>/<stage_key>/part-*.parquet`.

A stage's result for an item is stored under (stage key, item input hash). The stage key names
everything that changes the result besides the item (model, revision, prompt version,
parameters); the input hash names the item's exact input to that stage. A lookup returns the rows
already computed, so a re-run or a crash-resume only computes what is missing.

Parts are immutable and named by the hash of their input hashes: writing the same part twice is
harmless, and two runs writing at once cannot corrupt each other. A part that fails its
checksums (truncated, overwritten) is dropped and its items computed again. This module never
decides what a key means; stages do.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from sidpipe.errors import CorruptArtifactError
from sidpipe.storage.hashing import hash_strings, stable_hash
from sidpipe.storage.layout import INPUT_HASH, cache_dir
from sidpipe.storage.store import ArtifactStore, concat_tables

log = logging.getLogger(__name__)


def stage_key(stage: str, params: dict) -> str:
    """The key of a stage configuration: a short hash of everything that changes its results."""
    return f"{stage}-{stable_hash(params, 16)}"


class StageCache:
    """Cached per-item results of one stage configuration."""

    def __init__(self, store: ArtifactStore, stage: str, key: str, params: dict | None = None):
        self.store = store
        self.stage = stage
        self.key = key
        self.params = params
        self.prefix = cache_dir(stage, key)

    def _parts(self) -> list[str]:
        return [
            p
            for p in self.store.listdir(*self.prefix)
            if p.rsplit("/", 1)[-1].startswith("part-") and p.endswith(".parquet")
        ]

    def lookup(self, input_hashes: Iterable[str]) -> pa.Table | None:
        """Cached rows whose input hash is among `input_hashes` (one row per hash), or None."""
        table = concat_tables(list(self.scan(input_hashes)))
        if table is None:
            return None
        # Two runs may have cached the same item at once: keep one row per hash.
        seen: set[str] = set()
        keep = []
        for value in table[INPUT_HASH].to_pylist():
            keep.append(value not in seen)
            seen.add(value)
        return table.filter(pa.array(keep))

    def scan(
        self, input_hashes: Iterable[str], columns: list[str] | None = None
    ) -> Iterator[pa.Table]:
        """The cached rows whose input hash is among `input_hashes`, one part at a time (so a
        caller can handle a cache larger than memory); a hash cached twice comes twice."""
        wanted = pa.array(sorted(set(input_hashes)), pa.string())
        if len(wanted) == 0:
            return
        for part in self._parts():
            rel = self.store.relative(part)
            try:
                hashes = self.store.read_parquet(rel, columns=[INPUT_HASH])[INPUT_HASH]
                mask = pc.is_in(hashes, value_set=wanted)
                if pc.any(mask).as_py():
                    wanted_columns = None if columns is None else [INPUT_HASH, *columns]
                    table = self.store.read_parquet(rel, columns=wanted_columns).filter(mask)
                else:
                    continue
            except CorruptArtifactError as exc:
                # A cache is only a cache: its rows are computed again (and stored again).
                log.warning("cache: %s; dropped, its items are computed again", exc)
                self.store.delete(rel)
                continue
            yield table

    def pending(
        self, input_hashes: list[str], payloads: list[Any]
    ) -> tuple[pa.Table | None, dict[str, Any]]:
        """What is cached and what is left to compute for these inputs: (the cached rows, input
        hash -> payload of every input not cached yet, each hash once)."""
        cached = self.lookup(input_hashes)
        have = set(cached[INPUT_HASH].to_pylist()) if cached is not None else set()
        todo: dict[str, Any] = {}
        for h, payload in zip(input_hashes, payloads, strict=True):
            if h not in have:
                todo.setdefault(h, payload)
        return cached, todo

    def put(self, table: pa.Table) -> str | None:
        """Store new rows (must have an `input_hash` column); returns the part's path."""
        if table is None or table.num_rows == 0:
            return None
        if INPUT_HASH not in table.column_names:
            raise ValueError(f"cache rows for {self.stage} need an {INPUT_HASH!r} column")
        if self.params is not None and not self.store.exists(*self.prefix, "_KEY.json"):
            # For people browsing the store: what this key stands for.
            self.store.write_json(
                {"stage": self.stage, "key": self.key, "params": self.params},
                *self.prefix,
                "_KEY.json",
            )
        name = f"part-{hash_strings(sorted(table[INPUT_HASH].to_pylist()), 20)}.parquet"
        return self.store.write_parquet(table, *self.prefix, name)
