"""fit: make sure the catalog has a tokenizer to encode with, training one only when needed.

The lifecycle (DESIGN.md guarantee 3, stable SIDs):
- the catalog's **pinned** tokenizer (see `storage.registry`) is reused by every nightly run, so
  existing items keep their SIDs; nothing is trained;
- with no pinned tokenizer (the first run) or with `tokenizer.refit`, a tokenizer is fitted on the
  run's embeddings, checked against the quality gates and stored; `assign` writes a drift report
  against the previous SIDs, and `publish` registers and pins the new version only once the run
  is published;
- a pinned tokenizer fitted on another embedding space (embedder or text template changed) is
  never used silently: the run stops and says to refit.

A tokenizer lives at `<root>/tokenizers/<tokenizer_id>/` (model.safetensors, config.json,
tokens.txt, fit_report.json, quality.png); its id hashes everything that determines it (method,
embedding key, the exact training data, every setting including the seed), and `config.json` is
written last.
"""

from __future__ import annotations

import logging
import time

from prefect import get_run_logger, task

from sidpipe.config import PipelineConfig, TokenizerConfig
from sidpipe.models.rqvae import size_codebooks
from sidpipe.models.sids import codebook_tokens, sid_quality
from sidpipe.models.tokenizer import (
    ALGORITHM_VERSION,
    Tokenizer,
    fit_tokenizer,
    load_tokenizer_state,
    save_tokenizer,
    screen_embeddings,
)
from sidpipe.storage.hashing import hash_strings, stable_hash
from sidpipe.storage.manifest import StageStats, utcnow
from sidpipe.storage.registry import read_registry
from sidpipe.storage.store import ArtifactStore
from sidpipe.tasks.embed import load_embeddings
from sidpipe.tasks.report import quality_png
from sidpipe.tasks.stage import TASK_OPTIONS, RunInfo, StageOutcome, write_errors

log = logging.getLogger(__name__)


class QualityGateError(RuntimeError):
    """A fitted tokenizer is below a configured quality threshold; it is not pinned."""


class TokenizerMismatchError(RuntimeError):
    """The pinned tokenizer was fitted on other embeddings than this run's."""


class FitOutcome(StageOutcome):
    tokenizer_id: str = ""
    method: str = ""
    codebook_sizes: list[int] = []
    sizing_message: str | None = None
    fitted: bool = False  # a new version was fitted (first run or refit): pinned on publish
    embed_key: str = ""
    parent: str | None = None  # the version pinned before this run


def tokenizer_dir(tokenizer_id: str) -> tuple[str, ...]:
    return ("tokenizers", tokenizer_id)


def load_tokenizer(store: ArtifactStore, tokenizer_id: str) -> tuple[Tokenizer, dict]:
    where = tokenizer_dir(tokenizer_id)
    config = store.read_json(*where, "config.json")
    return load_tokenizer_state(
        store.read_bytes(*where, "model.safetensors"), config["model"]
    ), config


def check_gates(quality: dict, config: TokenizerConfig) -> None:
    level1 = quality["levels"][0]["utilization"]
    problems = []
    if level1 < config.min_level1_utilization:
        problems.append(
            f"level-1 utilization {level1:.1%} < {config.min_level1_utilization:.0%} "
            "(tokenizer.min_level1_utilization)"
        )
    if quality["distinct_tuple_rate"] < config.min_distinct_tuple_rate:
        problems.append(
            f"distinct code tuples {quality['distinct_tuple_rate']:.1%} < "
            f"{config.min_distinct_tuple_rate:.0%} (tokenizer.min_distinct_tuple_rate)"
        )
    if problems:
        raise QualityGateError(
            "tokenizer fit failed its quality gates: "
            + "; ".join(problems)
            + ". Try smaller codebooks, more epochs or method rqkmeans."
        )


