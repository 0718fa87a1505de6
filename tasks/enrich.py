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
from prefect import task

from sidpipe.config import ModelEndpointConfig, PipelineConfig
from sidpipe.storage.manifest import StageStats
from sidpipe.storage.store import ArtifactStore
from sidpipe.tasks.stage import TASK_OPTIONS, RunInfo, StageOutcome, read_items

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
    raise EndpointNotSupportedError(unsupported_endpoint_message(stage, endpoint.url))


def unsupported_endpoint_message(stage: str, url: str) -> str:
    # The HTTP clients for vLLM servers (bounded in-flight requests, retries, structured output)
    # are issue #3; until then a configured URL fails loudly instead of being ignored.
    return (
        f"{stage}: an endpoint is configured ({url}) but this sidpipe version has no "
        f"{stage} client yet; unset SIDPIPE_{stage.upper()}_URL to run without it"
    )


def check_endpoints(config: PipelineConfig) -> None:
    """Fail before any work if a model server is configured that this version cannot call."""
    problems = [
        unsupported_endpoint_message(stage, endpoint.url)
        for stage, endpoint in (
            ("caption", config.caption),
            ("interests", config.interests),
            ("embed", config.embed),
        )
        if endpoint.url
    ]
    if problems:
        raise EndpointNotSupportedError("\n".join(problems))


@task(name="caption", **TASK_OPTIONS)
def caption_task(config: PipelineConfig, run: RunInfo, ingest: StageOutcome) -> StageOutcome:
    items = read_items(ArtifactStore(config.store), run)
    return enrichment_stage("caption", config.caption, items)


@task(name="interests", **TASK_OPTIONS)
def interests_task(
    config: PipelineConfig, run: RunInfo, ingest: StageOutcome, caption: StageOutcome
) -> StageOutcome:
    items = read_items(ArtifactStore(config.store), run)
    return enrichment_stage("interests", config.interests, items)
