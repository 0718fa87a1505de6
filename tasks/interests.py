"""interests (MDIM): an LLM reasons step by step over an item's title, description, caption and
attributes, and answers 2-4 deep-interest tags as schema-constrained JSON, through an
OpenAI-compatible server (vLLM). See `tasks.model_served` for caching, concurrency and per-item
errors; items whose caption failed are left out."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
from prefect import task

from sidpipe.config import InterestsConfig, PipelineConfig
from sidpipe.models.item_text import attribute_text
from sidpipe.models.openai_client import OpenAICompatClient, RequestFailedError
from sidpipe.models.prompts import (
    INTERESTS_SCHEMA,
    MalformedOutputError,
    interest_messages,
    parse_interests,
)
from sidpipe.storage.hashing import stable_hash
from sidpipe.storage.layout import INTERESTS_CACHE_SCHEMA
from sidpipe.storage.store import ArtifactStore
from sidpipe.tasks.model_served import model_key, run_enrichment, skipped_outcome
from sidpipe.tasks.shards import run_shard, shard_limit
from sidpipe.tasks.stage import (
    TASK_OPTIONS,
    IngestOutcome,
    RunInfo,
    StageOutcome,
    failed_items,
    stage_values,
)


def structured_output(config: InterestsConfig) -> dict[str, Any]:
    """The request fields that constrain the answer to INTERESTS_SCHEMA."""
    if config.structured_output == "response_format":
        return {
            "response_format": {
                "type": "json_schema",
                "json_schema": {
                    "name": "item_interests",
                    "schema": INTERESTS_SCHEMA,
                    "strict": True,
                },
            }
        }
    return {"structured_outputs": {"json": INTERESTS_SCHEMA}}  # vLLM's own (guided_* is gone)


def interests_stage(
    store: ArtifactStore,
    run: RunInfo,
    items: pa.Table,
    attributes: list[str],
    config: InterestsConfig,
    captions: dict[str, str] | None = None,
    exclude: set[str] | None = None,
    label: str | None = None,
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
    constraint = structured_output(config)

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
        config,
        INTERESTS_CACHE_SCHEMA,
        label=label,
    )


@task(name="interests", **TASK_OPTIONS)
def interests_task(
    store: ArtifactStore,
    config: PipelineConfig,
    run: RunInfo,
    ingest: IngestOutcome,
    shard: int,
    caption: StageOutcome,
) -> StageOutcome:
    run = run.for_shard(shard)
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
            label=f"interests shard {shard}",
        ),
        shard_limit(config.orchestration, "interests", config.interests),
    )
