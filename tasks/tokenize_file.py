"""`sidpipe fit`: tokenize your own embeddings, without the pipeline around them.

Reads a Parquet file of (item_id, embedding), sets aside what cannot be tokenized (duplicates,
missing or broken vectors) with a reason, fits a tokenizer the one way the pipeline does
(`tasks.fitting`: same id formula, same files) and writes, under the output folder or s3://
prefix, what a published run holds for its SIDs:

    tokenizer/          model.safetensors, config.json, tokens.txt, fit_report.json, quality.png
    sids.parquet        the SID table (suffix or reassign collisions)
    tokens.txt          the token vocabulary, collision suffixes included
    quality.json|md|png the quality report of the table
    quarantine.parquet  item_id, reason of every row set aside
"""

from __future__ import annotations

import logging

import pyarrow as pa

from sidpipe.config import TokenizerConfig
from sidpipe.errors import EmbeddingInputError
from sidpipe.models.sid_table import assign_sids, table_quality
from sidpipe.models.sids import codebook_tokens, quality_markdown, quality_warnings, suffix_tokens
from sidpipe.models.tokenizer import read_embeddings_parquet, screen_embeddings, stack_embeddings
from sidpipe.storage.hashing import hash_strings, sha256_bytes
from sidpipe.storage.layout import (
    QUALITY_FILE,
    QUALITY_MD,
    QUALITY_PNG,
    QUARANTINE_FILE,
    SIDS_FILE,
    TOKENS_FILE,
)
from sidpipe.storage.manifest import utcnow
from sidpipe.storage.store import ArtifactStore, open_filesystem
from sidpipe.tasks.fitting import encode, fit_and_store
from sidpipe.tasks.report import quality_png

log = logging.getLogger(__name__)
TOKENIZER_FOLDER = ("tokenizer",)


def tokenize_file(embeddings_uri: str, out_uri: str, config: TokenizerConfig) -> dict:
    """Fit, assign and write everything under `out_uri`; returns the quality report."""
    fs, path = open_filesystem(embeddings_uri)
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        raise EmbeddingInputError(f"embeddings file not found: {embeddings_uri}") from None
    try:
        ids, vectors = read_embeddings_parquet(data)
    except EmbeddingInputError as exc:
        raise EmbeddingInputError(f"{embeddings_uri}: {exc.message}") from None
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

    out = ArtifactStore(out_uri)
    fitted = fit_and_store(
        out,
        x,
        config,
        embed={"key": f"file-{sha256_bytes(data)[:16]}", "source": embeddings_uri},
        data_hash=hash_strings(ids),
        trained_on={"embeddings": embeddings_uri},
        folder=TOKENIZER_FOLDER,
    )
    tokenizer, sizes = fitted.tokenizer, fitted.codebook_sizes
    nearby = None
    if config.collisions == "reassign":

        def nearby(rows, count):
            return tokenizer.nearby_tuples(x[rows], count)

    codes = encode(tokenizer, x)
    table, stats = assign_sids(
        ids,
        codes,
        fitted.tokenizer_id,
        utcnow().date(),
        None,
        None,
        nearby,
        config.reassign_max_loss,
    )
    final_codes, quality = table_quality(table, stats, tokenizer, x, sizes, config.collisions)
    quality |= {
        "tokenizer_id": fitted.tokenizer_id,
        "method": config.method,
        "sizing_message": fitted.sizing_message,
        "quarantined": len(quarantine),
        "fit_seconds": fitted.report.get("seconds"),
    }
    quality["warnings"] = quality_warnings(
        quality, config.warn_distinct_tuple_rate, config.warn_max_bucket
    )
    tokens = codebook_tokens(sizes) + suffix_tokens(len(sizes), quality["max_suffix"])
    out.write_text("\n".join(tokens) + "\n", TOKENS_FILE)
    out.write_parquet(table, SIDS_FILE)
    out.write_parquet(
        pa.table(
            {"item_id": [q[0] for q in quarantine], "reason": [q[1] for q in quarantine]},
            schema=pa.schema([("item_id", pa.string()), ("reason", pa.string())]),
        ),
        QUARANTINE_FILE,
    )
    out.write_json(quality, QUALITY_FILE)
    out.write_text(quality_markdown(quality) + "\n", QUALITY_MD)
    title = f"{fitted.tokenizer_id} ({len(ids):,} items)"
    out.write_bytes(quality_png(final_codes, quality, title), QUALITY_PNG)
    return quality
