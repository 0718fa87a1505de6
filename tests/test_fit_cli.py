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