def fit_stage(
    store: ArtifactStore, run: RunInfo, embed: StageOutcome, config: TokenizerConfig, progress=None
) -> FitOutcome:
    started = time.perf_counter()
    item_ids, hashes, x = load_embeddings(store, run, embed)
    keep, rejects = screen_embeddings(item_ids, x)
    errors = write_errors(store, run, "fit", [(i, f"fit: {why}") for i, why in rejects])
    registry = read_registry(store, run.catalog)
    pinned = registry.version(registry.pinned) if registry.pinned else None

    if pinned is not None and not config.refit:
        if pinned.embed_key != embed.key:
            raise TokenizerMismatchError(
                f"the pinned tokenizer {pinned.tokenizer_id} was fitted on embeddings "
                f"{pinned.embed_key}, this run's are {embed.key} (embedder or text template "
                "changed). Refit with `sidpipe run --refit` (SIDs will change; a drift report "
                "is written) or restore the embedding settings."
            )
        log.info("fit: encoding with the pinned tokenizer %s (no training)", pinned.tokenizer_id)
        if pinned.method != config.method or len(pinned.codebook_sizes) != len(
            config.codebook_sizes
        ):
            log.warning(
                "fit: tokenizer settings differ from the pinned %s (%s, %d levels); they "
                "take effect only with a refit",
                pinned.tokenizer_id,
                pinned.method,
                len(pinned.codebook_sizes),
            )
        return FitOutcome(
            stage="fit",
            key=pinned.tokenizer_id,
            errors=errors,
            stats=StageStats(
                cached=len(keep), failed=len(rejects), seconds=time.perf_counter() - started
            ),
            tokenizer_id=pinned.tokenizer_id,
            method=pinned.method,
            codebook_sizes=pinned.codebook_sizes,
            parent=pinned.tokenizer_id,
            model={
                "name": pinned.method,
                "tokenizer_id": pinned.tokenizer_id,
                "codebook_sizes": pinned.codebook_sizes,
                "pinned": True,
            },
        )

    x = x[keep]
    data_hash = hash_strings([hashes[i] for i in keep])
    sizes, message = size_codebooks(
        len(x), config.codebook_sizes, config.min_points_per_code, config.small_catalog
    )
    if message:
        log.warning("fit: %s", message)
    settings = config.model_dump(
        exclude={
            "refit",
            "collisions",
            "small_catalog",
            "min_level1_utilization",
            "min_distinct_tuple_rate",
        }
    )
    identity = {
        "algorithm": ALGORITHM_VERSION,
        "method": config.method,
        "embed_key": embed.key,
        "data": data_hash,
        "codebook_sizes": sizes,
        "settings": settings,
    }
    tokenizer_id = f"{config.method}-{stable_hash(identity, 16)}"
    where = tokenizer_dir(tokenizer_id)

    if store.exists(*where, "config.json"):
        log.info("fit: tokenizer %s already trained on these embeddings; reusing it", tokenizer_id)
        stats = StageStats(
            cached=len(x), failed=len(rejects), seconds=time.perf_counter() - started
        )
    else:
        log.info(
            "fit: training %s (%s) on %d items, codebooks %s",
            tokenizer_id,
            config.method,
            len(x),
            sizes,
        )
        tokenizer, report = fit_tokenizer(x, config.method, sizes, config, progress)
        quality = sid_quality(tokenizer.encode(x), sizes)
        quality["reconstruction_cosine_by_depth"] = tokenizer.reconstruction_cosine_by_depth(x)
        check_gates(quality, config)
        weights, model_config = save_tokenizer(tokenizer)
        store.write_bytes(weights, *where, "model.safetensors")
        store.write_text("\n".join(codebook_tokens(sizes)) + "\n", *where, "tokens.txt")
        store.write_json({**report, "quality": quality}, *where, "fit_report.json")
        store.write_bytes(
            quality_png(
                tokenizer.encode(x), quality, title=f"{tokenizer_id} (fit, {len(x):,} items)"
            ),
            *where,
            "quality.png",
        )
        store.write_json(
            {
                "tokenizer_id": tokenizer_id,
                "method": config.method,
                "model": model_config,
                "settings": settings,
                "requested_codebook_sizes": list(config.codebook_sizes),
                "codebook_sizes": sizes,
                "sizing_message": message,
                "embed": embed.model | {"key": embed.key},
                "trained_on": {
                    "items": len(x),
                    "data_hash": data_hash,
                    "run_id": run.run_id,
                    "catalog": run.catalog,
                },
                "created_at": utcnow().isoformat(),
            },
            *where,
            "config.json",
        )
        stats = StageStats(
            computed=len(x), failed=len(rejects), seconds=time.perf_counter() - started
        )

    parent = pinned.tokenizer_id if pinned is not None else None
    return FitOutcome(
        stage="fit",
        key=tokenizer_id,
        errors=errors,
        stats=stats,
        tokenizer_id=tokenizer_id,
        method=config.method,
        codebook_sizes=sizes,
        sizing_message=message,
        fitted=True,
        embed_key=embed.key,
        parent=parent,
        model={
            "name": config.method,
            "tokenizer_id": tokenizer_id,
            "codebook_sizes": sizes,
            "requested_codebook_sizes": list(config.codebook_sizes),
            "sizing_message": message,
            "parent": parent,
            "pinned": True,
        },
    )


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


