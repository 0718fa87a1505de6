"""`sidpipe train ...`: the training flows, on what the tokenization flow published."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from sidpipe.cli.options import (
    DeviceOption,
    InteractionsOption,
    PublishedCatalogOption,
    PublishedDateOption,
    StoreOption,
)
from sidpipe.cli.render import console, print_click_metrics, print_ranking_metrics, print_rows
from sidpipe.errors import ConfigError

app = typer.Typer(
    help="Training flows that read the published artifacts.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.command("genrec")
def genrec(
    config: Annotated[
        str,
        typer.Option(
            "--config",
            "-c",
            help="Preset (cpu-small, beauty-cpu, beauty-multitask-cpu, beauty, "
            "beauty-multitask, sasrec-beauty) or a YAML file (`base: <preset>` to start "
            "from one).",
        ),
    ] = "cpu-small",
    store: StoreOption = None,
    catalog: PublishedCatalogOption = None,
    run_date: PublishedDateOption = None,
    interactions: InteractionsOption = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="tiger, sasrec or asymrec (another model than the preset's: its defaults)."
        ),
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="Most epochs (early stopping).")] = None,
    device: DeviceOption = None,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    time_limit_minutes: Annotated[
        float | None,
        typer.Option(
            help="Minutes to train: stops before an epoch that would not fit, and cuts an "
            "epoch longer than the whole budget."
        ),
    ] = None,
) -> None:
    """Train the TIGER-style generative recommender (or SASRec) on a catalog's published SIDs
    and evaluate it (leave-one-out, full ranking, constrained beam search)."""
    from sidpipe.cli import prefect_defaults

    prefect_defaults()
    from sidpipe.tasks.training.config import load_train_config

    cfg = load_train_config(
        config,
        "genrec",
        store=store or os.environ.get("SIDPIPE_STORE"),
        data={"catalog": catalog, "run_date": run_date, "interactions": interactions},
        model={"kind": model},
        loop={"epochs": epochs, "time_limit_minutes": time_limit_minutes},
        device=device,
        seed=seed,
    )
    from sidpipe.storage.store import existing_store
    from sidpipe.tasks.training.data import check_inputs

    check_inputs(existing_store(cfg.store), cfg.data)  # before Prefect's server starts

    from sidpipe.flows.train_genrec import train_genrec
    from sidpipe.tasks.training.ranking import metric_rows

    metrics = train_genrec(cfg)
    print_ranking_metrics(
        f"{cfg.name} ({cfg.model.kind}): {metrics['users']:,} test users, "
        f"{metrics['items']:,} items",
        metric_rows(metrics),
    )
    console.print(
        f"invalid SIDs without the trie: {metrics['invalid_rate']:.2%}; {metrics['epochs']} "
        f"epochs in {metrics['train_seconds']:.0f}s on {metrics['machine']}; "
        f"written to training/genrec/{metrics['run_id']}/"
    )


@app.command("aktrec")
def aktrec(
    config: Annotated[
        str,
        typer.Option(
            "--config",
            "-c",
            help="Preset (aktrec-cpu-small, aktrec-beauty, aktrec-gpu) or a YAML file "
            "(`base: <preset>` to start from one).",
        ),
    ] = "aktrec-cpu-small",
    store: StoreOption = None,
    catalog: PublishedCatalogOption = None,
    run_date: PublishedDateOption = None,
    interactions: InteractionsOption = None,
    models: Annotated[
        str | None,
        typer.Option(help="Comma-separated click models (default: the preset's, all seven)."),
    ] = None,
    seeds: Annotated[str | None, typer.Option(help="Comma-separated seeds.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Most epochs per model.")] = None,
    device: DeviceOption = None,
) -> None:
    """Compare click models on a catalog's published SIDs (DIN protocol, same rows and budget
    for every model): base, DIN, SID features concatenated, AKT-Rec and its three ablations."""
    from sidpipe.cli import prefect_defaults

    prefect_defaults()
    from sidpipe.storage.store import existing_store
    from sidpipe.tasks.training.config import load_train_config
    from sidpipe.tasks.training.ctr import check_published_levels
    from sidpipe.tasks.training.data import check_inputs

    cfg = load_train_config(
        config,
        "aktrec",
        store=store or os.environ.get("SIDPIPE_STORE"),
        data={"catalog": catalog, "run_date": run_date, "interactions": interactions},
        models=_split(models),
        seeds=_seeds(seeds),
        loop={"epochs": epochs},
        device=device,
    )
    artifact_store = existing_store(cfg.store)
    check_inputs(artifact_store, cfg.data)  # before Prefect's server starts
    check_published_levels(artifact_store, cfg)

    from sidpipe.flows.train_aktrec import train_aktrec

    metrics = train_aktrec(cfg)
    print_click_metrics(
        f"{cfg.name}: {metrics['rows']['test']:,} test rows, mean ± std over seeds {cfg.seeds}",
        metrics["summary"],
    )
    console.print(
        f"written to training/aktrec/{metrics['run_id']}/ (metrics.json, predictions.parquet, "
        "auc_by_popularity.png)"
    )


@app.command("asymrec")
def asymrec(
    config: Annotated[
        str,
        typer.Option(
            "--config",
            "-c",
            help="Preset (asymrec-cpu-small, asymrec-beauty-cpu, asymrec-beauty) or a YAML file "
            "(`base: <preset>` to start from one).",
        ),
    ] = "asymrec-cpu-small",
    store: StoreOption = None,
    catalog: PublishedCatalogOption = None,
    run_date: PublishedDateOption = None,
    interactions: InteractionsOption = None,
    models: Annotated[
        str | None,
        typer.Option(help="Comma-separated models of the preset to run (default: all of them)."),
    ] = None,
    time_limit_minutes: Annotated[
        float | None, typer.Option(help="Minutes of training per model (the shared budget).")
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="Most epochs per model.")] = None,
    device: DeviceOption = None,
) -> None:
    """Compare AsymRec (continuous inputs, multi-view codes as targets) with TIGER-style, its
    two ablations and SASRec: same data, protocol, cold items and budget; full ranking."""
    from sidpipe.cli import prefect_defaults

    prefect_defaults()
    from sidpipe.storage.store import existing_store
    from sidpipe.tasks.training.compare_report import table_rows
    from sidpipe.tasks.training.config import load_train_config
    from sidpipe.tasks.training.data import check_inputs

    cfg = load_train_config(
        config,
        "asymrec",
        store=store or os.environ.get("SIDPIPE_STORE"),
        data={"catalog": catalog, "run_date": run_date, "interactions": interactions},
        loop={"epochs": epochs, "time_limit_minutes": time_limit_minutes},
        device=device,
    )
    if models:
        unknown = sorted(set(_split(models)) - set(cfg.models))
        if unknown:
            raise ConfigError(
                f"--models: {', '.join(unknown)} not in {cfg.name}",
                hint=f"the preset's models: {', '.join(cfg.models)}",
            )
        cfg = cfg.model_copy(update={"models": {m: cfg.models[m] for m in _split(models)}})
    check_inputs(existing_store(cfg.store), cfg.data)  # before Prefect's server starts

    from sidpipe.flows.train_asymrec import train_asymrec

    metrics = train_asymrec(cfg)
    rows = table_rows(metrics["models"])
    quality = ("model", "recall@10", "ndcg@10", "head N@10", "tail N@10", "cold R@10")
    cost = ("model", "epochs", "stopped by", "seq/s", "ms/step", "peak MiB")
    print_rows(
        f"{cfg.name}: {metrics['users']:,} test users, {metrics['cold_items']:,} cold items",
        [{k: row[k] for k in quality} for row in rows],
    )
    print_rows("training cost", [{k: row[k] for k in cost} for row in rows])
    console.print(
        f"written to training/asymrec/{metrics['run_id']}/ (metrics.json, predictions.parquet, "
        "ndcg_by_popularity.png)"
    )


def _seeds(text: str | None) -> list[int] | None:
    try:
        return [int(s) for s in _split(text)] if text else None
    except ValueError:
        raise ConfigError(
            f"--seeds {text!r}: not whole numbers", hint="e.g. --seeds 42,43,44"
        ) from None


def _split(text: str | None) -> list[str] | None:
    return [part.strip() for part in text.split(",") if part.strip()] if text else None
