"""ingest: read a catalog, validate every row, normalize text, hash each item's inputs.

Rows that cannot be used go to a quarantine table with a reason; none vanish. A catalog that
cannot be read at all fails with one `CatalogError` that names the file and the problem.

Input contract (the README's "The catalog contract"): `item_id` (required, unique, non-empty), `title`, `description`,
`image` (a local path, a path relative to the catalog file, `s3://`, or `http(s)://` when allowed),
and any other attribute columns, which are kept. A row needs an `item_id` and a title or an image.
An image outside the image roots, or on a non-public host, is never read: its row is quarantined
as `unsafe_image:...` (docs/security.md).
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import re
import time
import unicodedata
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
from prefect import task

from sidpipe.config import CatalogConfig, PipelineConfig
from sidpipe.errors import CatalogError
from sidpipe.storage.catalog_files import check_images, read_catalog
from sidpipe.storage.hashing import hash_strings, stable_hash
from sidpipe.storage.image_policy import ImageRefPolicy, catalog_image_root
from sidpipe.storage.layout import ITEMS_FILE, QUARANTINE_FILE, QUARANTINE_SCHEMA, staging_dir
from sidpipe.storage.manifest import StageStats
from sidpipe.storage.store import ArtifactStore
from sidpipe.tasks.shards import write_shards
from sidpipe.tasks.stage import TASK_OPTIONS, IngestOutcome, RunInfo

log = logging.getLogger(__name__)

CORE_COLUMNS = ("item_id", "title", "description", "image")
RESERVED_COLUMNS = ("image_fingerprint", "item_hash")  # written by ingest itself
MAX_ITEM_ID_LENGTH = 512
MAX_RAW_CHARS = 10_000  # of a quarantined row's raw text
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_SPACE = re.compile(r"\s+")


@dataclass
class IngestResult:
    items: pa.Table  # item_id, title, description, image, image_fingerprint, <attrs>, item_hash
    quarantine: pa.Table  # row, item_id, reason, raw
    input_rows: int
    catalog_sha256: str
    attribute_columns: list[str]


# -- normalizing --------------------------------------------------------------------------------
def normalize_text(value: Any) -> str | None:
    """NFKC, no control characters, single spaces, trimmed; empty becomes None."""
    if value is None:
        return None
    text = unicodedata.normalize("NFKC", str(value))
    text = _CONTROL.sub(" ", text)
    text = _SPACE.sub(" ", text).strip()
    return text or None


# -- types ---------------------------------------------------------------------------------------
# Declared types of the core columns; attribute columns take `catalog.column_types`. "id" is text
# or an integer (Parquet catalogs often have integer ids; written in decimal).
CORE_TYPES = {"item_id": "id", "title": "text", "description": "text", "image": "text"}
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, str):
        return "text"
    return f"a {type(value).__name__}"


def typed_value(value: Any, declared: str) -> tuple[Any, str | None]:
    """(the value as its declared type, None) or (None, what is wrong). None stays None."""
    if value is None:
        return None, None
    kind = _kind(value)
    if declared in ("text", "id"):
        if isinstance(value, str):
            return value, None
        if declared == "id" and kind == "a number" and isinstance(value, int):
            return str(value), None
        return None, f"{kind} where text is expected"
    if declared == "number":
        if kind == "a number":
            return value, None
        if isinstance(value, str) and _NUMBER.match(value.strip()):
            return float(value), None  # CSV: every value is text
        return None, f"{kind} where a number is expected"
    if declared == "list":
        if isinstance(value, list | tuple) and all(not isinstance(v, dict | list) for v in value):
            return list(value), None
        return None, f"{kind} where a list of values is expected"
    if declared == "bool":
        if isinstance(value, bool):
            return value, None
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true", None
        return None, f"{kind} where true/false is expected"
    raise ValueError(f"unknown column type {declared!r}")


def type_problem(row: dict[str, Any], types: dict[str, str]) -> str | None:
    """The quarantine reason of a row's first value of the wrong type (None: all fit); fixes
    the row's values to their types (numbers from CSV text) in place."""
    for column, declared in types.items():
        value, problem = typed_value(row.get(column), declared)
        if problem:
            return f"bad_type:{column}: {problem}"
        if column in row:
            row[column] = value
    return None


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and value != value:  # NaN
        return None
    return value


# -- image references ---------------------------------------------------------------------------
def resolve_image(ref: str, catalog_uri: str) -> str:
    """Absolute URI of an image reference; relative paths are relative to the catalog file.
    Whether it may be read is `ImageRefPolicy`'s to say (docs/security.md)."""
    ref = ref.removeprefix("file://")
    if "://" in ref:
        return ref
    if os.path.isabs(ref):
        return ref
    if "://" in catalog_uri:
        scheme, rest = catalog_uri.split("://", 1)
        return f"{scheme}://{posixpath.normpath(posixpath.join(posixpath.dirname(rest), ref))}"
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(catalog_uri)), ref))


