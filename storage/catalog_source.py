"""Which file a catalog name stands for: one name, one catalog.

`<root>/catalogs/_sources/<catalog>.json` = {"source": ..., "recorded_at": ..., "previous": [...]}
is written by a catalog's first run. A later run that reads another source under the same name
is refused (`CatalogSourceError`) unless it says the file is a new snapshot or location of the
same catalog (`catalog.same_catalog`, `--same-catalog`); then the new source is recorded and the
old one kept in `previous`. So a user trying their own file without `--catalog-name` cannot take
over the sample's lock, tokenizer, SIDs and published history, and two teams sharing a store
cannot mix catalogs by accident.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime

from pydantic import BaseModel, Field

from sidpipe.data import SAMPLE_CATALOG
from sidpipe.errors import CatalogSourceError
from sidpipe.storage.layout import catalog_source_path
from sidpipe.storage.store import ArtifactStore


class CatalogSource(BaseModel):
    catalog: str
    source: str
    recorded_at: datetime
    previous: list[dict] = Field(default_factory=list)  # {"source", "recorded_at", "until"}


def source_of(uri: str) -> str:
    """A catalog URI as recorded: the bundled sample by name (it moves with each install),
    a local file by its absolute path, anything else as given."""
    if "://" in uri:
        return uri[len("file://") :] if uri.startswith("file://") else uri
    path = os.path.abspath(uri)
    return "bundled:fashion-sample" if path == os.path.abspath(SAMPLE_CATALOG) else path


def read_source(store: ArtifactStore, catalog: str) -> CatalogSource | None:
    if not store.exists(*catalog_source_path(catalog)):
        return None
    return CatalogSource.model_validate(store.read_json(*catalog_source_path(catalog)))


def check_source(store: ArtifactStore, catalog: str, uri: str, same_catalog: bool) -> None:
    """Raise `CatalogSourceError` when `catalog` is recorded for another source."""
    recorded, source = read_source(store, catalog), source_of(uri)
    if recorded is None or recorded.source == source or same_catalog:
        return
    raise CatalogSourceError(
        f"catalog name {catalog!r} is the catalog read from {recorded.source} (since "
        f"{recorded.recorded_at:%Y-%m-%d}); this run reads {source}",
        hint=f"give this catalog its own name (--catalog-name / catalog.name), or pass "
        f"--same-catalog (catalog.same_catalog=true) if it is a new snapshot or location of "
        f"{catalog!r}",
    )


def record_source(store: ArtifactStore, catalog: str, uri: str, same_catalog: bool) -> None:
    """Check, then record `uri` as the catalog's source (call it holding the catalog's lock)."""
    check_source(store, catalog, uri, same_catalog)
    recorded, source, now = read_source(store, catalog), source_of(uri), datetime.now(UTC)
    if recorded is not None and recorded.source == source:
        return
    previous = []
    if recorded is not None:
        previous = [
            *recorded.previous,
            {
                "source": recorded.source,
                "recorded_at": recorded.recorded_at.isoformat(),
                "until": now.isoformat(),
            },
        ]
    entry = CatalogSource(catalog=catalog, source=source, recorded_at=now, previous=previous)
    store.write_json(entry.model_dump(mode="json"), *catalog_source_path(catalog))
