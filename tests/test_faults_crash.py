"""Fault matrix, part 1: the machine dies (SIGKILL) at every stage boundary and in the middle of
embed, fit, assign and publish. Each case: nothing is published by the killed run, its run log
says `running`, and the next run finishes it with counts that add up and a SID table
byte-identical to an uninterrupted run's."""

from __future__ import annotations

from datetime import date

import pytest
from conftest import FAULT_ORCHESTRATION, kill_during_run, small_config

from sidpipe.storage.manifest import run_records
from sidpipe.storage.published import published_runs, read_published, resolve_run
from sidpipe.storage.store import ArtifactStore

pytestmark = [pytest.mark.faults, pytest.mark.usefixtures("prefect_api")]
DAY = date(2026, 11, 20)

# (case, where the process dies): store paths are relative to the store root.
KILL_POINTS = [
    ("ingest|embed", "before:cache/embed/*/part-*"),
    ("mid-embed", "embed-shard:2"),
    ("embed|fit", "before:tokenizers/*/model.safetensors"),
    ("mid-fit", "after:tokenizers/*/model.safetensors"),
    ("fit|assign", "before:runs/*/sids.parquet"),
    ("mid-assign", "after:runs/*/sids.parquet"),
    ("assign|publish", "before:runs/*/errors.parquet"),
    ("mid-publish", "after:sids/*/*/sids.parquet"),
]


def run_flow(config):
    from sidpipe.flows.nightly import nightly_tokenization

    return nightly_tokenization(config, run_date=DAY)


def sids_bytes(store: ArtifactStore, manifest: dict) -> bytes:
    return store.read_bytes(manifest["files"]["sids"]["path"])


@pytest.mark.parametrize("point", [p for _, p in KILL_POINTS], ids=[c for c, _ in KILL_POINTS])
def test_a_run_killed_anywhere_is_finished_by_the_next_with_the_same_sids(
    tmp_path, small_catalog, point, uninterrupted_sids
):
    config = small_config(
        str(tmp_path / "store"), str(small_catalog), orchestration=FAULT_ORCHESTRATION
    )
    store = ArtifactStore(config.store)
    killed = kill_during_run(config, point, DAY)
    assert killed.returncode == -9, killed.stdout + killed.stderr[-3000:]
    # Killed: not published (even where sids.parquet was already copied), logged as running.
    assert published_runs(store) == []
    (record,) = run_records(store)
    assert record.status == "running" and record.attempts == 1

    resumed = run_flow(config)

    assert resumed["run_id"] == record.run_id and resumed["attempts"] == 2
    assert resumed["counts"] == {"input": 120, "assigned": 120, "quarantined": 0, "failed": 0}
    embed = resumed["stages"]["embed"]
    assert embed["computed"] + embed["cached"] + embed["resumed"] == 120
    assert sids_bytes(store, resumed) == uninterrupted_sids
    (record,) = run_records(store)  # one run, two attempts: no second record, no duplicate
    assert record.status == "published" and record.attempts == 2
    assert [m.run_id for m in published_runs(store)] == [record.run_id]
    # The published files are whole: each one's bytes match the manifest's sha256.
    manifest = resolve_run(store, "test-catalog", DAY.isoformat())
    for role in manifest.files:
        assert read_published(store, manifest, role)
    assert manifest.counts.model_dump() == resumed["counts"]
