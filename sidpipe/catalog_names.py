"""A catalog's default name, derived from its file name (the README's "A catalog's name").

Imports nothing of sidpipe: the config uses it.
"""

from __future__ import annotations

import posixpath
import re
import unicodedata

# File names that say nothing about which catalog they hold: the folder's name is used instead.
GENERIC_STEMS = {"catalog", "items", "products", "data", "export", "latest", "part-0", "part-00000"}
_FORMAT_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".parquet", ".pq", ".jsonl", ".ndjson", ".json")
_FORMAT_SUFFIXES += (".csv", ".tsv")


def catalog_name_of(uri: str) -> str:
    """A catalog's default name, from its file name: without format and compression suffixes,
    lowercased, every run of other characters than a-z 0-9 . _ - made one `-`; a generic file
    name (catalog.csv, items.parquet, ...) takes its folder's name instead.

    data/fashion-sample/catalog.csv -> fashion-sample; s3://b/exports/Shop Items 2026.jsonl.gz ->
    shop-items-2026."""
    path = uri.split("://", 1)[-1].split("?", 1)[0].replace("\\", "/").rstrip("/")
    folder, stem = posixpath.split(path)
    stem = stem.lower()
    while stem.endswith(_FORMAT_SUFFIXES):
        stem = stem[: stem.rfind(".")]

    def slug(text: str) -> str:
        ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
        return re.sub(r"[^a-z0-9._-]+", "-", ascii_text.lower())[:64].strip("-._")

    name = slug(stem)
    if name in GENERIC_STEMS or not name:
        name = slug(posixpath.basename(folder)) or name
    return name or "catalog"
