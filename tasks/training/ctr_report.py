"""What a click-model comparison leaves behind: metrics.json, predictions.parquet, a PNG of AUC by
item-popularity decile (one line per model), a Prefect table artifact and a markdown report."""

from __future__ import annotations

import io

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from sidpipe.storage.layout import METRICS_FILE, PREDICTIONS_FILE, training_dir
from sidpipe.storage.store import ArtifactStore
from sidpipe.tasks.training.config import AKTRecTrainConfig
from sidpipe.tasks.training.ctr import SPLIT_NAMES, predictions_table, summarize
from sidpipe.tasks.training.ctr_data import CTRData
from sidpipe.tasks.training.ranking import machine

AUC_PNG = "auc_by_popularity.png"
FLOW = "aktrec"


def decile_png(results: list[dict], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for model in dict.fromkeys(r["model"] for r in results):
        curves = np.array([r["auc_by_decile"] for r in results if r["model"] == model], float)
        ax.plot(range(1, 11), np.nanmean(curves, 0), marker="o", label=model)
    ax.set(
        title=title,
        xlabel="item popularity decile (1 = most training clicks)",
        ylabel="test AUC (mean over seeds)",
        xticks=range(1, 11),
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    out = io.BytesIO()
    fig.tight_layout()
    fig.savefig(out, format="png", dpi=110)
    plt.close(fig)
    return out.getvalue()


def report_markdown(metrics: dict) -> str:
    lines = [
        f"### {metrics['config']}: click models on {metrics['published']['catalog']} "
        f"({metrics['rows']['test']:,} test rows, seeds {metrics['seeds']})",
        "",
        "| model | AUC | GAUC | logloss | head AUC | tail AUC | low-activity GAUC |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for model, s in metrics["summary"].items():
        lines.append(
            f"| {model} | {s['auc_mean']:.4f} ± {s['auc_std']:.4f} | "
            f"{s['gauc_mean']:.4f} ± {s['gauc_std']:.4f} | {s['logloss_mean']:.4f} | "
            f"{s['head_items']['auc_mean']:.4f} | {s['tail_items']['auc_mean']:.4f} | "
            f"{s['low_activity_users']['gauc_mean']:.4f} |"
        )
    return "\n".join(lines)


@task(name="report-click-models", cache_policy=NO_CACHE)
def report_task(
    store: ArtifactStore,
    config: AKTRecTrainConfig,
    run_id: str,
    data: CTRData,
    results: list[dict],
) -> dict:
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    where = training_dir(FLOW, run_id)
    store.write_parquet(predictions_table(data, results), *where, PREDICTIONS_FILE)
    metrics = {
        "config": config.name,
        "run_id": run_id,
        "published": data.training.published,
        "samples": data.samples_key,
        "rows": {s: len(rows) for s, rows in data.splits.items()},
        "dropped_interactions": data.training.dropped_interactions,  # items without a SID
        "seeds": config.seeds,
        "machine": machine(),
        "settings": config.model_dump(mode="json"),
        "summary": summarize(results),
        "runs": [{k: v for k, v in r.items() if k != "probabilities"} for r in results],
        "splits": {
            "head_items": f"top {config.model.head_share:.0%} of items by training clicks",
            "tail_items": "the other items",
            "low_activity_users": f"the {config.low_activity_share:.0%} of users with the "
            "fewest training clicks (ties included)",
        },
    }
    store.write_json(metrics, *where, METRICS_FILE)
    store.write_bytes(decile_png(results, f"{config.name}: AUC by popularity"), *where, AUC_PNG)
    create_table_artifact(
        [
            {"model": m, **{k: round(s[k], 4) for k in ("auc_mean", "auc_std", "gauc_mean")}}
            | {f"{p}_auc": round(s[p]["auc_mean"], 4) for p in SPLIT_NAMES}
            for m, s in metrics["summary"].items()
        ],
        key="aktrec-metrics",
        description=f"{config.name}: test metrics, mean over seeds {config.seeds}",
    )
    create_markdown_artifact(report_markdown(metrics), key="aktrec-report")
    return metrics
