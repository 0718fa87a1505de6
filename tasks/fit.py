"""fit: train the RQ-VAE tokenizer on the run's embeddings, or reuse the one already trained.

A tokenizer is stored at `<root>/tokenizers/<tokenizer_id>/` (model.safetensors, config.json,
tokens.txt, fit_report.json). Its id is a hash of everything that determines it: the embedding
stage key, the exact embeddings it was trained on, and the tokenizer settings (seed included). So
a re-run with unchanged inputs finds it and trains nothing; `config.json` is written last and
marks a complete tokenizer.
"""

from __future__ import annotations

import logging
import time

from prefect import get_run_logger, task

from sidpipe.config import PipelineConfig, TokenizerConfig
from sidpipe.models.rqvae import (
    RQVAE,
    RQVAEConfig,
    TrainConfig,
    fit_rqvae,
    load_rqvae,
    save_rqvae,
    size_codebooks,
)
from sidpipe.models.sids import codebook_tokens
from sidpipe.storage.hashing import hash_strings, stable_hash
from sidpipe.storage.manifest import StageStats, utcnow
from sidpipe.storage.store import ArtifactStore
from sidpipe.tasks.embed import load_embeddings
from sidpipe.tasks.stage import TASK_OPTIONS, RunInfo, StageOutcome

log = logging.getLogger(__name__)


class FitOutcome(StageOutcome):
    tokenizer_id: str = ""
    codebook_sizes: list[int] = []
    sizing_message: str | None = None


def tokenizer_dir(tokenizer_id: str) -> tuple[str, ...]:
    return ("tokenizers", tokenizer_id)


def fit_stage(
    store: ArtifactStore,
    run: RunInfo,
    embed: StageOutcome,
    config: TokenizerConfig,
    progress=None,
) -> FitOutcome:
    started = time.perf_counter()
    item_ids, hashes, x = load_embeddings(store, run, embed)
    sizes, message = size_codebooks(
        len(x), config.codebook_sizes, config.min_points_per_code, config.small_catalog
    )
    if message:
        log.warning("fit: %s", message)
    model_config = RQVAEConfig(
        input_dim=x.shape[1],
        codebook_sizes=sizes,
        hidden_dims=list(config.hidden_dims),
        latent_dim=config.latent_dim,
        commitment_weight=config.commitment_weight,
    )
    train = TrainConfig(
        epochs=config.epochs,
        batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        kmeans_iterations=config.kmeans_iterations,
        seed=config.seed,
    )
    identity = {
        "method": "rqvae",
        "embed_key": embed.key,
        "data": hash_strings(hashes),
        "model": model_config.__dict__,
        "train": train.__dict__,
    }
    tokenizer_id = f"rqvae-{stable_hash(identity, 16)}"
    where = tokenizer_dir(tokenizer_id)

    if store.exists(*where, "config.json"):
        log.info("fit: tokenizer %s already trained on these embeddings; reusing it", tokenizer_id)
        stats = StageStats(cached=len(x), seconds=time.perf_counter() - started)
    else:
        log.info("fit: training %s on %d items, codebooks %s", tokenizer_id, len(x), sizes)
        model, report = fit_rqvae(x, model_config, train, progress=progress)
        weights, model_json = save_rqvae(model)
        store.write_bytes(weights, *where, "model.safetensors")
        store.write_text("\n".join(codebook_tokens(sizes)) + "\n", *where, "tokens.txt")
        store.write_json(
            {
                **report.to_dict(),
                "reconstruction_cosine_by_depth": model.reconstruction_cosine_by_depth(x),
            },
            *where,
            "fit_report.json",
        )
        store.write_json(
            {
                "tokenizer_id": tokenizer_id,
                "method": "rqvae",
                "model": model_json,
                "train": train.__dict__,
                "requested_codebook_sizes": list(config.codebook_sizes),
                "codebook_sizes": sizes,
                "sizing_message": message,
                "embed": embed.model | {"key": embed.key},
                "trained_on": {
                    "items": len(x),
                    "data_hash": identity["data"],
                    "run_id": run.run_id,
                },
                "created_at": utcnow().isoformat(),
            },
            *where,
            "config.json",
        )
        stats = StageStats(computed=len(x), seconds=time.perf_counter() - started)
    return FitOutcome(
        stage="fit",
        key=tokenizer_id,
        stats=stats,
        tokenizer_id=tokenizer_id,
        codebook_sizes=sizes,
        sizing_message=message,
        model={
            "name": "rqvae",
            "tokenizer_id": tokenizer_id,
            "codebook_sizes": sizes,
            "requested_codebook_sizes": list(config.codebook_sizes),
            "sizing_message": message,
        },
    )


def load_tokenizer(store: ArtifactStore, tokenizer_id: str) -> tuple[RQVAE, dict]:
    where = tokenizer_dir(tokenizer_id)
    config = store.read_json(*where, "config.json")
    return load_rqvae(store.read_bytes(*where, "model.safetensors"), config["model"]), config


@task(name="fit", **TASK_OPTIONS)
def fit_task(config: PipelineConfig, run: RunInfo, embed: StageOutcome) -> FitOutcome:
    logger = get_run_logger()

    def progress(epoch: int, epochs: int, losses: dict[str, float]) -> None:
        if epoch == epochs or epoch % max(1, epochs // 5) == 0:
            logger.info(
                "fit: epoch %d/%d, loss %.4f (reconstruction %.4f)",
                epoch,
                epochs,
                losses.get("total", 0.0),
                losses.get("reconstruction", 0.0),
            )

    return fit_stage(ArtifactStore(config.store), run, embed, config.tokenizer, progress)
