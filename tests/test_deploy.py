"""sidpipe.deploy.bootstrap against the Prefect test server: creates, then finds, then updates."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sidpipe import deploy
from sidpipe.errors import ConfigError

EXPECTED = {
    "work-pool/cpu-pool",
    "work-pool/gpu-pool",
    "concurrency-limit/sidpipe-caption",
    "concurrency-limit/sidpipe-interests",
    "concurrency-limit/sidpipe-embed",
    "block/remote-file-system/sidpipe-results",
}
S3 = deploy.S3_RESULTS_URI  # docker-compose's results store


def _clean_slate(client) -> None:
    """Other tests share the session's server: remove what bootstrap makes, so it starts bare."""
    from prefect.exceptions import ObjectNotFound

    for pool in deploy.POOLS:
        try:
            client.delete_work_pool(pool)
        except ObjectNotFound:
            pass
    for name in deploy.CONCURRENCY_LIMITS:
        try:
            client.delete_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            pass
    try:
        block = client.read_block_document_by_name(deploy.RESULTS_BLOCK, deploy.RESULTS_BLOCK_TYPE)
        client.delete_block_document(block.id)
    except ObjectNotFound:
        pass


def test_bootstrap_is_idempotent(prefect_api, monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.filesystems import RemoteFileSystem

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio:9000")
    with get_client(sync_client=True) as client:
        _clean_slate(client)

    first = deploy.bootstrap(results_uri=S3)
    assert set(first["created"]) == EXPECTED
    assert first["updated"] == [] and first["present"] == []

    second = deploy.bootstrap(results_uri=S3)
    assert second["created"] == [] and second["updated"] == []
    assert set(second["present"]) == EXPECTED

    with get_client(sync_client=True) as client:
        cpu, gpu = client.read_work_pool("cpu-pool"), client.read_work_pool("gpu-pool")
        assert (cpu.type, gpu.type) == ("process", "process")
        assert cpu.concurrency_limit is None and gpu.concurrency_limit == 1
        # the process worker's template, as `prefect work-pool create --type process` sets it
        assert "command" in gpu.base_job_template["job_configuration"]
        for name in ("sidpipe-caption", "sidpipe-interests", "sidpipe-embed"):
            limit = client.read_global_concurrency_limit_by_name(name)
            assert limit.limit == 4 and limit.active
    block = RemoteFileSystem.load("sidpipe-results")
    assert block.basepath == "s3://sidpipe/prefect-results"
    # the endpoint is kept, the credentials are not (they stay in the workers' AWS_* env)
    assert block.settings == {"client_kwargs": {"endpoint_url": "http://minio:9000"}}
    assert deploy.RESULTS_BLOCK_SLUG == "remote-file-system/sidpipe-results"


def test_bootstrap_updates_what_differs(prefect_api, monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolUpdate
    from prefect.filesystems import RemoteFileSystem

    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    deploy.bootstrap(results_uri=S3)  # whatever state the session left: now as asked
    with get_client(sync_client=True) as client:
        client.update_work_pool("gpu-pool", WorkPoolUpdate(concurrency_limit=3))

    changed = deploy.bootstrap(limit=2, limits={"sidpipe-embed": 6}, results_uri="s3://b/r")
    assert set(changed["updated"]) == EXPECTED - {"work-pool/cpu-pool"}
    assert changed["created"] == [] and changed["present"] == ["work-pool/cpu-pool"]
    with get_client(sync_client=True) as client:
        assert client.read_work_pool("gpu-pool").concurrency_limit == 1
        assert client.read_global_concurrency_limit_by_name("sidpipe-caption").limit == 2
        assert client.read_global_concurrency_limit_by_name("sidpipe-embed").limit == 6
    block = RemoteFileSystem.load("sidpipe-results")
    assert (block.basepath, block.settings) == ("s3://b/r", {})

    deploy.bootstrap(results_uri=S3)  # leave the defaults for whoever comes next
    with pytest.raises(ConfigError, match="unknown"):
        deploy.bootstrap(limits={"sidpipe-typo": 1})


def test_deploy_module_imports_light():
    code = (
        "import sys, sidpipe.deploy; "
        "assert 'torch' not in sys.modules and 'prefect' not in sys.modules, sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bootstrap_cli_needs_an_api_url(tmp_path):
    """Without PREFECT_API_URL Prefect would bootstrap a throw-away ephemeral server."""
    env = {"PATH": "/usr/bin:/bin", "PREFECT_HOME": str(tmp_path), "HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "sidpipe.cli", "bootstrap", "--no-deploy"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "PREFECT_API_URL" in result.stderr


def test_deploy_registers_prefect_yaml(prefect_api, tmp_path):
    """`prefect deploy --all` in a project dir, against the test server, with SIDPIPE_APP_DIR
    rendered into the pull step as the repo's prefect.yaml does."""
    from prefect.client.orchestration import get_client

    deploy.bootstrap()
    (tmp_path / "hello.py").write_text(
        "from prefect import flow\n\n\n@flow\ndef hello(name: str = 'x'):\n    return name\n"
    )
    (tmp_path / "prefect.yaml").write_text(
        "name: bootstrap-test\n"
        "pull:\n"
        "  - prefect.deployments.steps.set_working_directory:\n"
        "      directory: '{{ $SIDPIPE_APP_DIR }}'\n"
        "deployments:\n"
        "  - name: hello-gpu\n"
        "    entrypoint: hello.py:hello\n"
        "    work_pool: {name: gpu-pool}\n"
    )
    assert deploy.deploy(tmp_path, app_dir="/app") == 0
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("hello/hello-gpu")
    assert deployment.work_pool_name == "gpu-pool"
    step = deployment.pull_steps[0]["prefect.deployments.steps.set_working_directory"]
    assert step["directory"] == "/app"

    (tmp_path / "prefect.yaml").unlink()
    with pytest.raises(deploy.BootstrapError, match="no prefect.yaml"):
        deploy.deploy(tmp_path)


def test_bootstrap_cli_prints_the_summary(prefect_api):
    from typer.testing import CliRunner

    from sidpipe.cli import app

    deploy.bootstrap(results_uri=S3)
    command = ["bootstrap", "--no-deploy", "--results-uri", S3]
    result = CliRunner().invoke(app, command, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "work-pool/gpu-pool" in result.output and "present" in result.output
    assert "created" not in result.output
    assert deploy.RESULTS_BLOCK_SLUG in result.output


def test_bootstrap_keeps_results_in_a_local_folder_for_one_machine(prefect_api, tmp_path):
    """The default results store needs no S3: a LocalFileSystem block on an absolute folder."""
    from prefect.filesystems import LocalFileSystem
    from typer.testing import CliRunner

    from sidpipe.cli import app

    for uri in (str(tmp_path / "results"), f"file://{tmp_path}/results"):
        summary = deploy.bootstrap(results_uri=uri)
        assert "block/local-file-system/sidpipe-results" in sum(summary.values(), [])
        assert LocalFileSystem.load("sidpipe-results").basepath == str(tmp_path / "results")
    assert deploy.results_slug("~/x") == "local-file-system/sidpipe-results"
    assert deploy.local_results_path("~/x") == str(Path("~/x").expanduser())

    command = ["bootstrap", "--no-deploy", "--results-uri", "s3:/typo"]
    result = CliRunner().invoke(app, command, env={"COLUMNS": "200"})
    assert result.exit_code == 2
    assert result.output.count("\n") == 2 and "Traceback" not in result.output, result.output
    assert "neither a local folder nor a URI" in result.output
