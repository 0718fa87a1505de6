"""Catalog files and the image files they point to: read, parse, list. No validation here.

A catalog is Parquet, JSONL or CSV (optionally gzipped), local or s3://. `read_catalog` returns
its rows as dicts and the rows it could not parse (with reasons), or raises `CatalogError` when
the file as a whole cannot be read. `check_images` says, per image URI, whether it is a non-empty
file (a local one: with an image format's signature) and what its content fingerprint is. `tasks.ingest` validates what these return.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import posixpath
from collections import defaultdict
from typing import Any

import pyarrow.parquet as pq

from sidpipe.errors import CatalogError
from sidpipe.storage.hashing import sha256_bytes
from sidpipe.storage.store import open_filesystem


def _format_of(uri: str) -> str:
    name = uri.lower().split("?")[0]
    for suffix, fmt in (
        (".parquet", "parquet"),
        (".pq", "parquet"),
        (".jsonl", "jsonl"),
        (".ndjson", "jsonl"),
        (".jsonl.gz", "jsonl"),
        (".csv", "csv"),
        (".csv.gz", "csv"),
    ):
        if name.endswith(suffix):
            return fmt
    raise CatalogError(
        f"{uri}: unknown catalog format; use a .parquet, .jsonl/.ndjson or .csv file"
    )


def peek_catalog(uri: str, at_most: int) -> tuple[int, list[str] | None]:
    """A catalog's data rows, counted up to `at_most`, and its columns where the file declares
    them (CSV: the header; Parquet: the schema, rows from its metadata; JSONL: None, each row
    has its own). Cheap enough to check a catalog before a run starts."""
    fmt = _format_of(uri)
    fs, path = open_filesystem(uri)
    try:
        if fmt == "parquet":
            with fs.open(path, "rb") as handle:
                meta = pq.ParquetFile(handle)
                return meta.metadata.num_rows, meta.schema_arrow.names
        encoding = "utf-8-sig" if fmt == "csv" else "utf-8"  # as read_catalog reads it
        with fs.open(path, "rt", compression="infer", encoding=encoding, errors="replace") as text:
            if fmt == "csv":
                reader = csv.reader(text)
                columns = [c.strip() for c in next(reader, [])]
                rows = 0
                for fields in reader:
                    rows += bool(fields)
                    if rows >= at_most:
                        break
                return rows, columns
            rows = 0
            for line in text:
                rows += bool(line.strip())
                if rows >= at_most:
                    break
            return rows, None
    except FileNotFoundError:
        raise CatalogError(f"{uri}: catalog file not found") from None
    except Exception as exc:  # noqa: BLE001 - any reader error: one clear message
        raise CatalogError(f"{uri}: cannot read the catalog: {exc}") from exc


def require_item_id(uri: str, columns: list[str] | None) -> None:
    """A declared set of columns (None: not declared) must hold item_id."""
    if columns is not None and "item_id" not in columns:
        raise CatalogError(_missing_id_message(uri, columns))


def read_catalog(uri: str) -> tuple[list[dict[str, Any]], list[tuple[int, str, str]], str]:
    """Rows of a catalog as dicts, unparseable rows as (row number, reason, raw text), sha256.

    Row numbers are 1-based data rows (the CSV header is not a row).
    """
    fmt = _format_of(uri)
    fs, path = open_filesystem(uri)
    try:
        with fs.open(path, "rb", compression="infer") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise CatalogError(f"{uri}: catalog file not found") from None
    except Exception as exc:  # noqa: BLE001
        raise CatalogError(f"{uri}: cannot read the catalog: {exc}") from exc

    bad: list[tuple[int, str, str]] = []
    if fmt == "parquet":
        try:
            table = pq.read_table(io.BytesIO(data))
        except Exception as exc:  # noqa: BLE001
            raise CatalogError(f"{uri}: not a readable Parquet file: {exc}") from exc
        rows = table.to_pylist()
    elif fmt == "jsonl":
        rows = []
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CatalogError(f"{uri}: not UTF-8 text: {exc}") from exc
        number = 0
        for line in text.splitlines():
            if not line.strip():
                continue
            number += 1
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                bad.append((number, f"invalid JSON: {exc.msg} at column {exc.colno}", line))
                rows.append(None)
                continue
            if not isinstance(row, dict):
                bad.append((number, "a JSONL row must be a JSON object", line))
                rows.append(None)
                continue
            rows.append(row)
    else:
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise CatalogError(f"{uri}: not UTF-8 text: {exc}") from exc
        reader = csv.reader(io.StringIO(text, newline=""))
        header = next(reader, None)
        if not header:
            raise CatalogError(f"{uri}: empty CSV file (no header row)")
        header = [h.strip() for h in header]
        rows = []
        for fields in reader:
            if not fields:
                continue  # blank line
            number = len(rows) + 1
            if len(fields) != len(header):
                bad.append(
                    (
                        number,
                        f"CSV row has {len(fields)} fields, header has {len(header)}",
                        ",".join(fields),
                    )
                )
                rows.append(None)
                continue
            rows.append({k: (v if v != "" else None) for k, v in zip(header, fields, strict=True)})
        require_item_id(uri, header)

    columns = {k for row in rows if row for k in row}
    if rows and any(r is not None for r in rows):
        require_item_id(uri, sorted(columns))
    if not rows:
        raise CatalogError(f"{uri}: the catalog has no rows")
    # Placeholders (None) keep row numbers aligned with `bad`.
    return rows, bad, sha256_bytes(data)


def _missing_id_message(uri: str, columns: list[str]) -> str:
    return f"{uri}: no 'item_id' column (columns: {', '.join(columns) or 'none'})"


def check_images(uris: list[str]) -> dict[str, tuple[str | None, str | None]]:
    """For each image URI: (fingerprint, None) if it is a non-empty file, else (None, reason).

    Lists each parent folder once instead of asking about every file: cheap on S3 too.
    """
    by_parent: dict[tuple[str, str], list[str]] = defaultdict(list)
    for uri in uris:
        scheme = uri.split("://", 1)[0] if "://" in uri else "file"
        parent = uri.rsplit("/", 1)[0] if "/" in uri else "."
        by_parent[(scheme, parent)].append(uri)

    result: dict[str, tuple[str | None, str | None]] = {}
    for (scheme, parent), members in by_parent.items():
        try:
            fs, parent_path = open_filesystem(parent)
            entries = {
                posixpath.basename(e["name"].rstrip("/")): e
                for e in fs.ls(parent_path, detail=True)
            }
        except FileNotFoundError:
            entries = {}
        except Exception as exc:  # noqa: BLE001 - a storage error for this folder only
            for uri in members:
                result[uri] = (None, f"image folder unreadable: {parent}: {exc}")
            continue
        for uri in members:
            entry = entries.get(uri.rsplit("/", 1)[-1])
            if entry is None or entry.get("type") == "directory":
                result[uri] = (None, f"image not found: {uri}")
            elif not entry.get("size"):
                result[uri] = (None, f"image file is empty: {uri}")
            elif scheme == "file":
                # Local files are hashed: the same photo gives the same fingerprint on any clone.
                try:
                    digest, head = _file_sha256(fs, entry["name"])
                except OSError as exc:
                    result[uri] = (None, f"image unreadable: {uri}: {exc}")
                    continue
                if image_format(head) is None:
                    result[uri] = (None, f"not an image file (unknown format): {uri}")
                else:
                    result[uri] = (f"sha256:{digest}", None)
            else:
                # Object stores: the ETag from the listing, no download of every image.
                etag = entry.get("ETag") or entry.get("etag") or entry.get("mtime")
                result[uri] = (f"etag:{str(etag).strip(chr(34))}:{entry['size']}", None)
    return result


def _file_sha256(fs, path: str) -> tuple[str, bytes]:
    """A file's sha256 and its first bytes."""
    digest, head = hashlib.sha256(), b""
    with fs.open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            head = head or block[:16]
            digest.update(block)
    return digest.hexdigest(), head


# Signatures of the image formats the model stages decode (Pillow's, for the common ones).
_SIGNATURES = {
    b"\xff\xd8\xff": "jpeg",
    b"\x89PNG\r\n\x1a\n": "png",
    b"GIF87a": "gif",
    b"GIF89a": "gif",
    b"BM": "bmp",
    b"II*\x00": "tiff",
    b"MM\x00*": "tiff",
}


def image_format(head: bytes) -> str | None:
    """The image format a file's first bytes announce (None: not an image sidpipe reads). Only
    the signature is checked here; a truncated image is found when a model stage decodes it."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return next((fmt for sig, fmt in _SIGNATURES.items() if head.startswith(sig)), None)
