"""The Prefect task runner a run's shards go to, chosen by `orchestration.task_runner`.

thread/process spread shards over one box; dask/ray over a cluster (prefect-dask, prefect-ray),
with the same flow code. Task inputs are small pydantic models and the run's `ArtifactStore`
(which pickles as its root URI and options), so every runner can ship them.
"""

from __future__ import annotations

import os

from sidpipe.config import OrchestrationConfig
from sidpipe.errors import ConfigError


def make_task_runner(config: OrchestrationConfig):
    kind = config.task_runner
    if kind == "thread":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=config.max_workers or 4)
    if kind == "process":
        from prefect.task_runners import ProcessPoolTaskRunner

        return ProcessPoolTaskRunner(max_workers=config.max_workers or os.cpu_count() or 1)
    if kind == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError:
            raise ConfigError(
                "orchestration.task_runner=dask needs prefect-dask",
                hint="pip install 'sidpipe[dask]'",
            ) from None
        if config.cluster_address:
            return DaskTaskRunner(address=config.cluster_address)
        workers = config.max_workers or os.cpu_count() or 1
        # One thread per worker process: torch and faiss bring their own threads.
        return DaskTaskRunner(
            cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True}
        )
    try:
        from prefect_ray import RayTaskRunner
    except ImportError:
        raise ConfigError(
            "orchestration.task_runner=ray needs prefect-ray", hint="pip install 'sidpipe[ray]'"
        ) from None
    return (
        RayTaskRunner(address=config.cluster_address)
        if config.cluster_address
        else (RayTaskRunner())
    )
