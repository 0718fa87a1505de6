"""The one way a tokenizer is fitted, named, checked, stored and loaded.

Used by the pipeline's fit stage and by `sidpipe fit` (your own embeddings), so both give a
tokenizer the same id formula and the same folder layout:

    <folder>/model.safetensors  weights          <folder>/tokens.txt      <a_0> ... <c_1023>
    <folder>/fit_report.json    fit and quality  <folder>/quality.png     the quality picture
    <folder>/config.json        written last: id, method, architecture, settings, provenance

A tokenizer's id hashes everything that determines it: the algorithm version, the method, the
embedding space it was fitted in, the exact training data, the codebook sizes and every setting
that shapes the fit (including the seed). Fitting the same thing twice finds the first one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from sidpipe.config import TokenizerConfig
from sidpipe.errors import CorruptArtifactError, QualityGateError
from sidpipe.models.sids import codebook_tokens, sid_quality
from sidpipe.models.tokenizer import (
    ALGORITHM_VERSION,
    Tokenizer,
    fit_sample,
    fit_tokenizer,
    load_tokenizer_state,
    save_tokenizer,
    size_codebooks,
)
from sidpipe.progress import Progress
from sidpipe.storage.hashing import sha256_bytes, stable_hash
from sidpipe.storage.layout import (
    FIT_REPORT,
    QUALITY_PNG,
    TOKENIZER_CONFIG,
    TOKENIZER_WEIGHTS,
    TOKENS_FILE,
    tokenizer_dir,
)
from sidpipe.storage.manifest import utcnow
from sidpipe.storage.spill import SpilledRows
from sidpipe.storage.store import ArtifactStore
from sidpipe.tasks.report import quality_png

log = logging.getLogger(__name__)

# Settings that decide what happens around a fit, not what it learns: not part of the id.
LIFECYCLE_SETTINGS = {
    "refit",
    "collisions",
    "small_catalog",
    "min_level1_utilization",
    "min_distinct_tuple_rate",
    "warn_distinct_tuple_rate",
    "warn_max_bucket",
}


@dataclass
class FittedTokenizer:
    tokenizer_id: str
    tokenizer: Tokenizer
    codebook_sizes: list[int]
    sizing_message: str | None
    trained: bool  # False: an identical tokenizer was already stored and is reused
    report: dict  # the fit report (fit_report.json), {} when reused


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
        raise QualityGateError("tokenizer fit failed its quality gates: " + "; ".join(problems))


def load_tokenizer(
    store: ArtifactStore, tokenizer_id: str, folder: tuple[str, ...] | None = None
) -> tuple[Tokenizer, dict]:
    """A stored tokenizer and its config.json (any layout sidpipe has written)."""
    where = folder or tokenizer_dir(tokenizer_id)
    config = store.read_json(*where, TOKENIZER_CONFIG)
    weights = store.read_bytes(*where, TOKENIZER_WEIGHTS)
    expected = config.get("weights_sha256")  # None: written before checksums were recorded
    if expected is not None and sha256_bytes(weights) != expected:
        raise CorruptArtifactError(
            f"tokenizer {tokenizer_id}: {store.uri(*where, TOKENIZER_WEIGHTS)} does not match "
            "the sha256 its config.json recorded",
            hint="restore the tokenizer folder from a backup, or refit (`sidpipe run --refit`: "
            "a new version, SIDs change with a drift report)",
        )
    try:
        return load_tokenizer_state(weights, config["model"]), config
    except Exception as exc:  # noqa: BLE001 - unreadable weights: the same clear error
        raise CorruptArtifactError(
            f"tokenizer {tokenizer_id}: cannot load {store.uri(*where, TOKENIZER_WEIGHTS)} "
            f"({type(exc).__name__}: {str(exc)[:200]})",
            hint="restore the tokenizer folder from a backup, or refit (`sidpipe run --refit`)",
        ) from None


ENCODE_CHUNK = 65536  # rows per progress step; a multiple of every tokenizer's own batch size


def encode(tokenizer: Tokenizer, x: np.ndarray | SpilledRows, label: str = "encode") -> np.ndarray:
    """`tokenizer.encode(x)` with progress; the same codes (the same batches are formed)."""
    out = []
    with Progress(label, total=len(x), unit="items") as bar:
        for start in range(0, len(x), ENCODE_CHUNK):
            out.append(tokenizer.encode(x[start : start + ENCODE_CHUNK]))
            bar.advance(len(out[-1]))
    return np.concatenate(out) if out else tokenizer.encode(x[0:0])


def fit_and_store(
    store: ArtifactStore,
    x: np.ndarray | SpilledRows,
    config: TokenizerConfig,
    *,
    embed: dict,
    data_hash: str,
    trained_on: dict,
    folder: tuple[str, ...] | None = None,
) -> FittedTokenizer:
    """Fit a tokenizer on x [N, D] (or find the identical one already stored), check its quality
    gates, and store it in `folder` (default: `tokenizers/<tokenizer_id>/`).

    `embed` describes the embedding space (`key` is part of the id), `data_hash` the exact
    training rows, `trained_on` where they came from (recorded, not hashed). With
    `fit_sample_size`, the fit sees a seeded sample of x and every row of x is encoded; x may be
    a `SpilledRows`, read a block at a time (the same tokenizer and report as the whole matrix)."""
    fit_x = fit_sample(x, config.fit_sample_size, config.seed)
    sizes, message = size_codebooks(
        len(fit_x), config.codebook_sizes, config.min_points_per_code, config.small_catalog
    )
    if message:
        log.warning("fit: %s", message)
    settings = config.model_dump(exclude=LIFECYCLE_SETTINGS)
    identity = {
        "algorithm": ALGORITHM_VERSION,
        "method": config.method,
        "embed_key": embed["key"],
        "data": data_hash,
        "codebook_sizes": sizes,
        "settings": settings,
    }
    tokenizer_id = f"{config.method}-{stable_hash(identity, 16)}"
    where = folder or tokenizer_dir(tokenizer_id)
    if store.exists(*where, TOKENIZER_CONFIG):
        saved = store.read_json(*where, TOKENIZER_CONFIG)
        if saved.get("tokenizer_id") == tokenizer_id:
            try:
                tokenizer, _ = load_tokenizer(store, tokenizer_id, where)
            except CorruptArtifactError as exc:
                log.warning("fit: %s; fitting it again (the same settings and data)", exc)
            else:
                log.info(
                    "fit: tokenizer %s already trained on these embeddings; reusing it",
                    tokenizer_id,
                )
                return FittedTokenizer(tokenizer_id, tokenizer, sizes, message, False, {})

    log.info("fit: training %s on %d items, codebooks %s", tokenizer_id, len(fit_x), sizes)
    with Progress(f"fit {config.method}", total=None, unit="steps") as bar:

        def progress(done: int, total: int, losses: dict[str, float]) -> None:
            loss = f"loss {losses['total']:.4f}" if "total" in losses else None
            bar.update(done, status=loss, total=total)

        tokenizer, report = fit_tokenizer(fit_x, sizes, config, progress)
    report["fitted_on"] = len(fit_x)
    if report["left_out_of_fit"]:
        log.warning(
            "fit: %d of %d rows have norms over %gx the median: left out of the fit, encoded "
            "like the rest",
            report["left_out_of_fit"],
            len(fit_x),
            config.max_norm_ratio,
        )
    codes = encode(tokenizer, x, "fit: encode")
    quality = sid_quality(codes, sizes)
    quality["reconstruction_cosine_by_depth"] = tokenizer.reconstruction_cosine_by_depth(x)
    check_gates(quality, config)
    weights, architecture = save_tokenizer(tokenizer)
    store.write_bytes(weights, *where, TOKENIZER_WEIGHTS)
    store.write_text("\n".join(codebook_tokens(sizes)) + "\n", *where, TOKENS_FILE)
    store.write_json({**report, "quality": quality}, *where, FIT_REPORT)
    title = f"{tokenizer_id} (fit, {len(x):,} items)"
    store.write_bytes(quality_png(codes, quality, title), *where, QUALITY_PNG)
    store.write_json(
        {
            "tokenizer_id": tokenizer_id,
            "method": config.method,
            "model": architecture,
            "settings": settings,
            "requested_codebook_sizes": list(config.codebook_sizes),
            "codebook_sizes": sizes,
            "sizing_message": message,
            "embed": embed,
            "trained_on": {
                "items": len(x),
                "fitted_on": len(fit_x),
                "data_hash": data_hash,
                **trained_on,
            },
            "weights_sha256": sha256_bytes(weights),
            "created_at": utcnow().isoformat(),
        },
        *where,
        TOKENIZER_CONFIG,
    )
    return FittedTokenizer(tokenizer_id, tokenizer, sizes, message, True, report)
