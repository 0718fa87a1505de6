"""The artifact store, the stage cache and atomic publish, on a local folder and on S3 (moto)."""

import hashlib
import os
from datetime import date

import numpy as np
import pyarrow as pa
import pytest

from sidpipe.errors import StoreError
from sidpipe.storage.cache import StageCache, stage_key
from sidpipe.storage.layout import MANIFEST_NAME, staging_dir
from sidpipe.storage.manifest import Counts, Manifest, StageStats, publish, read_manifest, utcnow
from sidpipe.storage.published import published_runs
from sidpipe.storage.store import ArtifactStore


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return ArtifactStore(str(tmp_path / "store"))
    return ArtifactStore(request.getfixturevalue("s3") + "/prefix")


def test_roundtrip_bytes_json_parquet(store):
    store.write_bytes(b"hello", "a", "b.bin")
    store.write_json({"x": 1}, "a", "c.json")
    store.write_parquet(pa.table({"v": [1, 2, 3]}), "a", "d.parquet")
    assert store.read_bytes("a", "b.bin") == b"hello"
    assert store.read_json("a", "c.json") == {"x": 1}
    assert store.read_parquet("a", "d.parquet")["v"].to_pylist() == [1, 2, 3]
    assert [p.rsplit("/", 1)[-1] for p in store.listdir("a")] == ["b.bin", "c.json", "d.parquet"]


def test_uri_is_readable_by_other_tools(store):
    store.write_parquet(pa.table({"v": [1]}), "t.parquet")
    uri = store.uri("t.parquet")
    assert uri.startswith("s3://") if store.protocol == "s3" else os.path.isabs(uri)


def test_failed_local_write_leaves_nothing_behind(tmp_path, monkeypatch):
    store = ArtifactStore(str(tmp_path))
    store.write_bytes(b"old", "f.bin")

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(StoreError, match="f.bin"):
        store.write_bytes(b"new but broken", "f.bin")
    assert store.read_bytes("f.bin") == b"old"
    assert os.listdir(tmp_path) == ["f.bin"]  # no temporary file left


def test_a_parquet_file_written_a_batch_at_a_time_and_copied_block_by_block(store, monkeypatch):
    monkeypatch.setattr("sidpipe.storage.store.COPY_BLOCK", 1000)  # many blocks, odd sizes
    batches = (pa.table({"v": list(range(i, i + 500))}) for i in range(0, 5000, 500))
    path, rows = store.write_parquet_batches(pa.schema([("v", pa.int64())]), batches, "a", "t")
    assert rows == 5000 and store.read_parquet("a", "t")["v"].to_pylist() == list(range(5000))
    copied, sha256, size = store.copy(("a", "t"), ("b", "t"))
    data = store.read_bytes("b", "t")
    assert data == store.read_bytes("a", "t") and size == len(data) > 3000
    assert sha256 == hashlib.sha256(data).hexdigest() and copied == store.path("b", "t")


def test_a_batch_writer_that_fails_midway_leaves_nothing_behind(tmp_path):
    store = ArtifactStore(str(tmp_path))

    def batches():
        yield pa.table({"v": [1]})
        raise OSError("disk full")

    with pytest.raises(StoreError, match="cannot write .*t.parquet: disk full"):
        store.write_parquet_batches(pa.schema([("v", pa.int64())]), batches(), "t.parquet")
    assert os.listdir(tmp_path) == []


def test_stage_cache_hits_only_what_was_stored(store):
    cache = StageCache(store, "embed", stage_key("embed", {"model": "m"}), {"model": "m"})
    assert cache.lookup(["a", "b"]) is None
    cache.put(pa.table({"input_hash": ["a", "b"], "value": [1, 2]}))
    cache.put(pa.table({"input_hash": ["c"], "value": [3]}))
    found = cache.lookup(["a", "c", "zz"])
    assert sorted(
        zip(found["input_hash"].to_pylist(), found["value"].to_pylist(), strict=True)
    ) == [
        ("a", 1),
        ("c", 3),
    ]
    assert store.read_json("cache", "embed", cache.key, "_KEY.json")["params"] == {"model": "m"}


def test_stage_cache_key_changes_with_any_parameter():
    assert stage_key("embed", {"model": "m", "v": 1}) != stage_key("embed", {"model": "m", "v": 2})
    assert stage_key("embed", {"a": 1, "b": 2}) == stage_key("embed", {"b": 2, "a": 1})