# -- validating ---------------------------------------------------------------------------------
def validate_rows(
    rows: list[dict[str, Any] | None],
    bad: list[tuple[int, str, str]],
    catalog_uri: str,
    config: CatalogConfig,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]:
    """Split rows into usable items and quarantined rows (each with a reason)."""
    quarantine: list[dict[str, Any]] = [
        {"row": number, "item_id": None, "reason": reason, "raw": raw}
        for number, reason, raw in bad
    ]
    # Attribute columns in the catalog's own order of first appearance.
    attribute_columns = list(
        dict.fromkeys(k for r in rows if r for k in r if k not in CORE_COLUMNS)
    )
    clash = [c for c in attribute_columns if c in RESERVED_COLUMNS]
    if clash:
        raise CatalogError(
            f"{catalog_uri}: column(s) {', '.join(clash)} are reserved for "
            "sidpipe's own fields; rename them"
        )

    types = {**CORE_TYPES, **config.column_types}
    max_chars = config.max_text_chars

    def reject(number: int, row: dict[str, Any], item_id: str | None, reason: str) -> None:
        raw = json.dumps({k: _jsonable(v) for k, v in row.items()}, default=str, ensure_ascii=False)
        if len(raw) > MAX_RAW_CHARS:  # a 1 MB title is not copied whole into quarantine
            raw = f"{raw[:MAX_RAW_CHARS]}... ({len(raw):,} characters)"
        quarantine.append({"row": number, "item_id": item_id, "reason": reason, "raw": raw})

    candidates: list[tuple[int, dict[str, Any]]] = []
    for number, row in enumerate(rows, start=1):
        if row is None:
            continue  # already quarantined as unparseable
        raw = dict(row)
        problem = type_problem(row, types)
        if problem:
            given = row.get("item_id")
            readable = isinstance(given, str | int) and not isinstance(given, bool)
            reject(number, raw, normalize_text(given)[:64] if readable else None, problem)
            continue
        item_id = normalize_text(row.get("item_id"))
        if item_id is None:
            reject(number, row, None, "empty item_id")
            continue
        if len(item_id) > MAX_ITEM_ID_LENGTH:
            reject(
                number, row, item_id[:64], f"item_id longer than {MAX_ITEM_ID_LENGTH} characters"
            )
            continue
        item = {
            "item_id": item_id,
            "title": normalize_text(row.get("title")),
            "description": normalize_text(row.get("description")),
            "image": normalize_text(row.get("image")),
        }
        for col in attribute_columns:
            item[col] = _jsonable(row.get(col))
        long = [c for c in ("title", "description", "image") if len(item[c] or "") > max_chars]
        if long:
            reject(number, raw, item_id, f"too_long:{long[0]}: over {max_chars:,} characters")
            continue
        if item["title"] is None and item["image"] is None:
            reject(number, row, item_id, "no title and no image")
            continue
        candidates.append((number, item))

    # Duplicates: identical copies keep the first; conflicting copies are all quarantined,
    # because choosing one of them silently would lose data without saying so.
    by_id: dict[str, list[tuple[int, dict[str, Any]]]] = defaultdict(list)
    for number, item in candidates:
        by_id[item["item_id"]].append((number, item))
    unique: list[tuple[int, dict[str, Any]]] = []
    for item_id, copies in by_id.items():
        if len(copies) == 1:
            unique.append(copies[0])
            continue
        first_number, first = copies[0]
        if all(item == first for _, item in copies[1:]):
            unique.append(copies[0])
            for number, item in copies[1:]:
                reject(
                    number, item, item_id, f"duplicate item_id (identical to row {first_number})"
                )
        else:
            numbers = ", ".join(str(n) for n, _ in copies)
            for number, item in copies:
                reject(
                    number, item, item_id, f"duplicate item_id with conflicting rows ({numbers})"
                )

    # Image references: allowed scheme, inside the image roots or a public host (before
    # anything reads them), then one listing per folder.
    policy = ImageRefPolicy(
        [catalog_image_root(catalog_uri), *config.image_roots], config.allowed_image_hosts
    )
    to_check: list[str] = []
    unsafe: dict[str, str] = {}
    for _, item in unique:
        ref = item["image"]
        if ref is None:
            continue
        uri = resolve_image(ref, catalog_uri)
        item["image"] = uri
        web = uri.startswith(("http://", "https://"))
        other_scheme = "://" in uri and not uri.startswith("s3://")
        if (not config.allow_http_images) if web else other_scheme:
            continue  # refused below by its scheme
        if (problem := policy.problem(uri)) is not None:
            unsafe[uri] = problem
        elif not web:
            to_check.append(uri)
    checked = check_images(to_check) if config.check_images else {}

    def image_verdict(uri: str) -> tuple[str | None, str | None]:
        """(fingerprint, None) for a usable image reference, else (None, why it is not)."""
        web = uri.startswith(("http://", "https://"))
        if web and not config.allow_http_images:
            return None, (
                "http(s) image references are disabled "
                "(set catalog.allow_http_images=true to allow them)"
            )
        if "://" in uri and not web and not uri.startswith("s3://"):
            return None, f"unsupported image reference scheme: {uri.split('://')[0]}://"
        if uri in unsafe:
            return None, unsafe[uri]
        if web:
            return uri, None
        if config.check_images:
            return checked[uri]
        # Unchecked: the location stands in for the content (a replaced file under the same
        # name is not noticed; turn check_images on for that).
        return f"uri:{uri}", None

    items: list[dict[str, Any]] = []
    for number, item in sorted(unique, key=lambda pair: pair[0]):
        item["image_fingerprint"], reason = None, None
        if item["image"] is not None:
            item["image_fingerprint"], reason = image_verdict(item["image"])
        if reason:
            reject(number, item, item["item_id"], reason)
            continue
        items.append(item)
    quarantine.sort(key=lambda q: q["row"])
    return items, quarantine, attribute_columns


