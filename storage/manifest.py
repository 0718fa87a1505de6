"""Run manifests, atomic publish and the run log.

Layout (all paths: `storage.layout`):
    <root>/runs/<run_id>/                    staging of a run's files + _RUN.json (the run log)
    <root>/catalogs/<catalog>/<run_date>/    items.parquet, quarantine.parquet
    <root>/sids/<catalog>/<run_date>/        sids.parquet, quality.json, errors.parquet,
                                             tokens.txt, _MANIFEST.json (written last)

A run writes everything into its staging folder. Publishing removes the previous manifest of
that (catalog, run_date), copies each staged file to its published name (each copy atomic), then
writes `_MANIFEST.json`. Readers look for the manifest first: a published name without a manifest
is never read, so a failed run can never show half of its tables. The manifest records each
file's sha256 and row count, so a reader can check that what it reads is what was published.
"""

from __future__ import annotations

import logging
from datetime import UTC, date, datetime
from typing import Any

from pydantic import BaseModel, Field

from sidpipe.errors import CorruptArtifactError
from sidpipe.storage.layout import MANIFEST_NAME, RUN_RECORD_NAME, sids_dir, staging_dir
from sidpipe.storage.store import ArtifactStore

SCHEMA_VERSION = 1
log = logging.getLogger(__name__)


class StageStats(BaseModel):
    """What one stage did with the run's items (item counts; seconds of wall time)."""

    computed: int = 0
    cached: int = 0
    skipped: int = 0
    failed: int = 0
    resumed: int = 0  # done by an earlier attempt of this run (a killed run, resumed)
    seconds: float = 0.0


class Counts(BaseModel):
    """Where every input row ended up. `input == assigned + quarantined + failed`, always."""

    input: int
    assigned: int
    quarantined: int
    failed: int

    def check(self) -> None:
        total = self.assigned + self.quarantined + self.failed
        if total != self.input:
            raise AssertionError(
                f"counts do not add up: input {self.input} != assigned {self.assigned} + "
                f"quarantined {self.quarantined} + failed {self.failed} = {total}"
            )


class FileEntry(BaseModel):
    path: str  # relative to the store root
    sha256: str
    bytes: int
    rows: int | None = None


class Manifest(BaseModel):
    schema_version: int = SCHEMA_VERSION
    run_id: str
    catalog: str
    run_date: date
    started_at: datetime
    finished_at: datetime
    code_version: dict[str, Any]
    config: dict[str, Any]
    models: dict[str, Any]
    inputs: dict[str, Any]
    tokenizer_id: str | None
    counts: Counts
    stages: dict[str, StageStats]
    files: dict[str, FileEntry] = Field(default_factory=dict)
    attempts: int = 1
    warnings: list[str] = Field(default_factory=list)  # poor SID quality, every run until fixed
    notes: list[str] = Field(default_factory=list)  # what a reader should know (e.g. a no-op refit)


class RunRecord(BaseModel):
    """One line of the run log: every run, published or failed, leaves one."""

    run_id: str
    catalog: str
    run_date: date
    status: str  # running | published | failed
    started_at: datetime
    finished_at: datetime | None = None
    error: str | None = None
    counts: Counts | None = None
    stages: dict[str, StageStats] = Field(default_factory=dict)
    published: str | None = None  # relative path of the published folder
    attempts: int = 1  # more than one: a killed or failed run was resumed
    fingerprint: str | None = None  # hash of the settings that shape the results (for resume)
    prefect_flow_run_id: str | None = None


def utcnow() -> datetime:
    return datetime.now(UTC)


def write_run_record(store: ArtifactStore, record: RunRecord) -> None:
    store.write_json(record.model_dump(mode="json"), *staging_dir(record.run_id), RUN_RECORD_NAME)


def resumable_run(
    store: ArtifactStore, catalog: str, run_date: date, fingerprint: str
) -> RunRecord | None:
    """The latest unfinished run (killed or failed) of this catalog and date with the same
    settings, whose staged work a new attempt can continue. Call it holding the catalog lock:
    then a record still marked `running` belongs to a run that died."""
    candidates = [
        r
        for r in run_records(store)
        if r.catalog == catalog
        and r.run_date == run_date
        and r.fingerprint == fingerprint
        and r.status in ("running", "failed")
    ]
    if not candidates:
        return None
    latest = candidates[-1]
    # Published meanwhile (killed between the manifest and the run log): nothing to resume.
    try:
        if read_manifest(store, catalog, run_date).run_id == latest.run_id:
            return None
    except (FileNotFoundError, CorruptArtifactError):
        pass  # a corrupt manifest is replaced when this date is published again
    return latest


def run_records(store: ArtifactStore) -> list[RunRecord]:
    """The run log, oldest first. A record that cannot be read (truncated by a crash of the
    machine, overwritten) is left out with a warning: its run is then neither resumed nor
    listed, and the next run starts afresh."""
    records = []
    for path in store.glob(f"runs/*/{RUN_RECORD_NAME}"):
        try:
            records.append(RunRecord.model_validate(store.read_json(store.relative(path))))
        except (CorruptArtifactError, ValueError) as exc:
            log.warning(
                "run log: %s is unreadable, left out (%s)", store.uri(store.relative(path)), exc
            )
    return sorted(records, key=lambda r: r.started_at)


def publish(
    store: ArtifactStore,
    manifest: Manifest,
    staged: dict[str, tuple[str, tuple[str, ...], int | None]],
) -> Manifest:
    """Move staged files to their published names, then write the manifest last.

    `staged` maps a file's role to (file name in staging, destination folder, row count).
    Returns the published manifest (with its `files`).
    """
    manifest.counts.check()  # before anything moves
    target = sids_dir(manifest.catalog, manifest.run_date)
    # Unpublish first: from here until the new manifest exists, readers see no run for this date
    # rather than a mix of old and new files.
    store.delete(*target, MANIFEST_NAME)
    files: dict[str, FileEntry] = {}
    for role, (name, dest, rows) in staged.items():
        # Streamed and hashed a block at a time: a 10M-item embeddings file never sits in memory.
        path, sha256, size = store.copy((*staging_dir(manifest.run_id), name), (*dest, name))
        files[role] = FileEntry(path=store.relative(path), sha256=sha256, bytes=size, rows=rows)
    manifest = manifest.model_copy(update={"files": files})
    store.write_json(manifest.model_dump(mode="json"), *target, MANIFEST_NAME)
    # Staging is done with: keep only the run record, the run log's line for this run.
    for path in store.listdir(*staging_dir(manifest.run_id)):
        if not path.endswith(RUN_RECORD_NAME):
            store.delete(store.relative(path))
    return manifest


def read_manifest(store: ArtifactStore, catalog: str, run_date: date | str) -> Manifest:
    """A run's manifest (FileNotFoundError: not published). `storage.published` resolves runs
    for readers, with what is missing when there is none."""
    return Manifest.model_validate(store.read_json(*sids_dir(catalog, run_date), MANIFEST_NAME))
