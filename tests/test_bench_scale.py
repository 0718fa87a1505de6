"""bench/tokenizer_scale.py: the synthetic catalog is seeded and long-tailed, and every method
(the peer included) fits on a sample and encodes every item, streamed from the float16 file."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import tokenizer_scale as bench  # noqa: E402


@pytest.fixture
def small(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "CACHE", tmp_path)
    monkeypatch.setattr(bench, "SIZES", [16, 8, 8])
    monkeypatch.setattr(bench, "SHARD", 70)  # 560 rows of 32-d a shard: several shards


def test_the_catalog_is_seeded_with_duplicates_and_outliers(small):
    x = bench.synthetic(3000, 32)
    assert x.dtype == np.float16 and x.shape == (3000, 32)
    again = bench.synthetic(3000, 32)  # read back from the cache
    assert np.array_equal(np.asarray(x), np.asarray(again))
    norms = np.linalg.norm(np.asarray(x, np.float32), axis=1)
    assert (norms > 40).sum() >= 3  # 0.1% per shard: outliers
    assert len(np.unique(np.asarray(x), axis=0)) <= 3000 - 25  # 1% exact duplicates


@pytest.mark.parametrize("method", ["rqkmeans-balanced", "faiss-rq"])
def test_a_method_fits_on_a_sample_and_encodes_everything(small, method):
    x = bench.synthetic(3000, 32)
    row = bench.run_method(method, x, fit_sample=1500, settings={})
    assert row["method"] == method
    assert 0 < row["distinct"] <= 1 and len(row["usage"]) == 3
    assert 0.3 < row["cosine"] <= 1 and row["encode_per_min"] > 0 and row["peak_rss_gb"] > 0
    if method == "faiss-rq":  # the peer has no reassign step
        assert "reassign" not in row
        return
    # `collisions: reassign` moves items to free tuples: more distinct, a little cosine lost, and
    # the moved items are counted. (3,000 items in 1,024 tuples: most move far, 0.05 lost.) A
    # cap on a move's cost (0.02 here) leaves the costliest on a suffix: fewer moves, less lost.
    limited, free = row["reassign"]
    assert (limited["max_loss"], free["max_loss"]) == (0.02, None)
    assert free["distinct"] > 5 * row["distinct"] > 0
    assert -0.1 < free["cosine_delta"] < 0 and free["cosine_delta"] < limited["cosine_delta"]
    assert abs(limited["cosine_delta"]) < 0.01  # (balanced codes: a move can even gain)
    assert 0 < limited["moved"] < free["moved"] and limited["declined"] > free["declined"]
    assert "max_loss None" in bench.line(row) and "kept a suffix" in bench.line(row)


def test_the_encode_ceiling_is_the_search_products_at_the_measured_rate(small):
    per_min, gflops = bench.encode_ceiling(32, rows=64, seconds=0.05)
    flops_per_item = 2 * 32 * sum(bench.SIZES)
    assert per_min > 0
    assert per_min == pytest.approx(gflops * 1e9 / flops_per_item * 60)


def test_the_fit_memory_benchmark_fits_the_same_tokenizer_both_ways(small, monkeypatch, capsys):
    """bench/fit_stage_memory.py: the spilled fit stage and the whole-matrix baseline (each
    run here in this process) fit the same tokenizer on the same embed-stage cache."""
    import json
    import shutil

    from bench import fit_stage_memory as memory

    monkeypatch.setattr(memory, "CACHE", bench.CACHE)
    monkeypatch.setattr(
        memory,
        "SETTINGS",
        {
            "method": "rqkmeans",
            "codebook_sizes": [8, 8, 8],
            "min_points_per_code": 4,
            "fit_sample_size": 1000,
        },
    )
    folder, outcome = memory.build(3000, 32)
    rows = []
    for way in ("whole", "spill"):
        shutil.rmtree(folder / "store" / "tokenizers", ignore_errors=True)
        memory.child(way, str(folder), outcome)
        rows.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert rows[0]["id"] == rows[1]["id"] and rows[0]["cos"] == rows[1]["cos"]
    assert all(r["gb"] > 0 for r in rows)


def test_the_publish_memory_benchmark_publishes_the_same_table_both_ways(
    small, monkeypatch, capsys
):
    """bench/publish_memory.py: the streamed embeddings.parquet (written a block at a time,
    copied and hashed 8 MB at a time) holds the same rows as the whole-table baseline."""
    import json

    import pyarrow.parquet as pq

    from bench import fit_stage_memory as memory
    from bench import publish_memory
    from sidpipe.storage import spill

    monkeypatch.setattr(memory, "CACHE", bench.CACHE)
    monkeypatch.setattr(spill, "BLOCK_ROWS", 700)  # several blocks, the last one short
    folder, outcome = memory.build(3000, 32)
    rows = {}
    for way in ("whole", "stream"):
        publish_memory.child(way, str(folder), outcome)
        rows[way] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    published = {w: folder / "store" / w / "embeddings.parquet" for w in rows}
    assert rows["whole"]["rows"] == rows["stream"]["rows"] == 3000
    assert pq.read_table(published["whole"]).equals(pq.read_table(published["stream"]))
    assert pq.ParquetFile(published["stream"]).metadata.num_row_groups == 5  # one per block
    assert rows["stream"]["bytes"] == published["stream"].stat().st_size


def test_the_kmeans_dims_benchmark_compares_every_variant_on_every_seed(small, monkeypatch, capsys):
    from bench import kmeans_dims

    x = np.asarray(bench.synthetic(600, 16), np.float32)
    monkeypatch.setattr(kmeans_dims, "beauty_embeddings", lambda: ([str(i) for i in range(600)], x))
    monkeypatch.setattr(kmeans_dims, "SIZES", [8, 8, 8])
    from sidpipe.models import balance

    seen = []
    calibrate = balance.calibrate_prices
    monkeypatch.setattr(
        balance,
        "calibrate_prices",
        lambda *a, **k: seen.append(balance.CAPACITY) or calibrate(*a, **k),
    )
    kmeans_dims.main()
    assert {1.0, 2.0, 3.0} <= set(seen)  # each variant fitted at its own capacity
    assert balance.CAPACITY == 3.0  # and the default is back afterwards
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "seed" not in line]
    assert len(rows) == 3 * len(kmeans_dims.VARIANTS)  # every variant, three seeds
    assert {line.split("|")[1].strip() for line in rows} == set(kmeans_dims.VARIANTS)
    ratios = [line for line in out.splitlines() if " / balanced, plain k-means: " in line]
    assert len(ratios) == len(kmeans_dims.VARIANTS) - 1
    for line in ratios:
        distinct = float(line.split("distinct ")[1].split("x")[0])
        cosine = float(line.split("cosine ")[1].split("x")[0])
        assert 0.5 < distinct < 2 and 0.5 < cosine < 2
