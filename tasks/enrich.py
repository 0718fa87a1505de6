"""caption (CMSA) and interests (MDIM): the model-served enrichment stages.

Each runs against an OpenAI-compatible model server (vLLM) named by URL in config. With no URL the
stage is skipped: one log line says how to enable it, and the manifest counts every item as
skipped. With a URL:
- results are cached per (stage key, item input hash); the key holds model, revision, prompt
  version and sampling parameters, so changing any of them recomputes this stage and the stages
  that read it, nothing else;
- only uncached inputs are sent, in chunks whose results are written to the cache as each chunk
  finishes (memory stays flat; a crash loses at most one chunk);
- the server is health-checked before the first request (a dead server fails the stage at once);
  a fully cached run never contacts it;
- an item whose request fails after the client's retries, whose image cannot be read or whose
  answer stays malformed gets a per-item error; the stage goes on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pyarrow as pa
from prefect import task

from sidpipe.config import (
    CaptionConfig,
    ConfigError,
    InterestsConfig,
    ModelEndpointConfig,
    PipelineConfig,
)
from sidpipe.models.images import image_url_for
from sidpipe.models.openai_client import (
    EndpointSettings,
    OpenAICompatClient,
    RequestFailedError,
)
from sidpipe.models.prompts import (
    CAPTION_PROMPTS,
    INTEREST_PROMPTS,
    INTERESTS_SCHEMA,
    MalformedOutputError,
    caption_messages,
    clean_caption,
    interest_messages,
    parse_interests,
)
from sidpipe.storage.cache import StageCache, stage_key
from sidpipe.storage.hashing import stable_hash
from sidpipe.storage.manifest import StageStats
from sidpipe.storage.store import ArtifactStore
from sidpipe.tasks.ingest import IngestOutcome, attribute_text
from sidpipe.tasks.stage import (
    TASK_OPTIONS,
    RunInfo,
    StageOutcome,
    failed_items,
    progress_artifact,
    run_shard,
    shard_limit,
    stage_values,
    write_errors,
    write_index,
)

log = logging.getLogger(__name__)

ENABLE_HINT = {
    "caption": "set SIDPIPE_CAPTION_URL to a Qwen2.5-VL server to caption item images (CMSA)",
    "interests": "set SIDPIPE_INTERESTS_URL to a Qwen2.5-7B-Instruct server to mine interests (MDIM)",
}
CHUNK_ITEMS = 2048  # requests per cached chunk

Worker = Callable[[OpenAICompatClient, dict[str, Any]], Awaitable[dict[str, Any]]]


def endpoint_settings(config: ModelEndpointConfig, default_model: str = "") -> EndpointSettings:
    return EndpointSettings(
        urls=config.urls,
        model=config.model or default_model,
        max_in_flight=config.max_in_flight,
        timeout_seconds=config.timeout_seconds,
        max_retries=config.max_retries,
        api_key=config.api_key.get_secret_value() if config.api_key else None,
    )


def model_key(config: ModelEndpointConfig) -> dict[str, Any]:
    """What of a model stage's settings changes its answers: part of its cache key."""
    return {
        "model": config.model,
        "revision": config.revision,
        "prompt_version": config.prompt_version,
        "temperature": config.temperature,
        "max_tokens": config.max_tokens,
    }


def check_endpoints(config: PipelineConfig) -> None:
    """Settings problems that must stop a run before any work (e.g. an unknown prompt version)."""
    for stage, endpoint, prompts in (
        ("caption", config.caption, CAPTION_PROMPTS),
        ("interests", config.interests, INTEREST_PROMPTS),
    ):
        if endpoint.urls and endpoint.prompt_version not in prompts:
            raise ConfigError(
                f"{stage}.prompt_version {endpoint.prompt_version!r} is unknown; "
                f"built-in versions: {', '.join(prompts)}"
            )


def skipped_outcome(stage: str, n_items: int) -> StageOutcome:
    log.info("%s: skipped for %d items (no endpoint; %s)", stage, n_items, ENABLE_HINT[stage])
    return StageOutcome(
        stage=stage, stats=StageStats(skipped=n_items), model={"name": None, "skipped": True}
    )


