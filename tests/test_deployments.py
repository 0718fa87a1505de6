"""prefect.yaml deploys to a real Prefect server, and a worker runs what it schedules.

The production path without Docker: the session's Prefect server on loopback, `sidpipe
bootstrap` + `prefect deploy --all` from prefect.yaml, a real process worker on cpu-pool, then a
backfill over three dates submitted from the CLI: the backfill flow runs on the worker and runs
the nightly deployment once per date, and three runs are published in the store.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SMALL_TOKENIZER, subprocess_env
from typer.testing import CliRunner

from sidpipe.cli import app
from sidpipe.storage.manifest import run_records
from sidpipe.storage.published import published_runs
from sidpipe.storage.store import ArtifactStore

pytestmark = pytest.mark.usefixtures("prefect_api")
REPO = Path(__file__).resolve().parent.parent


def published_records(store: ArtifactStore) -> int:
    return sum(r.status == "published" for r in run_records(store))


@pytest.fixture
def deployed():
    from sidpipe.deploy import bootstrap, deploy

    bootstrap()  # saving the s3:// results block does not contact S3
    assert deploy(app_dir=str(REPO)) == 0
    yield


def test_prefect_yaml_deploys_schedules_pools_and_limits(deployed):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        nightly = client.read_deployment_by_name("nightly-tokenization/nightly")
        refit = client.read_deployment_by_name("nightly-tokenization/refit")
        backfill = client.read_deployment_by_name("sidpipe-backfill/backfill")
    (schedule,) = nightly.schedules
    assert schedule.schedule.cron == "0 2 * * *" and schedule.schedule.timezone == "UTC"
    assert nightly.global_concurrency_limit.limit == 1  # backfills never overlap the nightly
    assert nightly.work_pool_name == backfill.work_pool_name == "cpu-pool"
    assert refit.work_pool_name == "gpu-pool"
    assert refit.parameters == {"config": {"tokenizer": {"refit": True}}}
    assert backfill.parameters["deployment"] == "nightly-tokenization/nightly"
    assert nightly.pull_steps[0]["prefect.deployments.steps.set_working_directory"] == {
        "directory": str(REPO)
    }


def test_a_backfill_submitted_to_the_server_publishes_one_run_per_date(
    deployed,
    tmp_path,
    small_catalog,  # noqa: F811
):
    store = ArtifactStore(str(tmp_path / "store"))
    env = subprocess_env(
        SIDPIPE_STORE=store.root_uri,
        SIDPIPE_CATALOG_URI=str(small_catalog),
        SIDPIPE_CATALOG_NAME="test-catalog",
        PREFECT_WORKER_QUERY_SECONDS="1",
        PREFECT_WORKER_PREFETCH_SECONDS="1",
        **SMALL_TOKENIZER,
    )
    worker = subprocess.Popen(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", "cpu-pool"],
        env=env,
        cwd=REPO,
        stdout=open(tmp_path / "worker.log", "w"),  # noqa: SIM115 - closed with the process
        stderr=subprocess.STDOUT,
    )
    try:
        submitted = CliRunner(env={"PREFECT_API_URL": env["PREFECT_API_URL"]}).invoke(
            app, ["backfill", "--from", "2026-11-01", "--to", "2026-11-03", "--submit"]
        )
        assert submitted.exit_code == 0, submitted.output
        deadline = time.monotonic() + 480
        # Wait for the run log, written just after each manifest, not only the manifests.
        while time.monotonic() < deadline and published_records(store) < 3:
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-4000:]
            time.sleep(2)
    finally:
        worker.terminate()
        worker.wait(30)
    log = (tmp_path / "worker.log").read_text()
    runs = published_runs(store, "test-catalog")
    assert [str(m.run_date) for m in runs] == ["2026-11-01", "2026-11-02", "2026-11-03"], log[
        -4000:
    ]
    records = sorted(run_records(store), key=lambda r: r.started_at)
    assert [r.status for r in records] == ["published"] * 3
    assert all(r.prefect_flow_run_id for r in records)  # each a run of the nightly deployment
    assert all(m.counts.assigned == 120 for m in runs)
