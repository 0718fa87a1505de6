"""caption (CMSA): a vision-language model writes a concise, attribute-rich description of each
item image, through an OpenAI-compatible server (vLLM). See `tasks.model_served` for caching,
concurrency and per-item errors; items without an image are counted as skipped."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
from prefect import task

from sidpipe.config import CaptionConfig, PipelineConfig
from sidpipe.models.images import image_url_for
from sidpipe.models.openai_client import OpenAICompatClient
from sidpipe.models.prompts import MalformedOutputError, caption_messages, clean_caption
from sidpipe.storage.layout import CAPTION_CACHE_SCHEMA
from sidpipe.storage.store import ArtifactStore
from sidpipe.tasks.model_served import model_key, run_enrichment, skipped_outcome
from sidpipe.tasks.shards import run_shard, shard_limit
from sidpipe.tasks.stage import TASK_OPTIONS, RunInfo, StageOutcome


def caption_stage(
    store: ArtifactStore,
    run: RunInfo,
    items: pa.Table,
    config: CaptionConfig,
    allow_http_images: bool = False,
    label: str | None = None,
    allowed_image_hosts: Sequence[str] = (),
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
            allowed_image_hosts,
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
        config,
        CAPTION_CACHE_SCHEMA,
        skipped=no_image,
        label=label,
    )


@task(name="caption", **TASK_OPTIONS)
def caption_task(
    store: ArtifactStore, config: PipelineConfig, run: RunInfo, shard: int
) -> StageOutcome:
    run = run.for_shard(shard)
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
            label=f"caption shard {shard}",
            allowed_image_hosts=config.catalog.allowed_image_hosts,
        ),
        shard_limit(config.orchestration, "caption", config.caption),
    )
