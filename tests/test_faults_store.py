"""Fault matrix, part 2: the store misbehaves. An object store failing 20% of requests, one that
refuses writes (from the start, or from the middle of a run), a disk that fills up mid-publish,
and stored files that were truncated or overwritten. Each case: a clear error or a recomputation,
nothing partial published, and finishing the run gives the uninterrupted run's SIDs."""

from __future__ import annotations

import errno
import os
from datetime import date

import pytest
import s3fs
from conftest import FAULT_ORCHESTRATION, small_config
from s3_faults import FaultyS3
from typer.testing import CliRunner

from sidpipe.cli import app
from sidpipe.errors import CorruptArtifactError, StoreError
from sidpipe.storage.manifest import run_records
from sidpipe.storage.published import published_runs
from sidpipe.storage.store import ArtifactStore

pytestmark = [pytest.mark.faults, pytest.mark.usefixtures("prefect_api")]
DAY = date(2026, 11, 20)


def run_flow(config, day=DAY):
    from sidpipe.flows.nightly import nightly_tokenization

    return nightly_tokenization(config, run_date=day)


def config_for(store: str, catalog) -> object:
    return small_config(store, str(catalog), orchestration=FAULT_ORCHESTRATION)


def sids_of(store: ArtifactStore, manifest: dict) -> bytes:
    return store.read_bytes(manifest["files"]["sids"]["path"])


@pytest.fixture
def faulty_s3(s3, s3_server, monkeypatch):
    """The test bucket behind a fault-injecting proxy (no faults until a test asks)."""
    with FaultyS3(s3_server) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        s3fs.S3FileSystem.clear_instance_cache()
        yield proxy
    s3fs.S3FileSystem.clear_instance_cache()


# -- object store ---------------------------------------------------------------------------------
def test_an_object_store_failing_a_fifth_of_requests_loses_nothing(
    faulty_s3, s3, small_catalog, uninterrupted_sids
):
    faulty_s3.every = 5  # 500 / 503 SlowDown / 503 on 20% of requests
    config = config_for(f"{s3}/flaky", small_catalog)
    manifest = run_flow(config)

    assert faulty_s3.counts["SlowDown"] >= 10, faulty_s3.counts  # the faults did happen
    assert manifest["counts"] == {"input": 120, "assigned": 120, "quarantined": 0, "failed": 0}
    assert sids_of(ArtifactStore(config.store), manifest) == uninterrupted_sids


def test_an_object_store_that_refuses_writes_is_one_error_before_the_run(
    faulty_s3, s3, small_catalog
):
    faulty_s3.refuse_writes = True
    result = CliRunner().invoke(
        app, ["run", "--store", f"{s3}/denied", "--catalog", str(small_catalog)]
    )
    assert result.exit_code == 3, result.output
    assert result.output.startswith("error: cannot write") and "Access Denied" in result.output
    assert "Traceback" not in result.output and faulty_s3.counts["refused"] >= 1


def test_writes_refused_mid_run_fail_it_cleanly_and_the_next_run_finishes_it(
    faulty_s3, s3, small_catalog, uninterrupted_sids, monkeypatch
):
    config = config_for(f"{s3}/revoked", small_catalog)
    # The failed run cannot give its lease back (writes are refused): it lapses by itself.
    config.orchestration.lock_ttl_seconds, config.orchestration.lock_wait_seconds = 4, 60
    store = ArtifactStore(config.store)
    # Permissions are revoked when the tokenizer's weights are written (mid-run).
    original = ArtifactStore.write_bytes

    revoked = []

    def revoke_at_fit(self, data, *parts):
        if parts[-1] == "model.safetensors" and not revoked:
            faulty_s3.refuse_writes = True
            revoked.append(parts)
        return original(self, data, *parts)

    monkeypatch.setattr(ArtifactStore, "write_bytes", revoke_at_fit)
    with pytest.raises(StoreError, match="model.safetensors: Access Denied"):
        run_flow(config)  # the error is the write that failed, not the run log's
    assert published_runs(store) == []  # reading still works: nothing was published

    faulty_s3.refuse_writes = False  # access restored
    manifest = run_flow(config)
    assert manifest["attempts"] == 2 and manifest["stages"]["embed"]["resumed"] == 120
    assert sids_of(store, manifest) == uninterrupted_sids


