"""AsymRec's flow: MSP inputs, MHQ targets, cold items held out, five models in one run, and
metrics anyone can recompute from predictions.parquet."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from sidpipe.cli import app
from sidpipe.models.asymrec import AsymRecConfig, AsymRecNet
from sidpipe.models.mhq import collaborative_view, fit_view
from sidpipe.tasks.training.data import hold_out_cold
from sidpipe.tasks.training.metrics import BUCKETS, ranking_metrics

pytestmark = pytest.mark.usefixtures("prefect_api")
MODELS = ("tiger", "asymrec", "asymrec-no-msp", "asymrec-no-mhq", "sasrec")


def test_cold_items_leave_every_training_part_and_stay_targets():
    rng = np.random.default_rng(0)
    sequences = [rng.integers(0, 100, rng.integers(3, 15)) for _ in range(200)]
    users = [str(u) for u in range(200)]
    cold, kept_users, kept, dropped = hold_out_cold(100, users, sequences, 0.05, seed=7)
    again = hold_out_cold(100, users, sequences, 0.05, seed=7)[0]
    assert cold.sum() == 5 and np.array_equal(cold, again)  # a fixed, seeded 5%
    assert len(kept) + dropped == 200 and len(kept_users) == len(kept)
    assert all(not cold[seq[:-2]].any() for seq in kept)  # never in a training part
    originals = dict(zip(users, sequences, strict=True))
    for user, seq in zip(kept_users, kept, strict=True):
        assert len(seq) >= 3 and np.array_equal(seq[-2:], originals[user][-2:])  # targets kept
    assert any(cold[seq[-1]] for seq in kept)  # some test targets are cold items


def test_mhq_views_use_their_codes_and_map_cold_items_from_content():
    rng = np.random.default_rng(1)
    centers = rng.standard_normal((20, 48))
    content = (centers[rng.integers(0, 20, 600)] + 0.1 * rng.standard_normal((600, 48))).astype(
        np.float32
    )
    _, codes, report = fit_view(content, 8, [16, 16], steps=150, seed=3)
    _, again, _ = fit_view(content, 8, [16, 16], steps=150, seed=3)
    assert np.array_equal(codes, again)  # deterministic for a seed
    assert codes.shape == (600, 2) and min(report["usage"]) >= 0.9
    assert report["reconstruction_cosine"] > 0.7  # random codes: about 0
    sequences = [rng.integers(0, 550, 8) for _ in range(400)]  # items 550.. never interacted
    view, learned = collaborative_view(sequences, 600, content, dim=16)
    assert view.shape == (600, 16) and not learned[550:].any()
    assert np.abs(view[550:]).sum(1).min() > 0  # cold items still get a collaborative vector


def test_msp_mixes_experts_by_a_router_and_one_expert_is_a_plain_projection():
    content = np.random.default_rng(2).standard_normal((30, 12)).astype(np.float32)
    codes = np.random.default_rng(3).integers(0, 4, (30, 3))
    for experts in (1, 3):
        config = AsymRecConfig(d_model=16, heads=2, experts=experts)
        torch.manual_seed(0)
        net = AsymRecNet(content, codes, [4, 4, 4], config, max_history=5)
        assert (net.router is None) == (experts == 1)
        history = torch.tensor([[0, 0, 3, 7, 9], [1, 2, 3, 4, 5]])
        assert net.scores(history).shape == (2, 30)  # every catalog item scored
        loss = net(history, torch.tensor([[0, 0, 7, 9, 1], [2, 3, 4, 5, 6]]))
        loss.backward()
        assert torch.isfinite(loss) and net.experts.weight.grad.abs().sum() > 0


def test_an_item_no_training_sequence_held_borrows_its_nearest_seen_items_embeddings():
    content = np.random.default_rng(2).standard_normal((30, 12)).astype(np.float32)
    content[3] = 2 * content[10]  # the same direction: item 10 is item 3's nearest by cosine
    codes = np.random.default_rng(3).integers(0, 4, (30, 6))
    net = AsymRecNet(content, codes, [4] * 6, AsymRecConfig(d_model=16, levels=3), 5)
    trained = net.ranking_embeddings()
    unseen = np.zeros(30, bool)
    unseen[[3, 7]] = True
    net.mark_unseen(unseen, content)
    ranked = net.ranking_embeddings()
    warm = [i for i in range(30) if i not in (3, 7)]
    assert torch.equal(ranked[warm], trained[warm])
    assert not set(net.neighbour_index[[3, 7]].flatten().tolist()) & {3, 7}  # seen items only
    assert torch.allclose(net.neighbour_weight[[3, 7]].sum(1), torch.ones(2))
    assert net.neighbour_index[3, 0] == 10 and net.neighbour_weight[3, 0] > 0.99
    assert torch.allclose(ranked[3], trained[10], atol=1e-3)
    expected = (net.neighbour_weight[7, :, None] * trained[net.neighbour_index[7]]).sum(0)
    assert torch.allclose(ranked[7], expected)


def test_an_item_no_training_sequence_held_is_ranked_by_its_content_codes():
    content = np.random.default_rng(2).standard_normal((30, 12)).astype(np.float32)
    codes = np.random.default_rng(3).integers(0, 4, (30, 6))  # content view, then collaborative
    config = AsymRecConfig(d_model=16, levels=3, unseen_items="content")
    net = AsymRecNet(content, codes, [4] * 6, config, 5)
    trained = net.ranking_embeddings()
    net.unseen[[3, 7]] = True
    ranked = net.ranking_embeddings()
    warm = [i for i in range(30) if i not in (3, 7)]
    assert torch.equal(ranked[warm], trained[warm])
    content_only = net.code_embedding(net.codes[3, :3] + net.offsets[:3]).sum(0) * 2
    assert torch.allclose(ranked[3], content_only)
    net.config = net.config.model_copy(update={"unseen_items": "codes"})
    assert torch.equal(net.ranking_embeddings(), trained)


def test_the_item_residual_is_each_seen_items_own_and_never_ranks_an_unseen_item():
    content = np.random.default_rng(2).standard_normal((30, 12)).astype(np.float32)
    codes = np.random.default_rng(3).integers(0, 4, (30, 6))
    net = AsymRecNet(content, codes, [4] * 6, AsymRecConfig(d_model=16, levels=3), 5)
    assert torch.equal(net.item_embeddings(), net.code_sum())  # starts at 0
    loss = net(torch.tensor([[0, 0, 1, 2, 4]]), torch.tensor([[0, 0, 2, 4, 9]]))
    loss.backward()
    assert net.residual.weight.grad[[1, 3, 8]].abs().sum() > 0  # the targets' own rows train
    with torch.no_grad():
        net.residual.weight.normal_()
    unseen = np.zeros(30, bool)
    unseen[[3, 7]] = True
    net.mark_unseen(unseen, content)
    warm = [i for i in range(30) if i not in (3, 7)]
    for way in ("neighbours", "content", "codes"):
        net.config = net.config.model_copy(update={"unseen_items": way})
        ranked = net.ranking_embeddings()
        assert torch.equal(ranked[warm], net.item_embeddings()[warm])
        with torch.no_grad():
            net.residual.weight[[3, 7]] += 100.0  # an unseen item's own row: never used
        assert torch.allclose(net.ranking_embeddings(), ranked)
    plain = AsymRecNet(content, codes, [4] * 6, AsymRecConfig(d_model=16, item_residual=False), 5)
    assert plain.residual is None and torch.equal(plain.item_embeddings(), plain.code_sum())


def test_mhq_is_fitted_from_the_training_data_and_saved_with_the_weights():
    from sidpipe.errors import TrainingDataError
    from sidpipe.models.asymrec import AsymRecRecommender
    from sidpipe.models.recommender import RecData

    rng = np.random.default_rng(4)
    n = 80
    data = RecData(
        item_ids=[f"i{k:03d}" for k in range(n)],
        codes=rng.integers(0, 4, (n, 2)),
        suffix=np.zeros(n, np.int64),
        codebook_sizes=(4, 4),
        users=[str(u) for u in range(40)],
        sequences=[rng.integers(0, n, 6) for _ in range(40)],
        embeddings=rng.standard_normal((n, 24)).astype(np.float32),
    )
    config = AsymRecConfig(d_model=16, codebook_size=8, quantizer_steps=20)
    rec = AsymRecRecommender.build(config, data, max_history=5)
    state = rec.module.state_dict()
    assert {"quantizers.content.levels.0.codebook", "quantizers.collaborative.encoder.weight"} <= (
        set(state)
    )
    assert rec.module.codes.shape == (n, 6) and int(rec.module.codes.max()) < 5  # n / 16 codes
    again = AsymRecRecommender.build(config, data, max_history=5)
    assert torch.equal(again.module.codes, rec.module.codes)  # deterministic for a seed
    again.module.load_state_dict(state)
    published = AsymRecRecommender.build(
        config.model_copy(update={"targets": "published"}), data, 5
    )
    assert torch.equal(published.module.codes[:, :2], torch.from_numpy(data.codes))
    data.embeddings = None
    with pytest.raises(TrainingDataError, match="published content embeddings"):
        AsymRecRecommender.build(config, data, max_history=5)


def test_five_models_one_run_with_metrics_recomputable_from_predictions(beauty_slice, tmp_path):
    preset = tmp_path / "slice.yaml"
    preset.write_text(
        "base: asymrec-cpu-small\n"
        "loop: {epochs: 1}\n"
        "eval: {invalid_users: 20, exact_check_users: 2}\n"
        "models:\n"
        "  asymrec: {model: {codebook_size: 16, quantizer_steps: 50}}\n"
        "  asymrec-no-msp: {model: {codebook_size: 16, quantizer_steps: 50}}\n"
    )
    result = CliRunner().invoke(
        app,
        [
            "train",
            "asymrec",
            "--config",
            str(preset),
            "--store",
            beauty_slice["store"],
            "--catalog",
            "beauty-slice",
            "--interactions",
            beauty_slice["interactions"],
        ],
    )
    assert result.exit_code == 0, result.output
    (run_dir,) = (Path(beauty_slice["store"]) / "training" / "asymrec").iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert tuple(metrics["models"]) == MODELS
    assert metrics["cold_items"] == round(0.05 * beauty_slice["items"])
    table = pq.read_table(run_dir / "predictions.parquet").to_pydict()
    assert len(table["model"]) == len(MODELS) * metrics["users"]
    popularity = {}
    for model in MODELS:
        m = metrics["models"][model]
        assert m["stopped_by"] in ("patience", "time_limit", "epochs")
        assert m["sequences_per_second"] > 0 and m["peak_memory_mib"] > 0
        assert set(m["by_popularity"]) == set(BUCKETS) and m["cold_items"]["users"] > 0
        rows = [i for i, name in enumerate(table["model"]) if name == model]
        ranks = np.array([table["rank"][i] for i in rows])
        for i, rank in zip(rows, ranks, strict=True):  # the rank agrees with the list
            top = table["top10"][i]
            assert len(top) == 10 and len(set(top)) == 10
            if 0 <= rank < 10:  # ties count against the target: the list may place it higher
                assert table["target"][i] in top and top.index(table["target"][i]) <= rank
        for key, value in ranking_metrics(ranks).items():
            assert value == pytest.approx(m[key], abs=1e-12)
        buckets = np.array([table["target_popularity"][i] for i in rows])
        for bucket in BUCKETS:
            for key, value in ranking_metrics(ranks[buckets == bucket]).items():
                assert value == pytest.approx(m["by_popularity"][bucket][key], abs=1e-12)
        cold = np.array([table["target_cold"][i] for i in rows])
        assert cold.sum() == m["cold_items"]["users"]
        for key, value in ranking_metrics(ranks[cold]).items():
            assert value == pytest.approx(m["cold_items"][key], abs=1e-12)
        popularity[model] = [table["user_id"][i] for i in rows]
    assert len({tuple(users) for users in popularity.values()}) == 1  # same test users
    assert metrics["models"]["asymrec"]["model_summary"]["targets"]["content"]["usage"]
    assert metrics["models"]["asymrec-no-msp"]["model_summary"]["experts"] == 1
    assert "published" in metrics["models"]["asymrec-no-mhq"]["model_summary"]["targets"]
    assert set(metrics["gains_over_tiger"]) == set(MODELS) - {"tiger"}
    with open(run_dir / "ndcg_by_popularity.png", "rb") as png:
        assert png.read(8) == b"\x89PNG\r\n\x1a\n"
    assert (run_dir / "asymrec" / "model.safetensors").exists()
    assert "asymrec-no-mhq" in result.output and "cold" in result.output
    # scripts/asymrec_unseen.py rescores the saved checkpoint: its `neighbours` test ranks (the
    # default) are the run's own, and the other ways rank only cold targets differently.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from scripts.asymrec_unseen import WAYS, rescore
    from sidpipe.storage.store import ArtifactStore

    rescored = rescore(ArtifactStore(beauty_slice["store"]), run_dir.name)
    test = {r["way"]: r for r in rescored if r["split"] == "test"}
    assert set(test) == set(WAYS) and len(rescored) == 2 * len(WAYS)
    rows = [i for i, name in enumerate(table["model"]) if name == "asymrec"]
    assert np.array_equal(test["neighbours"]["ranks"], [table["rank"][i] for i in rows])
    assert test["neighbours"]["recall@10"] == pytest.approx(
        metrics["models"]["asymrec"]["recall@10"]
    )
    assert test["content x3"]["cold_median_rank"] <= test["content x1"]["cold_median_rank"]
    # SASRec too: `neighbours`, its default, is the run's own ranking; `own` is the other way.
    store = ArtifactStore(beauty_slice["store"])
    test = {r["way"]: r for r in rescore(store, run_dir.name, "sasrec") if r["split"] == "test"}
    assert set(test) == {"own", "neighbours"}
    rows = [i for i, name in enumerate(table["model"]) if name == "sasrec"]
    assert np.array_equal(test["neighbours"]["ranks"], [table["rank"][i] for i in rows])
    cold = metrics["models"]["sasrec"]["cold_items"]["recall@10"]
    assert test["neighbours"]["cold_recall@10"] == pytest.approx(cold)


def test_an_unknown_model_or_missing_embeddings_is_one_line(beauty_slice):
    common = ["train", "asymrec", "--store", beauty_slice["store"], "--catalog", "beauty-slice"]
    result = CliRunner().invoke(app, [*common, "--models", "sasrec,bert4rec"])
    assert result.exit_code != 0
    assert "bert4rec not in asymrec-cpu-small" in result.output
    assert "Traceback" not in result.output
