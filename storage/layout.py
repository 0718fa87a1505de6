"""Where every artifact lives in the store, and the columns of the tables other code reads.

The one place that names paths, file names and shared table schemas: stages, the CLI and the
training flows import them from here, never from each other. Paths are tuples of parts relative
to the store root (`ArtifactStore.path(*parts)` joins them).

    <root>/catalogs/<catalog>/<run_date>/      items.parquet, quarantine.parquet
    <root>/cache/<stage>/<stage_key>/          part-*.parquet, _KEY.json
    <root>/tokenizers/<tokenizer_id>/          model.safetensors, config.json, tokens.txt, ...
    <root>/tokenizers/_registry/<catalog>.json versions of a catalog's tokenizer, the pinned one
    <root>/sids/<catalog>/<run_date>/          sids.parquet, quality.json, ..., _MANIFEST.json
    <root>/runs/<run_id>/                      staging of an unpublished run, _RUN.json
    <root>/locks/<name>.lock|.json             who is writing a catalog now
    <root>/training/<flow>/<run_id>/           checkpoints, metrics, predictions

Knows names, never contents beyond the schemas below.
"""

from __future__ import annotations

from datetime import date

import pyarrow as pa

# -- folders -------------------------------------------------------------------------------------
LOCKS_DIR = "locks"
SHARDS_DIR = "shards"  # inside a run's staging folder


def catalog_dir(catalog: str, run_date: date) -> tuple[str, ...]:
    return ("catalogs", catalog, run_date.isoformat())


def sids_dir(catalog: str, run_date: date | str) -> tuple[str, ...]:
    day = run_date if isinstance(run_date, str) else run_date.isoformat()
    return ("sids", catalog, day)


def staging_dir(run_id: str) -> tuple[str, ...]:
    return ("runs", run_id)


def cache_dir(stage: str, key: str) -> tuple[str, ...]:
    return ("cache", stage, key)


def tokenizer_dir(tokenizer_id: str) -> tuple[str, ...]:
    return ("tokenizers", tokenizer_id)


def registry_path(catalog: str) -> tuple[str, ...]:
    return ("tokenizers", "_registry", f"{catalog}.json")


def catalog_source_path(catalog: str) -> tuple[str, ...]:
    return ("catalogs", "_sources", f"{catalog}.json")


def training_dir(flow: str, run_id: str, *parts: str) -> tuple[str, ...]:
    """A training run's folder (`parts`: one model's subfolder in a comparison run)."""
    return ("training", flow, run_id, *parts)


def shard_items_name(shard: int) -> str:
    return f"items-{shard:05d}.parquet"


# -- file names ----------------------------------------------------------------------------------
MANIFEST_NAME = "_MANIFEST.json"  # written last: a folder without one is not published
RUN_RECORD_NAME = "_RUN.json"  # the run log's entry of a run
ITEMS_FILE = "items.parquet"
QUARANTINE_FILE = "quarantine.parquet"
SIDS_FILE = "sids.parquet"
QUALITY_FILE = "quality.json"
QUALITY_PNG = "quality.png"
TOKENS_FILE = "tokens.txt"
ERRORS_FILE = "errors.parquet"
ENRICHMENT_FILE = "enrichment.parquet"  # captions and interests, for the training flows
EMBEDDINGS_FILE = "embeddings.parquet"  # item_id, embedding: the content view training flows use
QUALITY_MD = "quality.md"  # `sidpipe fit`'s report as markdown
# A tokenizer's folder:
TOKENIZER_WEIGHTS = "model.safetensors"
TOKENIZER_CONFIG = "config.json"  # written last: a folder without one is not a tokenizer
FIT_REPORT = "fit_report.json"
# A training run's folder (the checkpoint's weights are TOKENIZER_WEIGHTS' name too):
CHECKPOINT_WEIGHTS = "model.safetensors"
CHECKPOINT_CONFIG = "config.json"  # the run's whole config: evaluate it again from this alone
HISTORY_FILE = "history.json"
METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.parquet"

# Published files by role (the keys of a manifest's `files`), as people call them.
PUBLISHED_ROLES = {
    "items": f"normalized items ({ITEMS_FILE})",
    "quarantine": f"rejected rows ({QUARANTINE_FILE})",
    "sids": f"SID table ({SIDS_FILE})",
    "errors": f"per-item errors ({ERRORS_FILE})",
    "quality": f"quality report ({QUALITY_FILE})",
    "quality_png": f"quality plot ({QUALITY_PNG})",
    "tokens": f"token vocabulary ({TOKENS_FILE})",
    "enrichment": f"captions and interests ({ENRICHMENT_FILE})",
    "embeddings": f"item embeddings ({EMBEDDINGS_FILE})",
}

# -- columns -------------------------------------------------------------------------------------
INPUT_HASH = "input_hash"  # the key of a cached stage result

SID_SCHEMA = pa.schema(
    [
        ("item_id", pa.string()),
        ("codes", pa.list_(pa.int32())),
        ("suffix", pa.int32()),
        ("sid", pa.string()),
        ("tokenizer_id", pa.string()),
        ("first_assigned", pa.date32()),
        ("item_hash", pa.string()),
    ]
)
ERRORS_SCHEMA = pa.schema(
    [("item_id", pa.string()), ("stage", pa.string()), ("error", pa.string())]
)
QUARANTINE_SCHEMA = pa.schema(
    [("row", pa.int64()), ("item_id", pa.string()), ("reason", pa.string()), ("raw", pa.string())]
)
INDEX_SCHEMA = pa.schema([("item_id", pa.string()), (INPUT_HASH, pa.string())])
CAPTION_CACHE_SCHEMA = pa.schema([(INPUT_HASH, pa.string()), ("caption", pa.string())])
INTERESTS_CACHE_SCHEMA = pa.schema(
    [(INPUT_HASH, pa.string()), ("interests", pa.list_(pa.string())), ("reasoning", pa.string())]
)
ENRICHMENT_SCHEMA = pa.schema(
    [("item_id", pa.string()), ("caption", pa.string()), ("interests", pa.list_(pa.string()))]
)