# -- local disk -----------------------------------------------------------------------------------
def test_a_disk_that_fills_up_mid_publish_leaves_the_published_runs_whole(
    tmp_path, small_catalog, uninterrupted_sids, monkeypatch
):
    config = config_for(str(tmp_path / "store"), small_catalog)
    store = ArtifactStore(config.store)
    yesterday = run_flow(config, date(2026, 11, 19))
    original = ArtifactStore.copy  # publishing copies each staged file to its name

    def full_disk(self, source, target):
        if target[0] == "sids" and target[-1] != "sids.parquet":  # sids.parquet fits, then full
            raise StoreError(f"cannot write {self.uri(*target)}: {os.strerror(errno.ENOSPC)}")
        return original(self, source, target)

    monkeypatch.setattr(ArtifactStore, "copy", full_disk)
    with pytest.raises(StoreError, match="No space left on device"):
        run_flow(config)
    # Today is not published (no manifest: its copied sids.parquet is invisible); yesterday is.
    assert [m.run_date.isoformat() for m in published_runs(store)] == ["2026-11-19"]
    assert store.read_bytes(yesterday["files"]["sids"]["path"])

    monkeypatch.setattr(ArtifactStore, "copy", original)  # space freed
    today = run_flow(config)
    assert today["counts"]["assigned"] == 120 and today["attempts"] == 2
    assert [m.run_date.isoformat() for m in published_runs(store)] == ["2026-11-19", "2026-11-20"]


# -- corrupted files ------------------------------------------------------------------------------
def corrupt(path: str, how: str) -> None:
    data = open(path, "rb").read()
    if how == "truncate":
        data = data[: len(data) // 2]
    else:  # overwrite bytes in the middle: a bit rot the reader must notice
        middle = len(data) // 2
        data = (
            data[:middle]
            + bytes(b ^ 0xFF for b in data[middle : middle + 64])
            + data[middle + 64 :]
        )
    with open(path, "wb") as handle:
        handle.write(data)


@pytest.mark.parametrize("how", ["truncate", "overwrite"])
def test_a_corrupted_cache_part_is_dropped_and_recomputed(tmp_path, small_catalog, how):
    config = config_for(str(tmp_path / "store"), small_catalog)
    store = ArtifactStore(config.store)
    first = run_flow(config)
    parts = store.glob("cache/embed/*/part-*.parquet")
    corrupt(parts[0], how)

    second = run_flow(config, date(2026, 11, 21))
    embed = second["stages"]["embed"]
    assert 0 < embed["computed"] < 120 and embed["computed"] + embed["cached"] == 120
    again = store.read_parquet(second["files"]["sids"]["path"]).select(["item_id", "sid"])
    assert again.equals(
        store.read_parquet(first["files"]["sids"]["path"]).select(["item_id", "sid"])
    )


def test_a_corrupted_manifest_is_a_clear_error_and_publishing_again_replaces_it(
    tmp_path, small_catalog
):
    config = config_for(str(tmp_path / "store"), small_catalog)
    store = ArtifactStore(config.store)
    run_flow(config)
    corrupt(store.path("sids", "test-catalog", DAY.isoformat(), "_MANIFEST.json"), "truncate")

    shown = CliRunner().invoke(app, ["inspect", "test-catalog", "--store", config.store])
    assert shown.exit_code == 1 and "_MANIFEST.json is not valid JSON" in shown.output
    assert "Traceback" not in shown.output
    republished = run_flow(config)  # the same date again: a new run, published whole
    assert republished["counts"]["assigned"] == 120
    assert [m.run_id for m in published_runs(store)] == [republished["run_id"]]


def test_corrupted_tokenizer_weights_stop_the_run_instead_of_giving_wrong_sids(
    tmp_path, small_catalog
):
    config = config_for(str(tmp_path / "store"), small_catalog)
    store = ArtifactStore(config.store)
    first = run_flow(config)
    (weights,) = store.glob(f"tokenizers/{first['tokenizer_id']}/model.safetensors")
    corrupt(weights, "overwrite")

    with pytest.raises(CorruptArtifactError, match="does not match the sha256") as error:
        run_flow(config, date(2026, 11, 21))
    assert "--refit" in error.value.hint
    assert [m.run_date.isoformat() for m in published_runs(store)] == [DAY.isoformat()]


def test_a_corrupted_registry_is_a_clear_error(tmp_path, small_catalog):
    config = config_for(str(tmp_path / "store"), small_catalog)
    store = ArtifactStore(config.store)
    run_flow(config)
    corrupt(store.path("tokenizers", "_registry", "test-catalog.json"), "truncate")

    result = CliRunner().invoke(
        app,
        [
            "run",
            "--store",
            config.store,
            "--catalog",
            str(small_catalog),
            "--catalog-name",
            "test-catalog",
        ],
    )
    assert (
        result.exit_code == 1
        and "tokenizer registry of 'test-catalog' is unreadable" in result.output
    )
    assert "restore" in result.output and "Traceback" not in result.output


def test_a_truncated_run_record_is_left_out_and_the_next_run_starts_afresh(tmp_path, small_catalog):
    from conftest import kill_during_run

    config = config_for(str(tmp_path / "store"), small_catalog)
    store = ArtifactStore(config.store)
    killed = kill_during_run(config, "after:tokenizers/*/model.safetensors", DAY)
    assert killed.returncode == -9
    (record_path,) = store.glob("runs/*/_RUN.json")
    corrupt(record_path, "truncate")

    manifest = run_flow(config)
    assert manifest["attempts"] == 1 and manifest["counts"]["assigned"] == 120
    assert [r.status for r in run_records(store)] == ["published"]
