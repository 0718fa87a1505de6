"""One-shot Prefect bootstrap for a production sidpipe: work pools, concurrency limits, results.

`bootstrap()` makes a Prefect server ready for the deployments in prefect.yaml:

- work pools `cpu-pool` and `gpu-pool` (type `process`); gpu-pool runs one flow run at a time,
  because the GPU stages share one device;
- global concurrency limits `sidpipe-caption`, `sidpipe-interests` and `sidpipe-embed`, which
  the flows take (strict, one slot per shard) when SIDPIPE_ORCHESTRATION_CONCURRENCY_LIMITS=true,
  so concurrent nightly runs and backfills do not pile onto the model servers;
- a block `sidpipe-results` for task results: a `LocalFileSystem` for a local folder (the
  default, ~/.sidpipe/prefect-results: a server and workers on one machine) or a
  `RemoteFileSystem` for a URI such as s3://sidpipe/prefect-results (docker-compose: workers on
  several machines). Workers select it with PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK=<type>/sidpipe-
  results (`results_slug`). Prefect refuses an unsaved block as result storage, hence a saved one.

It is idempotent: whatever exists and matches is left alone, whatever differs (a limit size, the
results URI) is updated, so `docker compose up` can run it on every start. `deploy()` then runs
`prefect --no-prompt deploy --all` from the repo root. `sidpipe bootstrap [--deploy]` wraps both.

Importing this module is cheap and has no side effects: Prefect is imported inside the functions.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sidpipe.errors import BootstrapError, ConfigError

CPU_POOL = "cpu-pool"
GPU_POOL = "gpu-pool"
POOL_TYPE = "process"
GPU_POOL_CONCURRENCY = 1
CONCURRENCY_LIMITS = ("sidpipe-caption", "sidpipe-interests", "sidpipe-embed")
DEFAULT_LIMIT = 4
RESULTS_BLOCK = "sidpipe-results"
RESULTS_BLOCK_TYPE = "remote-file-system"  # for a URI with a scheme (compose: S3 on MinIO)
LOCAL_RESULTS_BLOCK_TYPE = "local-file-system"  # for a local folder
RESULTS_BLOCK_SLUG = f"{RESULTS_BLOCK_TYPE}/{RESULTS_BLOCK}"
DEFAULT_RESULTS_URI = "~/.sidpipe/prefect-results"  # one machine: server and workers
S3_RESULTS_URI = "s3://sidpipe/prefect-results"  # docker-compose's, on its MinIO
PROJECT_DIR = Path(__file__).resolve().parent.parent  # the repo root, where prefect.yaml lives

POOLS: dict[str, int | None] = {CPU_POOL: None, GPU_POOL: GPU_POOL_CONCURRENCY}


def local_results_path(results_uri: str) -> str | None:
    """The absolute folder for a local results URI (a path or file://...), else None."""
    from urllib.parse import urlparse

    scheme = urlparse(results_uri).scheme
    if scheme == "file":
        return str(Path(urlparse(results_uri).path).expanduser().resolve())
    if scheme == "":
        return str(Path(results_uri).expanduser().resolve())
    return None


def results_block_type(results_uri: str) -> str:
    """The Prefect block type that stores results at `results_uri`; a URI no filesystem
    handles is a ConfigError (one line)."""
    if local_results_path(results_uri) is not None:
        return LOCAL_RESULTS_BLOCK_TYPE
    from urllib.parse import urlparse

    import fsspec

    scheme = urlparse(results_uri).scheme
    if scheme not in fsspec.available_protocols() or not urlparse(results_uri).netloc:
        raise ConfigError(
            f"--results-uri {results_uri!r} is neither a local folder nor a URI of a storage "
            "fsspec knows (e.g. s3://bucket/prefix)",
            hint="a single-machine server can keep results in a local folder: --results-uri "
            "~/.sidpipe/prefect-results",
        )
    return RESULTS_BLOCK_TYPE


def results_slug(results_uri: str) -> str:
    """What workers set PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK to for this results URI."""
    return f"{results_block_type(results_uri)}/{RESULTS_BLOCK}"


def results_settings(results_uri: str, endpoint_url: str | None) -> dict[str, Any]:
    """fsspec settings for the results block. Only the endpoint goes in: RemoteFileSystem keeps
    settings in plain text, so the credentials stay in the workers' AWS_* variables."""
    if results_uri.startswith("s3://") and endpoint_url:
        return {"client_kwargs": {"endpoint_url": endpoint_url}}
    return {}


def bootstrap(
    *,
    limit: int = DEFAULT_LIMIT,
    limits: Mapping[str, int] | None = None,
    results_uri: str = DEFAULT_RESULTS_URI,
    endpoint_url: str | None = None,
) -> dict[str, list[str]]:
    """Create (or bring up to date) the work pools, concurrency limits and results block.

    `limit` sizes every global concurrency limit; `limits` overrides single ones by name.
    `endpoint_url` defaults to AWS_ENDPOINT_URL. Returns the object names (`work-pool/cpu-pool`,
    `concurrency-limit/sidpipe-embed`, `block/remote-file-system/sidpipe-results`) grouped as
    `created`, `updated` and `present` (already as asked)."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        # Without it Prefect would start a throw-away ephemeral server and bootstrap that.
        raise ConfigError(
            "PREFECT_API_URL is not set: point it at the Prefect server to bootstrap",
            hint="e.g. export PREFECT_API_URL=http://localhost:4200/api",
        )
    sizes = {name: limit for name in CONCURRENCY_LIMITS} | dict(limits or {})
    if unknown := set(sizes) - set(CONCURRENCY_LIMITS):
        raise ConfigError(f"unknown concurrency limits {sorted(unknown)}")
    if bad := [name for name, size in sizes.items() if size < 1]:
        raise ConfigError(f"concurrency limits must be at least 1: {bad}")
    if endpoint_url is None:
        endpoint_url = os.environ.get("AWS_ENDPOINT_URL") or None
    results_block_type(results_uri)  # a bad URI fails here, before anything changes

    try:
        return _bootstrap(sizes, results_uri, endpoint_url)
    except httpx.HTTPError as exc:  # an unreachable or failing API: one line, not a traceback
        raise BootstrapError(f"Prefect API: {type(exc).__name__}: {exc}") from None


def _bootstrap(sizes: dict[str, int], results_uri: str, endpoint_url: str | None) -> dict:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import (
        GlobalConcurrencyLimitCreate,
        GlobalConcurrencyLimitUpdate,
        WorkPoolCreate,
        WorkPoolUpdate,
    )
    from prefect.exceptions import ObjectNotFound
    from prefect.filesystems import LocalFileSystem, RemoteFileSystem
    from prefect.workers.process import ProcessWorker

    summary: dict[str, list[str]] = {"created": [], "updated": [], "present": []}
    with get_client(sync_client=True) as client:
        for name, pool_limit in POOLS.items():
            key = f"work-pool/{name}"
            try:
                pool = client.read_work_pool(name)
            except ObjectNotFound:
                client.create_work_pool(
                    WorkPoolCreate(
                        name=name,
                        type=POOL_TYPE,
                        base_job_template=ProcessWorker.get_default_base_job_template(),
                        concurrency_limit=pool_limit,
                    )
                )
                summary["created"].append(key)
                continue
            if pool.type != POOL_TYPE:
                raise BootstrapError(
                    f"work pool {name!r} exists with type {pool.type!r}, not {POOL_TYPE!r}; "
                    "delete it (prefect work-pool delete) and bootstrap again"
                )
            if pool.concurrency_limit != pool_limit:
                client.update_work_pool(name, WorkPoolUpdate(concurrency_limit=pool_limit))
                summary["updated"].append(key)
            else:
                summary["present"].append(key)

        for name, size in sizes.items():
            key = f"concurrency-limit/{name}"
            try:
                gcl = client.read_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(name=name, limit=size)
                )
                summary["created"].append(key)
                continue
            if gcl.limit != size or not gcl.active:
                client.update_global_concurrency_limit(
                    name, GlobalConcurrencyLimitUpdate(limit=size, active=True)
                )
                summary["updated"].append(key)
            else:
                summary["present"].append(key)

        block_type = results_block_type(results_uri)
        key = f"block/{block_type}/{RESULTS_BLOCK}"
        if (folder := local_results_path(results_uri)) is not None:
            wanted: dict[str, Any] = {"basepath": folder}
            block = LocalFileSystem
        else:
            settings = results_settings(results_uri, endpoint_url)
            wanted, block = {"basepath": results_uri, "settings": settings}, RemoteFileSystem
        try:
            data = client.read_block_document_by_name(RESULTS_BLOCK, block_type).data
            current = {
                name: data.get(name) or ({} if name == "settings" else None) for name in wanted
            }
        except ObjectNotFound:
            current = None
        if current == wanted:
            summary["present"].append(key)
        else:
            # save() registers the block type too, on a server that has not seen it yet.
            block(**wanted).save(RESULTS_BLOCK, overwrite=True)
            summary["created" if current is None else "updated"].append(key)
    return summary


def deploy(project_dir: Path = PROJECT_DIR, app_dir: str | None = None) -> int:
    """Run `prefect --no-prompt deploy --all` in `project_dir` against the API `bootstrap()`
    used (output goes to the terminal) and return its exit code. prefect.yaml's pull step reads
    SIDPIPE_APP_DIR at deploy time; it defaults to `project_dir`, which is right when the
    workers see the code at the same path (/app in the image)."""
    from prefect.settings import PREFECT_API_URL

    if not (project_dir / "prefect.yaml").is_file():
        raise BootstrapError(f"no prefect.yaml in {project_dir}")
    env = dict(os.environ)
    if api_url := PREFECT_API_URL.value():
        env["PREFECT_API_URL"] = str(api_url)  # the server bootstrap() talked to, profile or not
    env["SIDPIPE_APP_DIR"] = app_dir or env.get("SIDPIPE_APP_DIR") or str(project_dir)
    command = [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"]
    return subprocess.run(command, cwd=project_dir, env=env, check=False).returncode
