"""caption (CMSA) and interests (MDIM): the model-served enrichment stages.

Each runs against an OpenAI-compatible model server (vLLM) named by URL in config. With no URL
configured the stage is skipped: one log line says how to enable it, and the manifest counts every
item as skipped. Downstream stages then build item text without captions or interests, and their
cache keys change by themselves once captions or interests appear.
"""

from __future__ import annotations

import logging
import time

import pyarrow as pa
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from sidpipe.config import ModelEndpointConfig, PipelineConfig
from sidpipe.storage.manifest import StageStats
from sidpipe.storage.store import ArtifactStore
from sidpipe.tasks.stage import RunInfo, StageOutcome, read_items

log = logging.getLogger(__name__)

ENABLE_HINT = {
    "caption": "set SIDPIPE_CAPTION_URL to a Qwen2.5-VL server to caption item images (CMSA)",
    "interests": "set SIDPIPE_INTERESTS_URL to a Qwen2.5-7B-Instruct server to mine interests (MDIM)",
}


class EndpointNotSupportedError(RuntimeError):
    """A model server URL is configured for a stage this version cannot call yet."""


def enrichment_stage(stage: str, endpoint: ModelEndpointConfig, items: pa.Table) -> StageOutcome:
    """Run one enrichment stage over the run's items, or skip it when no server is configured."""
    started = time.perf_counter()
    if not endpoint.url:
        log.info(
            "%s: skipped for %d items (no endpoint; %s)", stage, items.num_rows, ENABLE_HINT[stage]
        )
        return StageOutcome(
            stage=stage,
            stats=StageStats(skipped=items.num_rows, seconds=time.perf_counter() - started),
            model={"name": None, "skipped": True},
        )
    # The HTTP client for vLLM servers (retries, bounded in-flight requests, structured output)
    # is tracked as issue #3; fail loudly rather than pretend to enrich.
    raise EndpointNotSupportedError(
        f"{stage}: an endpoint is configured ({endpoint.url}) but this sidpipe version has no "
        f"{stage} client yet; unset SIDPIPE_{stage.upper()}_URL to run without {stage}"
    )


@task(name="caption", retries=2, retry_delay_seconds=10, cache_policy=NO_CACHE)
def caption_task(config: PipelineConfig, run: RunInfo, ingest: StageOutcome) -> StageOutcome:
    items = read_items(ArtifactStore(config.store), run)
    outcome = enrichment_stage("caption", config.caption, items)
    if outcome.skipped:
        get_run_logger().info("caption: skipped (%s)", ENABLE_HINT["caption"])
    return outcome


@task(name="interests", retries=2, retry_delay_seconds=10, cache_policy=NO_CACHE)
def interests_task(
    config: PipelineConfig, run: RunInfo, ingest: StageOutcome, caption: StageOutcome
) -> StageOutcome:
    items = read_items(ArtifactStore(config.store), run)
    outcome = enrichment_stage("interests", config.interests, items)
    if outcome.skipped:
        get_run_logger().info("interests: skipped (%s)", ENABLE_HINT["interests"])
    return outcome
