"""embed: one vector per item from its enriched text (and image, for multimodal backends).

Results are cached by (embedder + text template, the exact input the embedder reads), computed in
chunks that are cached as they finish, so a crash or retry resumes where it stopped and a re-run
with unchanged items computes nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import pyarrow as pa
from prefect import get_run_logger, task

from sidpipe.config import EmbedConfig, PipelineConfig
from sidpipe.models.embedders import (
    Embedder,
    EmbedInput,
    GMEServerEmbedder,
    SentenceTransformerEmbedder,
)
from sidpipe.models.item_text import item_text
from sidpipe.progress import Progress
from sidpipe.storage.cache import StageCache, stage_key
from sidpipe.storage.hashing import stable_hash
from sidpipe.storage.manifest import StageStats
from sidpipe.storage.store import ArtifactStore
from sidpipe.tasks.shards import run_shard, shard_limit
from sidpipe.tasks.stage import (
    TASK_OPTIONS,
    IngestOutcome,
    RunInfo,
    StageOutcome,
    failed_items,
    stage_values,
    write_errors,
    write_index,
)

log = logging.getLogger(__name__)

CHUNK_ITEMS = 8192  # items embedded (and cached) per chunk: bounds memory and lost work
TEXT_TEMPLATE_VERSION = "v1"


def make_embedder(
    config: EmbedConfig, allow_http_images: bool = False, allowed_image_hosts: Sequence[str] = ()
) -> Embedder:
    """The embedding backend for a config: GME over vLLM with a URL, else the CPU embedder."""
    if not config.urls:
        return SentenceTransformerEmbedder(batch_size=config.batch_size)
    return GMEServerEmbedder(config, allow_http_images, allowed_image_hosts)


def embed_stage(
    store: ArtifactStore,
    run: RunInfo,
    items: pa.Table,
    attributes: list[str],
    embedder: Embedder,
    config: EmbedConfig,
    captions: dict[str, str] | None = None,
    interests: dict[str, list[str]] | None = None,
    exclude: set[str] | None = None,
    label: str = "embed",
) -> StageOutcome:
    """Embed every item not in `exclude` (items that failed upstream), using the cache.
    `label` names the work in progress output (e.g. "embed shard 3")."""
    started = time.perf_counter()
    captions, interests, exclude = captions or {}, interests or {}, exclude or set()
    # The model and revision fix the dimension, so it is not part of the key (a server's model
    # reports its dimension only with the first vector).
    params = {
        "embedder": embedder.name,
        "revision": embedder.revision,
        "text_template": f"{TEXT_TEMPLATE_VERSION}/{config.text_template_version}",
    }
    key = stage_key("embed", params)
    cache = StageCache(store, "embed", key, params)

    ids, hashes, inputs, errors = [], [], [], []
    for item in items.to_pylist():
        item_id = item["item_id"]
        if item_id in exclude:
            continue
        inp = EmbedInput(
            item_text(item, attributes, captions.get(item_id), interests.get(item_id)),
            item.get("image"),
            item.get("image_fingerprint"),
        )
        key_fields = embedder.input_key(inp)
        if not (key_fields.get("text") or key_fields.get("image")):
            errors.append(
                (
                    item_id,
                    "nothing to embed: no text (and this embedder reads no "
                    "image); add a title or enable captioning",
                )
            )
            continue
        ids.append(item_id)
        hashes.append(stable_hash(key_fields))
        inputs.append(inp)

    cached, todo = cache.pending(hashes, inputs)
    n_computed = sum(1 for h in hashes if h in todo)
    log.info(
        "embed: %d items, %d cached, %d to compute with %s",
        len(ids),
        len(ids) - n_computed,
        n_computed,
        embedder.name,
    )

    failed_hashes: dict[str, str] = {}
    todo_items = list(todo.items())
    with Progress(label, total=len(todo_items), unit="inputs") as bar:
        for start in range(0, len(todo_items), CHUNK_ITEMS):
            chunk = todo_items[start : start + CHUNK_ITEMS]
            vectors, chunk_errors = embedder.embed([inp for _, inp in chunk], bar.advance)
            for i, message in chunk_errors.items():
                failed_hashes[chunk[i][0]] = message
            ok = [i for i in range(len(chunk)) if i not in chunk_errors]
            if ok:
                cache.put(
                    pa.table(
                        {
                            "input_hash": pa.array([chunk[i][0] for i in ok], pa.string()),
                            "embedding": pa.FixedSizeListArray.from_arrays(
                                pa.array(vectors[ok].reshape(-1), pa.float32()), vectors.shape[1]
                            ),
                        }
                    )
                )

    # Items whose request failed for good: per-item errors; they are retried next run.
    kept = [(i, h) for i, h in zip(ids, hashes, strict=True) if h not in failed_hashes]
    errors += [
        (i, f"embed: {failed_hashes[h]}")
        for i, h in zip(ids, hashes, strict=True)
        if h in failed_hashes
    ]
    n_failed_compute = len(ids) - len(kept)
    dim = embedder.dim
    if dim is None and cached is not None:
        dim = cached.schema.field("embedding").type.list_size
    return StageOutcome(
        stage="embed",
        key=key,
        index=write_index(store, run, "embed", [i for i, _ in kept], [h for _, h in kept]),
        errors=write_errors(store, run, "embed", errors),
        stats=StageStats(
            computed=n_computed - n_failed_compute,
            cached=len(ids) - n_computed,
            failed=len(errors),
            seconds=time.perf_counter() - started,
        ),
        model={
            "name": embedder.name,
            "revision": embedder.revision,
            "dim": dim,
            "text_template": params["text_template"],
            "usage": usage.as_dict() if (usage := getattr(embedder, "usage", None)) else None,
        },
    )


@task(name="embed", **TASK_OPTIONS)
def embed_task(
    store: ArtifactStore,
    config: PipelineConfig,
    run: RunInfo,
    ingest: IngestOutcome,
    shard: int,
    caption: StageOutcome,
    interests: StageOutcome,
) -> StageOutcome:
    run = run.for_shard(shard)

    def compute(items: pa.Table) -> StageOutcome:
        return embed_stage(
            store,
            run,
            items,
            ingest.attribute_columns,
            make_embedder(
                config.embed,
                config.catalog.allow_http_images,
                config.catalog.allowed_image_hosts,
            ),
            config.embed,
            captions=stage_values(store, run, caption, "caption") if not caption.skipped else None,
            interests=stage_values(store, run, interests, "interests")
            if not interests.skipped
            else None,
            exclude=failed_items(store, run, [caption, interests]),
            label=f"embed shard {shard}",
        )

    outcome = run_shard(
        store, run, "embed", compute, shard_limit(config.orchestration, "embed", config.embed)
    )
    s = outcome.stats
    get_run_logger().info(
        "embed shard %d: %d computed, %d cached, %d resumed, %d failed in %.1fs",
        shard,
        s.computed,
        s.cached,
        s.resumed,
        s.failed,
        s.seconds,
    )
    return outcome