def fit_from_embeddings(
    embeddings_uri: str,
    out_uri: str,
    config: TokenizerConfig,
    progress=None,
) -> dict:
    """`sidpipe fit`: tokenize a Parquet of (item_id, embedding) into a folder or s3:// prefix.

    Writes tokenizer/ (model.safetensors, config.json, tokens.txt), sids.parquet, quality.json,
    quality.md, quality.png and quarantine.parquet (rows set aside, with reasons). Returns the
    quality report.
    """
    import pyarrow as pa

    from sidpipe.models.sids import quality_markdown, suffix_tokens
    from sidpipe.models.tokenizer import read_embeddings_parquet, stack_embeddings
    from sidpipe.storage.store import open_filesystem
    from sidpipe.tasks.assign import assign_sids, table_quality

    fs, path = open_filesystem(embeddings_uri)
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"embeddings file not found: {embeddings_uri}") from None
    ids, vectors = read_embeddings_parquet(data)
    quarantine: list[tuple[str, str]] = []
    seen: set[str] = set()
    unique = []
    for i, item_id in enumerate(ids):
        if item_id in seen:
            quarantine.append((item_id, "duplicate item_id (the first row is kept)"))
        elif vectors[i] is None:
            quarantine.append((item_id, "no embedding"))
            seen.add(item_id)
        else:
            seen.add(item_id)
            unique.append(i)
    ids, vectors = [ids[i] for i in unique], [vectors[i] for i in unique]
    x = stack_embeddings(vectors, ids)
    keep, rejects = screen_embeddings(ids, x)
    quarantine += rejects
    ids, x = [ids[i] for i in keep], x[keep]

    sizes, message = size_codebooks(
        len(x), config.codebook_sizes, config.min_points_per_code, config.small_catalog
    )
    if message:
        log.warning("fit: %s", message)
    tokenizer, report = fit_tokenizer(x, config.method, sizes, config, progress)
    codes = tokenizer.encode(x)
    quality = sid_quality(codes, sizes)
    quality["reconstruction_cosine_by_depth"] = tokenizer.reconstruction_cosine_by_depth(x)
    check_gates(quality, config)
    tokenizer_id = f"{config.method}-{stable_hash({'algorithm': ALGORITHM_VERSION, 'data': hash_strings(ids), 'sizes': sizes, 'settings': config.model_dump()}, 16)}"
    ranking = None
    if config.collisions == "reassign":

        def ranking(rows):
            return tokenizer.last_level_ranking(x[rows])

    table, stats = assign_sids(ids, codes, tokenizer_id, utcnow().date(), None, None, ranking)
    final_codes, final = table_quality(table, stats, tokenizer, x, sizes, config.collisions)
    final |= {
        "tokenizer_id": tokenizer_id,
        "method": config.method,
        "sizing_message": message,
        "quarantined": len(quarantine),
        "fit_seconds": report.get("seconds"),
    }

    out = ArtifactStore(out_uri)
    weights, model_config = save_tokenizer(tokenizer)
    out.write_bytes(weights, "tokenizer", "model.safetensors")
    out.write_text(
        "\n".join(codebook_tokens(sizes) + suffix_tokens(len(sizes), final["max_suffix"])) + "\n",
        "tokenizer",
        "tokens.txt",
    )
    out.write_parquet(table, "sids.parquet")
    out.write_parquet(
        pa.table(
            {"item_id": [q[0] for q in quarantine], "reason": [q[1] for q in quarantine]},
            schema=pa.schema([("item_id", pa.string()), ("reason", pa.string())]),
        ),
        "quarantine.parquet",
    )
    out.write_json(final, "quality.json")
    out.write_text(quality_markdown(final) + "\n", "quality.md")
    out.write_bytes(
        quality_png(final_codes, final, f"{tokenizer_id} ({len(ids):,} items)"), "quality.png"
    )
    out.write_json(
        {
            "tokenizer_id": tokenizer_id,
            "method": config.method,
            "model": model_config,
            "codebook_sizes": sizes,
            "requested_codebook_sizes": config.codebook_sizes,
            "sizing_message": message,
            "settings": config.model_dump(),
            "embeddings": embeddings_uri,
            "items": len(ids),
            "report": report,
            "created_at": utcnow().isoformat(),
        },
        "tokenizer",
        "config.json",
    )
    return final
