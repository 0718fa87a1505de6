"""`sidpipe fit`: bring your own embeddings, get a tokenizer, SIDs and a quality report."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_tokenizer import clustered
from typer.testing import CliRunner

from sidpipe.cli import app


@pytest.fixture(autouse=True)
def wide_console():
    from sidpipe import cli

    width = cli.console.width
    cli.console.width = 200
    yield
    cli.console.width = width


def write_embeddings(path, ids, vectors):
    pq.write_table(pa.table({"item_id": ids, "embedding": vectors}), path)


def test_fit_writes_tokenizer_sids_report_and_quarantine(tmp_path):
    x = clustered(400, dim=16, centers=40)
    ids = [f"i{i}" for i in range(400)]
    vectors = [list(map(float, v)) for v in x]
    vectors[5] = [float("nan")] * 16
    vectors[6] = [0.0] * 16
    write_embeddings(tmp_path / "emb.parquet", ids + ["i7"], vectors + [vectors[7]])
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        [
            "fit",
            "--embeddings",
            str(tmp_path / "emb.parquet"),
            "--out",
            str(out),
            "--codebooks",
            "8,8",
            "--method",
            "rqkmeans",
            "--seed",
            "3",
        ],
    )
    assert result.exit_code == 0, result.output
    for name in (
        "tokenizer/model.safetensors",
        "tokenizer/config.json",
        "tokenizer/tokens.txt",
        "sids.parquet",
        "quality.json",
        "quality.md",
        "quality.png",
        "quarantine.parquet",
    ):
        assert (out / name).is_file(), name
    sids = pq.read_table(out / "sids.parquet")
    assert sids.num_rows == 398 and len(set(sids["sid"].to_pylist())) == 398
    reasons = dict(
        zip(*pq.read_table(out / "quarantine.parquet").to_pydict().values(), strict=True)
    )
    assert set(reasons) == {"i5", "i6", "i7"} and "duplicate" in reasons["i7"]
    assert "SID quality" in result.output

    again = CliRunner().invoke(
        app,
        [
            "fit",
            "--embeddings",
            str(tmp_path / "emb.parquet"),
            "--out",
            str(tmp_path / "out2"),
            "--codebooks",
            "8,8",
            "--method",
            "rqkmeans",
            "--seed",
            "3",
        ],
    )
    assert again.exit_code == 0
    assert (
        pq.read_table(tmp_path / "out2" / "sids.parquet")["sid"].to_pylist()
        == sids["sid"].to_pylist()
    )  # same inputs and seed: same SIDs


def test_fit_rejects_mixed_dimensions_clearly(tmp_path):
    write_embeddings(tmp_path / "e.parquet", ["a", "b"], [[1.0, 2.0], [1.0, 2.0, 3.0]])
    result = CliRunner().invoke(
        app, ["fit", "--embeddings", str(tmp_path / "e.parquet"), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 2 and "different dimensions" in result.output


def test_fit_refuses_too_few_items_for_the_codebooks(tmp_path):
    x = clustered(100, dim=8)
    write_embeddings(
        tmp_path / "e.parquet", [str(i) for i in range(100)], [list(map(float, v)) for v in x]
    )
    (tmp_path / "c.yaml").write_text("tokenizer:\n  small_catalog: refuse\n")
    result = CliRunner().invoke(
        app,
        [
            "fit",
            "--embeddings",
            str(tmp_path / "e.parquet"),
            "--out",
            str(tmp_path / "o"),
            "--codebooks",
            "256,256",
            "--config",
            str(tmp_path / "c.yaml"),
        ],
    )
    assert result.exit_code == 2 and "100 items cannot fill codebooks 256/256" in result.output


def test_fit_with_rqvae_and_reassign(tmp_path):
    x = clustered(300, dim=16, centers=10)
    write_embeddings(
        tmp_path / "e.parquet", [str(i) for i in range(300)], [list(map(float, v)) for v in x]
    )
    (tmp_path / "c.yaml").write_text(
        "tokenizer:\n  epochs: 5\n  hidden_dims: [32]\n  latent_dim: 8\n  min_points_per_code: 4\n"
    )
    result = CliRunner().invoke(
        app,
        [
            "fit",
            "--embeddings",
            str(tmp_path / "e.parquet"),
            "--out",
            str(tmp_path / "o"),
            "--codebooks",
            "8,8,8",
            "--collisions",
            "reassign",
            "--config",
            str(tmp_path / "c.yaml"),
        ],
    )
    assert result.exit_code == 0, result.output
    import json

    quality = json.loads((tmp_path / "o" / "quality.json").read_text())
    assert quality["collisions"]["reassigned"] > 0
    assert quality["distinct_tuple_rate"] > quality["collisions"]["before"]["distinct_tuple_rate"]
    assert np.isclose(quality["items"], 300)


def test_fit_on_a_sample_encodes_every_item(tmp_path):
    """tokenizer.fit_sample_size: the fit sees a seeded sample, every item gets a SID."""
    import json

    x = clustered(600, dim=16, centers=30)
    ids = [str(i) for i in range(600)]
    write_embeddings(tmp_path / "e.parquet", ids, [list(map(float, v)) for v in x])
    (tmp_path / "c.yaml").write_text("tokenizer:\n  fit_sample_size: 250\n")
    args = ["fit", "--embeddings", str(tmp_path / "e.parquet"), "--codebooks", "8,8"]
    args += ["--method", "rqkmeans", "--config", str(tmp_path / "c.yaml")]
    for out in ("a", "b"):
        result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / out)])
        assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "a" / "tokenizer" / "config.json").read_text())
    assert config["trained_on"]["items"] == 600 and config["trained_on"]["fitted_on"] == 250
    sids = pq.read_table(tmp_path / "a" / "sids.parquet")
    assert sorted(sids["item_id"].to_pylist()) == sorted(ids)
    again = pq.read_table(tmp_path / "b" / "sids.parquet")  # the same seeded sample
    assert sids.sort_by("item_id")["sid"].equals(again.sort_by("item_id")["sid"])
