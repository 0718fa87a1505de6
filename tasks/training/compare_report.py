"""The report of a model comparison: `training/<flow>/<run_id>/` gets

    metrics.json          per model: Recall/NDCG@5/10 overall, by popularity (head/torso/tail),
                          on cold items; epochs, what stopped training, cost (sequences/s, ms a
                          step, peak memory); AsymRec's gains over TIGER-style; the settings
    predictions.parquet   one row per model and test user: model, user_id, target, rank, top10
    ndcg_by_popularity.png
and the `<flow>-metrics` table and `<flow>-report` markdown Prefect artifacts.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
from prefect import task
from prefect.cache_policies import NO_CACHE

from sidpipe.storage.layout import METRICS_FILE, PREDICTIONS_FILE, training_dir
from sidpipe.storage.store import ArtifactStore
from sidpipe.tasks.training.compare import cold_items_count, relative_gain
from sidpipe.tasks.training.config import AsymRecTrainConfig
from sidpipe.tasks.training.data import TrainingData
from sidpipe.tasks.training.metrics import BUCKETS
from sidpipe.tasks.training.ranking import machine

NDCG_PNG = "ndcg_by_popularity.png"
KEYS = ("recall@5", "recall@10", "ndcg@5", "ndcg@10")


def bucket_png(models: dict[str, dict], title: str) -> bytes:
    """Grouped bars: test NDCG@10 per popularity bucket and on cold items, one bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [*BUCKETS, "cold items"]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(models)
    for i, (label, m) in enumerate(models.items()):
        rows = [m["by_popularity"][b] for b in BUCKETS] + [m.get("cold_items", {})]
        values = [row.get("ndcg@10", 0.0) for row in rows]
        ax.bar(np.arange(len(groups)) + i * width, values, width, label=label)
    ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2, groups)
    ax.set(title=title, ylabel="test NDCG@10", xlabel="target item (training popularity)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    out = io.BytesIO()
    fig.tight_layout()
    fig.savefig(out, format="png", dpi=110)
    plt.close(fig)
    return out.getvalue()


def table_rows(models: dict[str, dict]) -> list[dict]:
    rows = []
    for label, m in models.items():
        row = {"model": label, **{k: round(m[k], 4) for k in KEYS}}
        row |= {f"{b} N@10": round(m["by_popularity"][b]["ndcg@10"], 4) for b in BUCKETS}
        row["cold R@10"] = round(m.get("cold_items", {}).get("recall@10", 0.0), 4)
        row |= {
            "epochs": m["epochs"],
            "stopped by": m["stopped_by"],
            "seq/s": round(m["sequences_per_second"], 1),
            "ms/step": round(m["ms_per_step"], 1),
            "peak MiB": round(m["peak_memory_mib"]),
        }
        rows.append(row)
    return rows


def report_markdown(metrics: dict) -> str:
    rows = table_rows(metrics["models"])
    head = list(rows[0])
    lines = [
        f"### {metrics['config']}: {len(rows)} models on {metrics['published']['catalog']}",
        f"{metrics['users']:,} test users, {metrics['items']:,} items "
        f"({metrics['cold_items']:,} cold), on {metrics['machine']}",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    lines += ["| " + " | ".join(str(r[k]) for k in head) + " |" for r in rows]
    for key, gain in metrics["gains_over_tiger"].items():
        lines.append(
            f"\n{key}: " + ", ".join(f"{k} {v:+.1%}" for k, v in gain.items() if v is not None)
        )
    return "\n".join(lines)


@task(name="report-comparison", cache_policy=NO_CACHE)
def report_task(
    store: ArtifactStore,
    config: AsymRecTrainConfig,
    flow: str,
    run_id: str,
    training: TrainingData,
    results: list[tuple[dict, pa.Table]],
) -> dict:
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    where = training_dir(flow, run_id)
    models = {m["model"]: m for m, _ in results}
    store.write_parquet(pa.concat_tables([p for _, p in results]), *where, PREDICTIONS_FILE)
    gains = {
        label: {k: relative_gain(models, label, "tiger", k) for k in ("recall@10", "ndcg@10")}
        for label in models
        if label != "tiger" and "tiger" in models
    }
    metrics = {
        "config": config.name,
        "run_id": run_id,
        "published": training.published,
        "machine": machine(),
        "users": next(iter(models.values()))["users"],
        "items": training.data.n_items,
        "cold_items": cold_items_count(training),
        "cold_dropped_users": training.cold_dropped_users,
        "dropped_interactions": training.dropped_interactions,
        "models": models,
        "gains_over_tiger": gains,
        "settings": config.model_dump(mode="json"),
    }
    store.write_json(metrics, *where, METRICS_FILE)
    title = f"{config.name}: test NDCG@10 by target popularity"
    store.write_bytes(bucket_png(models, title), *where, NDCG_PNG)
    create_table_artifact(
        table_rows(models),
        key=f"{flow}-metrics",
        description=f"{config.name}: test metrics and cost per model, run {run_id}",
    )
    create_markdown_artifact(report_markdown(metrics), key=f"{flow}-report")
    return metrics