def run_enrichment(
    store: ArtifactStore,
    run: RunInfo,
    stage: str,
    params: dict[str, Any],
    inputs: list[tuple[str, dict[str, Any], dict[str, Any]]],
    worker: Worker,
    settings: EndpointSettings,
    result_schema: pa.Schema,
    skipped: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> StageOutcome:
    """Cache-aware, chunked, bounded-concurrency enrichment.

    `inputs` holds (item_id, key fields, payload): the key fields are hashed for the cache (what
    determines the result), the payload is what `worker(client, payload)` needs to compute it
    (e.g. also the image's location). The worker returns the result columns or raises (a
    per-item error).
    """
    started = time.perf_counter()
    key = stage_key(stage, params)
    cache = StageCache(store, stage, key, params)
    hashes = [stable_hash(key_fields) for _, key_fields, _ in inputs]
    cached = cache.lookup(hashes)
    have = set(cached["input_hash"].to_pylist()) if cached is not None else set()
    todo: dict[str, dict[str, Any]] = {}
    for h, (_, _, payload) in zip(hashes, inputs, strict=True):
        if h not in have:
            todo.setdefault(h, payload)
    uncached = sum(h not in have for h in hashes)
    log.info(
        "%s: %d items, %d cached, %d to compute with %s at %s",
        stage,
        len(inputs),
        len(inputs) - uncached,
        uncached,
        settings.model,
        ", ".join(settings.urls),
    )

    failed: dict[str, str] = {}
    usage: dict[str, int] = {}
    if todo:
        failed, usage = asyncio.run(
            _compute(cache, list(todo.items()), worker, settings, result_schema, progress)
        )

    ok_ids, ok_hashes, errors = [], [], []
    for (item_id, _, _), h in zip(inputs, hashes, strict=True):
        if h in failed:
            errors.append((item_id, f"{stage}: {failed[h]}"))
        else:
            ok_ids.append(item_id)
            ok_hashes.append(h)
    n_computed = sum(1 for h in hashes if h not in have and h not in failed)
    return StageOutcome(
        stage=stage,
        key=key,
        index=write_index(store, run, stage, ok_ids, ok_hashes),
        errors=write_errors(store, run, stage, errors),
        stats=StageStats(
            computed=n_computed,
            cached=len(inputs) - n_computed - len(errors),
            skipped=skipped,
            failed=len(errors),
            seconds=time.perf_counter() - started,
        ),
        model={**{k: v for k, v in params.items() if k != "schema"}, "usage": usage},
    )


async def _compute(
    cache: StageCache,
    todo: list[tuple[str, dict[str, Any]]],
    worker: Worker,
    settings: EndpointSettings,
    schema: pa.Schema,
    progress: Callable[[int, int], None] | None,
):
    """A pool of `max_in_flight x replicas` workers pulls inputs one by one, so the server never
    idles between chunks; finished results are flushed to the cache every CHUNK_ITEMS."""
    failed: dict[str, str] = {}
    rows: list[dict[str, Any]] = []
    pending = iter(todo)
    done = 0
    flushes: list[asyncio.Task] = []

    def flush() -> None:
        nonlocal rows
        if rows:
            table = pa.Table.from_pylist(rows, schema=schema)
            rows = []
            # Cache writes are blocking I/O: off the event loop, overlapping the requests.
            flushes.append(asyncio.ensure_future(asyncio.to_thread(cache.put, table)))

    async with OpenAICompatClient(settings) as client:
        await client.health_check()

        async def pull() -> None:
            nonlocal done
            for h, payload in pending:  # a shared iterator: each input is taken once
                try:
                    rows.append({"input_hash": h, **await worker(client, payload)})
                except Exception as exc:  # noqa: BLE001 - a per-item error
                    failed[h] = f"{type(exc).__name__}: {exc}"
                done += 1
                if len(rows) >= CHUNK_ITEMS:
                    flush()
                if progress is not None and done % 256 == 0:
                    progress(done, len(todo))

        workers = min(len(todo), settings.max_in_flight * len(settings.urls))
        await asyncio.gather(*(pull() for _ in range(workers)))
        flush()
        await asyncio.gather(*flushes)
        if progress is not None:
            progress(done, len(todo))
        usage = client.usage.as_dict()
    return failed, usage


# -- caption (CMSA) -----------------------------------------------------------------------------
CAPTION_SCHEMA = pa.schema([("input_hash", pa.string()), ("caption", pa.string())])


def caption_stage(
    store: ArtifactStore,
    run: RunInfo,
    items: pa.Table,
    config: CaptionConfig,
    allow_http_images: bool = False,
    progress=None,
) -> StageOutcome:
    """Caption every item that has an image; items without one are counted as skipped."""
    if not config.urls:
        return skipped_outcome("caption", items.num_rows)
    inputs, no_image = [], 0
    for item in items.select(["item_id", "title", "image", "image_fingerprint"]).to_pylist():
        if item["image"] is None:
            no_image += 1
            continue
        # The cache key holds the image's content fingerprint, not its location.
        key_fields = {"image": item["image_fingerprint"], "title": item["title"]}
        inputs.append((item["item_id"], key_fields, {**key_fields, "uri": item["image"]}))
    params = {**model_key(config), "max_pixels": config.max_pixels}

    async def worker(client: OpenAICompatClient, inp: dict[str, Any]) -> dict[str, Any]:
        image_url = await asyncio.to_thread(
            image_url_for,
            inp["uri"],
            config.image_transport,
            config.max_image_bytes,
            config.max_pixels,
            allow_http_images,
        )
        content, _ = await client.chat(
            caption_messages(config.prompt_version, image_url, inp["title"]),
            max_tokens=config.max_tokens,
            temperature=config.temperature,
        )
        caption = clean_caption(content)
        if not caption:
            raise MalformedOutputError("empty caption")
        return {"caption": caption}

    return run_enrichment(
        store,
        run,
        "caption",
        params,
        inputs,
        worker,
        endpoint_settings(config),
        CAPTION_SCHEMA,
        skipped=no_image,
        progress=progress,
    )


# -- interests (MDIM) ---------------------------------------------------------------------------
INTERESTS_RESULT_SCHEMA = pa.schema(
    [("input_hash", pa.string()), ("interests", pa.list_(pa.string())), ("reasoning", pa.string())]
)


def interests_stage(
    store: ArtifactStore,
    run: RunInfo,
    items: pa.Table,
    attributes: list[str],
    config: InterestsConfig,
    captions: dict[str, str] | None = None,
    exclude: set[str] | None = None,
    progress=None,
) -> StageOutcome:
    """Mine 2-4 interest tags per item from its title, description, caption and attributes."""
    if not config.urls:
        return skipped_outcome("interests", items.num_rows)
    captions, exclude = captions or {}, exclude or set()
    inputs = []
    for item in items.to_pylist():
        if item["item_id"] in exclude:
            continue
        attrs = attribute_text(item, attributes)
        fields = {
            "title": item.get("title"),
            "description": item.get("description"),
            "caption": captions.get(item["item_id"]),
            "attributes": attrs or None,
        }
        inputs.append((item["item_id"], fields, fields))
    params = {**model_key(config), "schema": stable_hash(INTERESTS_SCHEMA, 12)}
    if config.structured_output == "response_format":
        constraint = {
            "response_format": {
                "type": "json_schema",
                "json_schema": {
                    "name": "item_interests",
                    "schema": INTERESTS_SCHEMA,
                    "strict": True,
                },
            }
        }
    else:  # vLLM's own field (the guided_* fields were removed in vLLM 0.12)
        constraint = {"structured_outputs": {"json": INTERESTS_SCHEMA}}

    async def worker(client: OpenAICompatClient, inp: dict[str, Any]) -> dict[str, Any]:
        messages = interest_messages(
            config.prompt_version,
            inp["title"],
            inp["description"],
            inp["caption"],
            inp["attributes"],
        )
        problem = None
        for _ in range(2):  # one retry on malformed or truncated output
            content, finish = await client.chat(
                messages, max_tokens=config.max_tokens, temperature=config.temperature, **constraint
            )
            try:
                tags, reasoning = parse_interests(content, finish)
                return {"interests": tags, "reasoning": reasoning}
            except MalformedOutputError as exc:
                problem = exc
        raise RequestFailedError(f"malformed output twice: {problem}")

    return run_enrichment(
        store,
        run,
        "interests",
        params,
        inputs,
        worker,
        endpoint_settings(config),
        INTERESTS_RESULT_SCHEMA,
        progress=progress,
    )


# -- Prefect tasks (one run per item shard) -------------------------------------------------
@task(name="caption", **TASK_OPTIONS)
def caption_task(config: PipelineConfig, run: RunInfo, shard: int) -> StageOutcome:
    store, run = ArtifactStore(config.store), run.for_shard(shard)
    return run_shard(
        store,
        run,
        "caption",
        lambda items: caption_stage(
            store,
            run,
            items,
            config.caption,
            config.catalog.allow_http_images,
            progress=progress_artifact(f"caption shard {shard}") if config.caption.urls else None,
        ),
        shard_limit(config.orchestration, "caption", config.caption),
    )


@task(name="interests", **TASK_OPTIONS)
def interests_task(
    config: PipelineConfig,
    run: RunInfo,
    ingest: IngestOutcome,
    shard: int,
    caption: StageOutcome,
) -> StageOutcome:
    store, run = ArtifactStore(config.store), run.for_shard(shard)
    return run_shard(
        store,
        run,
        "interests",
        lambda items: interests_stage(
            store,
            run,
            items,
            ingest.attribute_columns,
            config.interests,
            captions=stage_values(store, run, caption, "caption") if not caption.skipped else None,
            exclude=failed_items(store, run, [caption]),
            progress=progress_artifact(f"interests shard {shard}")
            if config.interests.urls
            else None,
        ),
        shard_limit(config.orchestration, "interests", config.interests),
    )
