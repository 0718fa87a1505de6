"""Reading what the tokenization flow published: find a run, read its files as published.

A run is published when its `_MANIFEST.json` exists; everything here starts from manifests, so
a half-written or failed run is never read. Files are read back through their manifest entry and
checked against the sha256 it recorded, so a reader never mixes two publications of one date.
The CLI (`inspect`), the pipeline (the last published table of a catalog) and the training flows
all use these functions.
"""

from __future__ import annotations

import io
import logging
from datetime import date

import pyarrow as pa
import pyarrow.parquet as pq

from sidpipe.errors import CorruptArtifactError, PublishedRunNotFound, StoreError
from sidpipe.storage.hashing import sha256_bytes
from sidpipe.storage.layout import MANIFEST_NAME, PUBLISHED_ROLES
from sidpipe.storage.manifest import Manifest, read_manifest, run_records
from sidpipe.storage.store import ArtifactStore

log = logging.getLogger(__name__)


def published_runs(
    store: ArtifactStore, catalog: str | None = None, replacing: date | None = None
) -> list[Manifest]:
    """Every published run (those with a manifest), by catalog then oldest run_date first.

    A manifest that cannot be read is a `CorruptArtifactError`, except that of `replacing`: the
    date a run is about to publish again (its manifest is replaced), which is left out."""
    pattern = f"sids/{catalog or '*'}/*/{MANIFEST_NAME}"
    manifests = []
    for path in store.glob(pattern):
        try:
            manifests.append(Manifest.model_validate(store.read_json(store.relative(path))))
        except CorruptArtifactError:
            if replacing is None or path.split("/")[-2] != replacing.isoformat():
                raise
            log.warning("publish: the manifest of %s is corrupt; this run replaces it", replacing)
    return sorted(manifests, key=lambda m: (m.catalog, m.run_date))


def latest_published(
    store: ArtifactStore, catalog: str, not_after: date | None = None
) -> Manifest | None:
    """The newest published run of a catalog (with run_date <= `not_after`, if given: the run
    of `not_after` is the one being published again, so its manifest may be corrupt)."""
    runs = [
        m
        for m in published_runs(store, catalog, replacing=not_after)
        if not_after is None or m.run_date <= not_after
    ]
    return runs[-1] if runs else None


def resolve_run(store: ArtifactStore, catalog: str, run_date: str | None = None) -> Manifest:
    """The manifest of `catalog`'s run of `run_date` (None: its latest published run).

    Raises `PublishedRunNotFound` saying what is missing: the catalog, the date (with the dates
    that are published), or the manifest of a run that failed or is still running."""
    hint = f"`sidpipe run --catalog-name {catalog} ...` publishes one; `sidpipe inspect` lists them"
    if not run_date:
        latest = latest_published(store, catalog)
        if latest is not None:
            return latest
        catalogs = sorted({m.catalog for m in published_runs(store)})
        known = f"published catalogs: {', '.join(catalogs)}" if catalogs else "nothing is published"
        raise PublishedRunNotFound(
            f"no published run of catalog {catalog!r} in {store.root_uri} ({known})", hint
        )
    try:
        return read_manifest(store, catalog, run_date)
    except FileNotFoundError:
        pass
    attempts = [
        r for r in run_records(store) if r.catalog == catalog and str(r.run_date) == run_date
    ]
    dates = [str(m.run_date) for m in published_runs(store, catalog)]
    if attempts:
        last = attempts[-1]
        detail = f"the run log's last run of that date, {last.run_id}, is {last.status}"
        detail += f": {last.error[:200]}" if last.error else ""
    elif dates:
        detail = f"published dates of {catalog}: {', '.join(dates[-10:])}"
    else:
        detail = f"catalog {catalog!r} has no published run"
    raise PublishedRunNotFound(
        f"run {catalog}/{run_date} is not published in {store.root_uri}: no {MANIFEST_NAME} "
        f"({detail})",
        hint,
    )


def resolve_target(store: ArtifactStore, target: str) -> Manifest:
    """`CATALOG` (its latest run) or `CATALOG/RUN_DATE`, as people type it."""
    catalog, _, day = target.partition("/")
    if not catalog:
        raise PublishedRunNotFound(f"{target!r} is not CATALOG or CATALOG/RUN_DATE")
    return resolve_run(store, catalog, day or None)


def read_published(store: ArtifactStore, manifest: Manifest, role: str) -> bytes:
    """A published file's bytes, checked against the sha256 its manifest recorded."""
    run = f"{manifest.catalog}/{manifest.run_date}"
    what = PUBLISHED_ROLES.get(role, role)
    entry = manifest.files.get(role)
    if entry is None:
        raise PublishedRunNotFound(
            f"run {run} has no {what}: its manifest lists {', '.join(manifest.files)}",
            hint=""
            if role != "quality_png"
            else "runs published before quality.png existed lack it",
        )
    try:
        data = store.read_bytes(entry.path)
    except FileNotFoundError:
        raise PublishedRunNotFound(
            f"{what} of run {run} is missing: {store.uri(entry.path)}"
        ) from None
    if sha256_bytes(data) != entry.sha256:
        raise StoreError(
            f"{store.uri(entry.path)} does not match the manifest of {run} (sha256)",
            hint="republished while being read? Try again",
        )
    return data


def read_published_table(
    store: ArtifactStore, manifest: Manifest, role: str, columns: list[str] | None = None
) -> pa.Table:
    return pq.read_table(io.BytesIO(read_published(store, manifest, role)), columns=columns)


def run_ref(manifest: Manifest) -> dict:
    """Which published run something was made from: for JSON output and training records."""
    return {
        "catalog": manifest.catalog,
        "run_date": str(manifest.run_date),
        "run_id": manifest.run_id,
        "tokenizer_id": manifest.tokenizer_id,
    }
