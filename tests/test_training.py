"""The training flow end to end: a slice of Amazon Beauty is tokenized by the real pipeline,
then `sidpipe train genrec` trains on what was published and evaluates with the README's
protocol (leave-one-out, full ranking, constrained beam search)."""

from __future__ import annotations

import pytest
from conftest import BEAUTY_SLICE_USERS
from typer.testing import CliRunner

from sidpipe.cli import app
from sidpipe.storage.store import ArtifactStore
from sidpipe.tasks.training.config import load_train_config

pytestmark = pytest.mark.usefixtures("prefect_api")
USERS = BEAUTY_SLICE_USERS
METRIC_KEYS = {"recall@5", "recall@10", "ndcg@5", "ndcg@10", "invalid_rate"}


def train(beauty_slice, *extra: str):
    return CliRunner().invoke(
        app,
        [
            "train",
            "genrec",
            "--config",
            "cpu-small",
            "--store",
            beauty_slice["store"],
            "--catalog",
            "beauty-slice",
            "--interactions",
            beauty_slice["interactions"],
            "--epochs",
            "2",
            *extra,
        ],
    )


def small_config(beauty_slice, **overrides):
    """`cpu-small` on the published slice; overrides are sections ({"loop": {...}})."""
    return load_train_config(
        "cpu-small",
        store=beauty_slice["store"],
        data={"catalog": "beauty-slice", "interactions": beauty_slice["interactions"]},
        **overrides,
    )


def next_sid_steps(config) -> int:
    """Steps in a next-SID-only epoch: one per batch of training windows."""
    from sidpipe.tasks.training.data import load_training_data, split

    training = load_training_data(ArtifactStore(config.store), config.data)
    windows = len(split(training.data, config.data.max_history, "train"))
    return -(-windows // config.loop.batch_size)


def train_model(config):
    from sidpipe.tasks.training.ranking import train_model

    return train_model(ArtifactStore(config.store), config)


def latest_metrics(store: str, model: str) -> dict:
    s = ArtifactStore(store)
    runs = [p for p in s.listdir("training", "genrec") if p.endswith(model)]
    return s.read_json(s.relative(runs[-1]), "metrics.json"), s.relative(runs[-1])


def test_cpu_small_trains_on_published_sids_and_reports_the_protocol_metrics(beauty_slice):
    result = train(beauty_slice)
    assert result.exit_code == 0, result.output
    metrics, folder = latest_metrics(beauty_slice["store"], "tiger")
    assert METRIC_KEYS <= set(metrics)
    assert metrics["users"] == USERS and metrics["items"] == beauty_slice["items"]
    assert all(0 <= metrics[k] <= 1 for k in METRIC_KEYS)
    assert (
        metrics["ndcg@10"] <= metrics["recall@10"] and metrics["recall@5"] <= metrics["recall@10"]
    )
    # Constrained decoding only ever names catalog items ...
    assert metrics["predictions_valid"] is True
    # ... and ranks them as exact scoring of every item does, score for score.
    assert metrics["beam_exact_max_score_diff"] < 1e-3
    assert set(metrics["by_popularity"]) == {"head", "torso", "tail"}
    assert sum(b["users"] for b in metrics["by_popularity"].values()) == USERS
    store = ArtifactStore(beauty_slice["store"])
    assert store.exists(folder, "model.safetensors") and store.exists(folder, "history.json")
    predictions = store.read_parquet(folder, "predictions.parquet")
    assert predictions.num_rows == USERS
    assert all(len(top) == 10 for top in predictions["top10"].to_pylist())
    # The metrics are exactly what the published predictions give.
    from sidpipe.tasks.training.metrics import ranking_metrics

    recomputed = ranking_metrics(predictions["rank"].to_numpy())
    assert recomputed == {k: metrics[k] for k in recomputed}
    assert "R@10" in result.output and "invalid SIDs without the trie" in result.output


def test_a_trained_run_is_evaluated_again_from_its_folder_alone(beauty_slice):
    """The checkpoint carries its own config: no preset, no command line needed."""
    from sidpipe.tasks.training.ranking import evaluate_run

    metrics, folder = latest_metrics(beauty_slice["store"], "tiger")
    store = ArtifactStore(beauty_slice["store"])
    again, predictions = evaluate_run(store, "genrec", folder.rsplit("/", 1)[-1])
    assert {k: again[k] for k in METRIC_KEYS} == {k: metrics[k] for k in METRIC_KEYS}
    assert predictions.equals(store.read_parquet(folder, "predictions.parquet"))


def test_sasrec_baseline_runs_in_the_same_harness(beauty_slice):
    result = train(beauty_slice, "--model", "sasrec")
    assert result.exit_code == 0, result.output
    metrics, _ = latest_metrics(beauty_slice["store"], "sasrec")
    assert METRIC_KEYS <= set(metrics) and metrics["users"] == USERS
    assert metrics["invalid_rate"] == 0.0


def test_multitask_trains_every_task_the_published_artifacts_can_feed(beauty_slice):
    from sidpipe.flows.train_genrec import train_genrec

    config = small_config(
        beauty_slice,
        loop={"epochs": 1},
        model={"tasks": ["all"]},
        eval={"exact_check_users": 0},
    )
    metrics = train_genrec(config)
    # Titles and attributes (brand, categories) were published; captions and interests were
    # not (no model servers in this run), so the visual and interest tasks are left out.
    assert set(metrics["tasks"]) == {
        "next_sid",
        "title_to_sid",
        "sid_to_title",
        "attributes_to_sid",
        "history_titles_to_sid",
    }
    assert metrics["predictions_valid"] is True


def test_training_without_published_sids_says_what_to_run(tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "train",
            "genrec",
            "--config",
            "cpu-small",
            "--store",
            str(tmp_path),
            "--catalog",
            "beauty",
        ],
    )
    assert result.exit_code == 2
    assert "no published run of catalog 'beauty'" in result.output
    assert "sidpipe run --catalog-name beauty" in result.output and "Traceback" not in result.output