def item_hash(item: dict[str, Any]) -> str:
    """Hash of everything the pipeline reads from an item: text, attributes and the image's
    fingerprint: its content for checked local and S3 images (so moving a catalog keeps its
    hashes), its URL for http(s) images and for unchecked ones."""
    return stable_hash({k: v for k, v in item.items() if k not in ("item_hash", "image")})


def ingest_catalog(uri: str, config: CatalogConfig) -> IngestResult:
    """Read, validate, normalize and hash a catalog. Pure: writes nothing."""
    rows, bad, digest = read_catalog(uri)
    items, quarantine, attributes = validate_rows(rows, bad, uri, config)
    for item in items:
        item["item_hash"] = item_hash(item)
    columns = [
        "item_id",
        "title",
        "description",
        "image",
        "image_fingerprint",
        *attributes,
        "item_hash",
    ]
    schema = _items_schema(items, attributes)  # may turn mixed-type values into text
    items_table = pa.Table.from_pylist(
        [{c: item.get(c) for c in columns} for item in items], schema=schema
    )
    quarantine_table = pa.Table.from_pylist(quarantine, schema=QUARANTINE_SCHEMA)
    log.info(
        "ingest: %d rows -> %d items, %d quarantined (%s)",
        len(rows),
        len(items),
        len(quarantine),
        uri,
    )
    return IngestResult(items_table, quarantine_table, len(rows), digest, attributes)


def _items_schema(items: list[dict[str, Any]], attributes: list[str]) -> pa.Schema:
    fields = [
        pa.field(c, pa.string())
        for c in ("item_id", "title", "description", "image", "image_fingerprint")
    ]
    for col in attributes:
        values = [item[col] for item in items if item.get(col) is not None]
        try:
            dtype = pa.array(values).type if values else pa.string()
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            dtype = None
        if dtype is None or pa.types.is_null(dtype):
            dtype = pa.string()
            for item in items:
                if item.get(col) is not None and not isinstance(item[col], str):
                    item[col] = json.dumps(item[col], default=str, ensure_ascii=False)
        fields.append(pa.field(col, dtype))
    fields.append(pa.field("item_hash", pa.string()))
    return pa.schema(fields)


# -- the stage ----------------------------------------------------------------------------------
def ingest_stage(
    store: ArtifactStore, run: RunInfo, config: CatalogConfig, shard_size: int = 50_000
) -> IngestOutcome:
    """Ingest the catalog into the run's staging folder (items.parquet, quarantine.parquet, and
    the items again split into shards of about `shard_size`)."""
    started = time.perf_counter()
    result = ingest_catalog(config.uri, config)
    items = result.items.sort_by("item_id")
    store.write_parquet(items, *staging_dir(run.run_id), ITEMS_FILE)
    store.write_parquet(result.quarantine, *staging_dir(run.run_id), QUARANTINE_FILE)
    shards = write_shards(store, run, items, shard_size)
    return IngestOutcome(
        stage="ingest",
        key="ingest",
        index=ITEMS_FILE,
        stats=StageStats(
            computed=items.num_rows,
            failed=result.quarantine.num_rows,
            seconds=time.perf_counter() - started,
        ),
        input_rows=result.input_rows,
        quarantined=result.quarantine.num_rows,
        catalog_sha256=result.catalog_sha256,
        items_hash=hash_strings(items["item_hash"].to_pylist()),
        attribute_columns=result.attribute_columns,
        shard_count=shards,
    )


@task(name="ingest", **TASK_OPTIONS)
def ingest_task(store: ArtifactStore, config: PipelineConfig, run: RunInfo) -> IngestOutcome:
    return ingest_stage(store, run, config.catalog, config.orchestration.shard_size)
