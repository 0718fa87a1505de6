"""AKT-Rec's flow: DIN's protocol drawn once, seven click models on the same rows, and metrics
anyone can recompute from predictions.parquet."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from sidpipe.cli import app
from sidpipe.models.ctr import CTR_MODELS, CTRConfig, CTRNet, ItemSide
from sidpipe.tasks.training.ctr_data import draw_samples

pytestmark = pytest.mark.usefixtures("prefect_api")


def test_the_protocol_holds_out_the_last_two_clicks_and_draws_unclicked_negatives():
    sequences = [np.array([0, 1, 2, 3, 4]), np.array([5, 6, 7])]
    splits = draw_samples(sequences, n_items=20, negatives=4, seed=1)
    again = draw_samples(sequences, n_items=20, negatives=4, seed=1)
    assert all(np.array_equal(splits[s].item, again[s].item) for s in splits)  # seeded
    test, valid, train = splits["test"], splits["valid"], splits["train"]
    assert len(test) == len(valid) == 2 * 5  # one positive + 4 negatives per user
    assert set(test.position[test.user == 0]) == {4} and set(valid.position[valid.user == 0]) == {3}
    assert set(train.position[train.user == 0]) == {1, 2} and not (train.user == 1).any()
    for rows in splits.values():
        for u, item, label in zip(rows.user, rows.item, rows.label, strict=True):
            assert (item in sequences[u]) == bool(label)  # negatives were never clicked
        assert rows.label.sum() * 4 == (rows.label == 0).sum()


def test_the_asymmetric_term_moves_tails_towards_heads_more_than_heads_towards_tails():
    codes = np.repeat(np.arange(8), 10)[:, None]  # 8 clusters of 10 items
    clicks = np.tile(np.r_[np.full(2, 50), np.ones(8)], 8)  # 2 head items per cluster
    torch.manual_seed(0)
    moved = {}
    for kind in ("aktrec", "aktrec-symmetric"):
        config = CTRConfig(dim=8, cluster_levels=1, head_share=0.2, l1=0.05, l2=0.5)
        net = CTRNet(kind, config, len(codes), ItemSide(codes, clicks, None, config))
        before = net.ids.weight.detach().clone()
        optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
        for _ in range(20):
            optimizer.zero_grad()
            net.transfer_loss().backward()
            optimizer.step()
        shift = (net.ids.weight.detach() - before).norm(dim=1)[: len(codes)]
        head = net.side.head
        moved[kind] = (shift[head].mean().item(), shift[~head].mean().item())
    head_shift, tail_shift = moved["aktrec"]
    assert tail_shift > 2 * head_shift > 0
    sym_head, sym_tail = moved["aktrec-symmetric"]
    assert sym_head > head_shift  # the symmetric ablation pulls heads as hard as tails


def recomputed_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Pairwise definition (ties half): an implementation independent of the pipeline's."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_seven_models_on_the_same_rows_with_metrics_recomputable_from_predictions(
    beauty_slice,
):
    result = CliRunner().invoke(
        app,
        [
            "train",
            "aktrec",
            "--config",
            "aktrec-cpu-small",
            "--store",
            beauty_slice["store"],
            "--catalog",
            "beauty-slice",
            "--interactions",
            beauty_slice["interactions"],
        ],
    )
    assert result.exit_code == 0, result.output
    root = Path(beauty_slice["store"]) / "training" / "aktrec"
    (run_dir,) = [p for p in root.iterdir() if p.name != "samples"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert list(metrics["summary"]) == list(CTR_MODELS)
    assert metrics["dropped_interactions"] == 0  # every slice item has a SID
    table = pq.read_table(run_dir / "predictions.parquet")
    col = {name: table[name].to_numpy(zero_copy_only=False) for name in table.column_names}
    assert table.num_rows == len(CTR_MODELS) * metrics["rows"]["test"]
    reference = None
    for run in metrics["runs"]:
        mine = (col["model"] == run["model"]) & (col["seed"] == run["seed"])
        rows = [col["user_id"][mine], col["item_id"][mine], col["label"][mine]]
        if reference is None:
            reference = rows
        assert all(np.array_equal(a, b) for a, b in zip(rows, reference, strict=True))
        labels, scores = col["label"][mine], col["score"][mine].astype(np.float64)
        assert recomputed_auc(labels, scores) == pytest.approx(run["test"]["auc"], abs=1e-6)
        users = col["user_id"][mine]
        weighted, impressions = 0.0, 0
        for user in np.unique(users):
            one = users == user
            if 0 < labels[one].sum() < one.sum():
                weighted += one.sum() * recomputed_auc(labels[one], scores[one])
                impressions += one.sum()
        assert weighted / impressions == pytest.approx(run["test"]["gauc"], abs=1e-6)
    with open(run_dir / "auc_by_popularity.png", "rb") as png:
        assert png.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "aktrec" in result.output and "± " in result.output


def test_bad_input_stops_before_training_with_one_error(beauty_slice, tmp_path):
    import pyarrow as pa

    deep = tmp_path / "deep.yaml"
    deep.write_text("base: aktrec-cpu-small\nmodel: {cluster_levels: 5}\n")
    wrong_time = tmp_path / "interactions.parquet"
    table = pq.read_table(beauty_slice["interactions"])
    pq.write_table(
        table.set_column(2, "timestamp", table["timestamp"].cast(pa.string())), wrong_time
    )
    common = ["train", "aktrec", "--store", beauty_slice["store"], "--catalog", "beauty-slice"]
    for extra, message in (
        (
            ["--config", str(deep), "--interactions", beauty_slice["interactions"]],
            "model.cluster_levels is 5, but the published SIDs of beauty-slice have 3 levels",
        ),
        (["--interactions", str(wrong_time)], "timestamp is string"),
    ):
        result = CliRunner().invoke(app, [*common, *extra])
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output