def test_a_time_budget_shorter_than_an_epoch_cuts_the_epoch_and_validates(beauty_slice):
    config = small_config(
        beauty_slice, loop={"epochs": 50, "eval_every": 10, "time_limit_minutes": 0.001}
    )
    trained = train_model(config)
    history = trained.history
    assert len(history) == 1 and "valid_ndcg@10" in history[0]  # validated where it stopped
    assert history[0]["cut_short"] and 1 <= history[0]["steps"] < next_sid_steps(config)


def test_a_time_budget_stops_before_an_epoch_that_would_not_fit(beauty_slice, monkeypatch):
    import time

    from sidpipe.tasks.training import loop

    class Clock:  # every reading of the clock costs one second: an epoch of N steps ~ N s
        now = 0.0

        def perf_counter(self):
            self.now += 1.0
            return self.now

        def __getattr__(self, name):
            return getattr(time, name)

    steps = next_sid_steps(small_config(beauty_slice))
    # Room for one and a half epochs: the second would not fit, so none is started.
    budget = 1.5 * (steps + 3) / 60
    config = small_config(
        beauty_slice, loop={"epochs": 50, "eval_every": 10, "time_limit_minutes": budget}
    )
    monkeypatch.setattr(loop, "time", Clock())
    history = train_model(config).history
    assert len(history) == 1 and history[0]["steps"] == steps and "cut_short" not in history[0]
    assert "valid_ndcg@10" in history[0]


def test_training_on_cpu_is_reproducible_with_a_seed(beauty_slice):
    import torch

    def run(seed: int):
        trained = train_model(small_config(beauty_slice, loop={"epochs": 1}, seed=seed))
        return trained.rec.module.state_dict(), trained.history

    first, again, other = run(7), run(7), run(8)
    assert first[0].keys() == again[0].keys()
    assert all(torch.equal(first[0][k], again[0][k]) for k in first[0])
    strip = [{k: v for k, v in row.items() if k != "seconds"} for row in first[1]]
    assert strip == [{k: v for k, v in row.items() if k != "seconds"} for row in again[1]]
    assert not all(torch.equal(first[0][k], other[0][k]) for k in first[0])


@pytest.mark.gpu
def test_cuda_training_with_bf16_autocast_matches_the_protocol(beauty_slice):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    from sidpipe.flows.train_genrec import train_genrec

    metrics = train_genrec(small_config(beauty_slice, loop={"epochs": 3}, device="cuda"))
    assert torch.cuda.get_device_name(0) == metrics["machine"]
    assert metrics["predictions_valid"] is True and metrics["invalid_rate"] <= 1
    assert metrics["beam_exact_max_score_diff"] < 0.05  # bf16 activations: looser than on CPU