def test_stage_cache_returns_one_row_per_hash_even_if_stored_twice(store):
    cache = StageCache(store, "s", "k")
    cache.put(pa.table({"input_hash": ["a", "b"], "value": [1, 2]}))
    cache.put(pa.table({"input_hash": ["a"], "value": [1]}))  # e.g. two runs racing
    assert sorted(cache.lookup(["a", "b"])["input_hash"].to_pylist()) == ["a", "b"]


def _manifest(run_id="r1", day=date(2026, 11, 1), counts=None):
    now = utcnow()
    return Manifest(
        run_id=run_id,
        catalog="cat",
        run_date=day,
        started_at=now,
        finished_at=now,
        code_version={},
        config={},
        models={},
        inputs={},
        tokenizer_id="t",
        counts=counts or Counts(input=3, assigned=2, quarantined=1, failed=0),
        stages={"embed": StageStats(computed=2)},
    )


def test_publish_moves_staged_files_and_writes_manifest_last(store):
    store.write_parquet(pa.table({"item_id": ["a", "b"]}), *staging_dir("r1"), "sids.parquet")
    manifest = publish(
        store, _manifest(), {"sids": ("sids.parquet", ("sids", "cat", "2026-11-01"), 2)}
    )
    assert manifest.files["sids"].path == "sids/cat/2026-11-01/sids.parquet"
    assert manifest.files["sids"].rows == 2 and len(manifest.files["sids"].sha256) == 64
    assert read_manifest(store, "cat", "2026-11-01").files == manifest.files
    assert store.listdir(*staging_dir("r1")) == []
    assert [m.run_id for m in published_runs(store)] == ["r1"]


def test_a_run_without_manifest_is_invisible(store):
    store.write_parquet(pa.table({"item_id": ["a"]}), "sids", "cat", "2026-11-02", "sids.parquet")
    assert published_runs(store) == []


def test_counts_that_do_not_add_up_are_never_published(store):
    store.write_parquet(pa.table({"item_id": ["a"]}), *staging_dir("r2"), "sids.parquet")
    bad = _manifest("r2", counts=Counts(input=5, assigned=2, quarantined=1, failed=0))
    with pytest.raises(AssertionError, match="do not add up"):
        publish(store, bad, {"sids": ("sids.parquet", ("sids", "cat", "2026-11-01"), 1)})
    assert not store.exists("sids", "cat", "2026-11-01", MANIFEST_NAME)


def test_a_store_that_cannot_be_reached_is_one_clear_error(s3, monkeypatch):
    """No credentials (the README's s3:// example as a new user first runs it): one StoreError
    naming the URI, and from the CLI two lines and exit code 3, no traceback."""
    import s3fs
    from typer.testing import CliRunner

    from sidpipe.cli import app

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
    s3fs.S3FileSystem.clear_instance_cache()
    store = ArtifactStore(f"{s3}/prefix")
    with pytest.raises(StoreError, match=f"cannot read {s3}/prefix/x.json: .*credentials"):
        store.exists("x.json")
    result = CliRunner().invoke(app, ["inspect", "--store", f"{s3}/prefix"])
    assert result.exit_code == 3 and "credentials" in result.output
    assert "Traceback" not in result.output and "hint:" in result.output


def test_a_spilled_matrix_reads_back_any_rows_in_any_order():
    from sidpipe.storage.spill import SpilledRows

    rng = np.random.default_rng(0)
    x = rng.standard_normal((1000, 7)).astype(np.float32)
    with SpilledRows(1000, 7) as spilled:
        spilled.block = 64  # many blocks
        order = rng.permutation(1000)
        for part in np.array_split(order, 13):  # written in cache order, not row order
            spilled.write(part, x[part])
        assert np.array_equal(spilled[:], x) and np.array_equal(spilled[10:900], x[10:900])
        rows = rng.choice(1000, 300, replace=False)
        assert np.array_equal(spilled[rows], x[rows])
        keep = np.sort(rng.choice(1000, 500, replace=False))
        view = spilled.subset(keep)
        assert len(view) == 500 and np.array_equal(view[3:400], x[keep][3:400])
        assert np.array_equal(np.concatenate(list(view.chunks())), x[keep])
        assert np.array_equal(view[[5, 2, 9]], x[keep][[5, 2, 9]])
        assert view[[]].shape == (0, 7)
