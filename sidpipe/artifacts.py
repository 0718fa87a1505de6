"""Prefect artifacts, attached to the run an operator opens.

A nightly run executes its DAG as a `tokenize-catalog` subflow (the subflow carries the task
runner, a setting known only at run time), so an artifact made by one of its tasks would attach
to that subflow's run, not to the deployment's run that the UI lists and an operator opens. The
subflow receives the top run's id as its `parent_run` parameter: artifacts made under it attach
there (the task that made one is still recorded with it). Anywhere else they attach to the
current run, as Prefect's own `create_*_artifact` functions do.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID


def report_run_id() -> UUID | None:
    """The flow run that artifacts made here belong to; None: the current run."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    parent = (context.parameters or {}).get("parent_run") if context else None
    try:
        return UUID(str(parent)) if parent else None
    except ValueError:
        return None


def table(rows: list[dict[str, Any]], key: str, description: str) -> None:
    from prefect.artifacts import TableArtifact

    _create(TableArtifact(table=rows, key=key, description=description))


def markdown(text: str, key: str, description: str) -> None:
    from prefect.artifacts import MarkdownArtifact

    _create(MarkdownArtifact(markdown=text, key=key, description=description))


def link(url: str, text: str, key: str, description: str) -> None:
    from prefect.artifacts import LinkArtifact

    _create(LinkArtifact(link=url, link_text=text, key=key, description=description))


def progress(description: str) -> UUID:
    """A progress artifact at 0%; `prefect.artifacts.update_progress_artifact` moves it."""
    from prefect.artifacts import ProgressArtifact

    return _create(ProgressArtifact(progress=0.0, description=description)).id


def _create(artifact):
    artifact.flow_run_id = report_run_id()
    return artifact.create(_sync=True)
