"""What the model-served stages (caption, interests) share: cached, chunked, concurrent requests.

Each such stage runs against an OpenAI-compatible model server (vLLM) named by URL in config.
With no URL the stage is skipped: one log line says how to enable it, and the manifest counts
every item as skipped. With a URL:
- results are cached per (stage key, item input hash); the key holds model, revision, prompt
  version and sampling parameters, so changing any of them recomputes this stage and the stages
  that read it, nothing else;
- only uncached inputs are sent, by a pool of workers whose results are written to the cache
  every `CHUNK_ITEMS` (memory stays flat; a crash loses at most one chunk);
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

from sidpipe.config import ModelEndpointConfig
from sidpipe.models.openai_client import OpenAICompatClient
from sidpipe.progress import Progress
from sidpipe.redact import redact_urls
from sidpipe.storage.cache import StageCache, stage_key
from sidpipe.storage.hashing import stable_hash
from sidpipe.storage.manifest import StageStats
from sidpipe.storage.store import ArtifactStore
from sidpipe.tasks.stage import RunInfo, StageOutcome, write_errors, write_index

log = logging.getLogger(__name__)

ENABLE_HINT = {
    "caption": "set SIDPIPE_CAPTION_URL to a Qwen2.5-VL server to caption item images (CMSA)",
    "interests": "set SIDPIPE_INTERESTS_URL to a Qwen2.5-7B-Instruct server to mine interests (MDIM)",
}
CHUNK_ITEMS = 2048  # results per cached chunk

Worker = Callable[[OpenAICompatClient, dict[str, Any]], Awaitable[dict[str, Any]]]


def model_key(config: ModelEndpointConfig) -> dict[str, Any]:
    """What of a model stage's settings changes its answers: part of its cache key."""
    return {
        "model": config.model,
        "revision": config.revision,
        "prompt_version": config.prompt_version,
        "temperature": config.temperature,
        "max_tokens": config.max_tokens,
    } | ({"extra_body": config.extra_body} if config.extra_body else {})  # old keys unchanged


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
    endpoint: ModelEndpointConfig,
    result_schema: pa.Schema,
    skipped: int = 0,
    label: str | None = None,
) -> StageOutcome:
    """Cache-aware, chunked, bounded-concurrency enrichment.

    `inputs` holds (item_id, key fields, payload): the key fields are hashed for the cache (what
    determines the result), the payload is what `worker(client, payload)` needs to compute it
    (e.g. also the image's location). The worker returns the result columns or raises (a
    per-item error). `label` names the work in progress output (e.g. "caption shard 3").
    """
    started = time.perf_counter()
    key = stage_key(stage, params)
    cache = StageCache(store, stage, key, params)
    hashes = [stable_hash(key_fields) for _, key_fields, _ in inputs]
    _, todo = cache.pending(hashes, [payload for _, _, payload in inputs])
    uncached = sum(h in todo for h in hashes)
    log.info(
        "%s: %d items, %d cached, %d to compute with %s at %s",
        stage,
        len(inputs),
        len(inputs) - uncached,
        uncached,
        endpoint.model,
        redact_urls(", ".join(endpoint.urls)),
    )

    failed: dict[str, str] = {}
    usage: dict[str, int] = {}
    if todo:
        with Progress(label or stage, total=len(todo), unit="inputs") as bar:
            failed, usage = asyncio.run(
                _compute(cache, list(todo.items()), worker, endpoint, result_schema, bar)
            )

    ok_ids, ok_hashes, errors = [], [], []
    for (item_id, _, _), h in zip(inputs, hashes, strict=True):
        if h in failed:
            errors.append((item_id, f"{stage}: {failed[h]}"))
        else:
            ok_ids.append(item_id)
            ok_hashes.append(h)
    n_computed = sum(1 for h in hashes if h in todo and h not in failed)
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
    endpoint: ModelEndpointConfig,
    schema: pa.Schema,
    bar: Progress,
):
    """A pool of `max_in_flight x replicas` workers pulls inputs one by one, so the server never
    idles between chunks; finished results are flushed to the cache every CHUNK_ITEMS."""
    failed: dict[str, str] = {}
    rows: list[dict[str, Any]] = []
    pending = iter(todo)
    flushes: list[asyncio.Task] = []

    def flush() -> None:
        nonlocal rows
        if rows:
            table = pa.Table.from_pylist(rows, schema=schema)
            rows = []
            # Cache writes are blocking I/O: off the event loop, overlapping the requests.
            flushes.append(asyncio.ensure_future(asyncio.to_thread(cache.put, table)))

    async with OpenAICompatClient(endpoint) as client:
        await client.health_check()

        async def pull() -> None:
            for h, payload in pending:  # a shared iterator: each input is taken once
                try:
                    rows.append({"input_hash": h, **await worker(client, payload)})
                except Exception as exc:  # noqa: BLE001 - a per-item error
                    failed[h] = f"{type(exc).__name__}: {exc}"
                bar.advance(status=f"{len(failed):,} failed" if failed else None)
                if len(rows) >= CHUNK_ITEMS:
                    flush()

        workers = min(len(todo), endpoint.max_in_flight * len(endpoint.urls))
        await asyncio.gather(*(pull() for _ in range(workers)))
        flush()
        await asyncio.gather(*flushes)
        usage = client.usage.as_dict()
    return failed, usage
