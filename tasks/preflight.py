"""Checks that take seconds and catch what would otherwise fail a run minutes in.

Run by `sidpipe run` before Prefect starts, and by the flow before it takes the catalog's lock,
so a missing catalog, an unknown prompt version, a store that cannot be written, or a catalog too
small for any tokenizer each stop the run at once with one clear `SidpipeError`, and nothing is
written. `sidpipe run` also checks the configured model servers first (`servers=True`); the flow
does not, so a scheduled run whose stages are all cached never needs its servers up (a stage
with work checks its server itself before its first request).

Never imports Prefect: the CLI calls it before Prefect's start-up.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path

from sidpipe.config import PipelineConfig
from sidpipe.errors import (
    CatalogTooSmallError,
    ConfigError,
    EndpointUnavailableError,
    StoreError,
)
from sidpipe.models.openai_client import OpenAICompatClient
from sidpipe.models.prompts import CAPTION_PROMPTS, INTEREST_PROMPTS
from sidpipe.storage.catalog_files import peek_catalog, require_item_id
from sidpipe.storage.catalog_source import check_source
from sidpipe.storage.layout import staging_dir
from sidpipe.storage.registry import read_registry
from sidpipe.storage.store import ArtifactStore


def check_prompts(config: PipelineConfig) -> None:
    for stage, endpoint, prompts in (
        ("caption", config.caption, CAPTION_PROMPTS),
        ("interests", config.interests, INTEREST_PROMPTS),
    ):
        if endpoint.urls and endpoint.prompt_version not in prompts:
            raise ConfigError(
                f"{stage}.prompt_version {endpoint.prompt_version!r} is unknown",
                hint=f"built-in versions: {', '.join(prompts)}",
            )


def check_store(store: ArtifactStore) -> None:
    """The store can be written: a local folder (or its nearest existing parent) is writable;
    an object store takes a small write and its delete. Leaves nothing behind."""
    if store.protocol == "file":
        folder = Path(store.root)
        while not folder.exists():
            folder = folder.parent
        if not (folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)):
            raise StoreError(
                f"cannot write to the store {store.root_uri}: {folder} is not writable"
            )
        return
    probe = (*staging_dir(".preflight"), uuid.uuid4().hex)
    store.write_bytes(b"", *probe)
    store.delete(*probe)


def check_catalog(store: ArtifactStore, config: PipelineConfig) -> None:
    """The catalog's name is not another source's, the file can be opened, and it holds enough
    rows for a tokenizer if this run fits one."""
    catalog = config.catalog
    check_source(store, catalog.store_name, catalog.uri, catalog.same_catalog)
    need = items_needed(config)
    rows, columns = peek_catalog(catalog.uri, need)
    require_item_id(catalog.uri, columns)
    if fits_tokenizer(store, config) and rows < need:
        raise too_small(config, f"{catalog.uri}: {rows:,} rows")


def fits_tokenizer(store: ArtifactStore, config: PipelineConfig) -> bool:
    """This run fits a tokenizer: a refit, or the catalog has none pinned yet."""
    pinned = read_registry(store, config.catalog.store_name).pinned
    return config.tokenizer.refit or pinned is None


def items_needed(config: PipelineConfig) -> int:
    """The fewest items a tokenizer fit accepts under these settings."""
    tokenizer = config.tokenizer
    if tokenizer.small_catalog == "refuse":
        return max(tokenizer.codebook_sizes) * tokenizer.min_points_per_code
    return 2 * tokenizer.min_points_per_code  # two codes a level


def too_small(config: PipelineConfig, what: str) -> CatalogTooSmallError:
    """The error for `what` (e.g. "1,000 rows") being fewer than a fit needs."""
    tokenizer = config.tokenizer
    hint = (
        "tokenizer.small_catalog=shrink fits smaller codebooks to a small catalog"
        if tokenizer.small_catalog == "refuse"
        else "add items, or lower tokenizer.min_points_per_code (k-means gets worse)"
    )
    return CatalogTooSmallError(
        f"{what}, but fitting a tokenizer needs at least {items_needed(config):,} items "
        f"(tokenizer.min_points_per_code = {tokenizer.min_points_per_code})",
        hint,
    )


def check_endpoints(config: PipelineConfig) -> None:
    """Every configured model server answers and serves its configured model."""
    stages = {"caption": config.caption, "interests": config.interests, "embed": config.embed}
    endpoints = {stage: e for stage, e in stages.items() if e.urls}

    async def check_all() -> None:
        for stage, endpoint in endpoints.items():
            async with OpenAICompatClient(endpoint) as client:
                try:
                    await client.health_check()
                except EndpointUnavailableError as exc:
                    raise EndpointUnavailableError(f"{stage} server {exc.message}") from None

    if endpoints:
        asyncio.run(check_all())


def preflight(
    config: PipelineConfig, store: ArtifactStore | None = None, servers: bool = False
) -> None:
    """All of the above, cheapest first; raises the first problem found."""
    check_prompts(config)
    store = store or ArtifactStore(config.store)
    check_catalog(store, config)
    check_store(store)
    if servers:
        check_endpoints(config)
