"""docker-compose.yml and the Dockerfile: a valid Compose file that pins every image, health-checks
every long-running service, starts in the right order and names the pools, limits and results
block that `sidpipe bootstrap` creates.

Validation uses the official compose-spec JSON schema (github.com/compose-spec/compose-spec,
Apache-2.0) as check-jsonschema vendors it (`check-jsonschema --builtin-schema
vendor.compose-spec`; the `test` extra installs it), so it runs in CI without a Docker engine.
"""

from __future__ import annotations

import copy
import importlib.resources
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from jsonschema import Draft202012Validator

from sidpipe import deploy

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
ONE_SHOTS = {"create-bucket", "bootstrap"}
WORKERS = {"cpu-worker": deploy.CPU_POOL, "gpu-worker": deploy.GPU_POOL}


def _spec() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _validator() -> Draft202012Validator:
    schema_file = (
        importlib.resources.files("check_jsonschema")
        / "builtin_schemas"
        / "vendor"
        / "compose-spec.json"
    )
    schema = json.loads(schema_file.read_text())
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


_VARIABLE = re.compile(r"\$\$|\$\{(\w+)(?:(:?-)([^}]*))?\}")


def _interpolate(value, env: dict[str, str]):
    """Compose's ${VAR}, ${VAR:-default} (unset or empty) and ${VAR-default} (unset), $$ = $."""

    def substitute(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name, operator, default = match.groups()
        if name in env and not (operator == ":-" and env[name] == ""):
            return env[name]
        return default or ""

    if isinstance(value, str):
        return _VARIABLE.sub(substitute, value)
    if isinstance(value, dict):
        return {k: _interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env) for v in value]
    return value


def _depends_on(service: dict) -> dict[str, str]:
    deps = service.get("depends_on", {})
    if isinstance(deps, list):
        return {name: "service_started" for name in deps}
    return {name: (d or {}).get("condition", "service_started") for name, d in deps.items()}


# -- the schema ------------------------------------------------------------------------------------
def test_compose_file_matches_the_compose_spec_schema():
    validator = _validator()
    spec = _spec()
    for env in ({}, {"SIDPIPE_CAPTION_URL": "", "SIDPIPE_WORKER_GPU": "1"}):
        # as written, and as Compose sees it after interpolation
        for document in (spec, _interpolate(spec, env)):
            errors = [
                f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
                for e in validator.iter_errors(document)
            ]
            assert not errors, errors


def test_check_jsonschema_cli_accepts_the_file():
    """The same check as a pre-commit hook or CI step would run it."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.compose-spec",
            str(COMPOSE),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    "mistake",
    [
        lambda s: s["services"]["cpu-worker"].update(dependson={"bootstrap": {}}),
        lambda s: s["services"]["bootstrap"]["depends_on"]["prefect-server"].update(
            condition="service_ready"
        ),
        lambda s: s["services"]["cpu-worker"].update(environment="PREFECT_API_URL=x"),
        lambda s: s["services"]["gpu-worker"].update(profiles="gpu"),
    ],
    ids=["unknown-key", "bad-condition", "bad-type", "profiles-not-a-list"],
)
def test_the_schema_catches_mistakes(mistake):
    spec = copy.deepcopy(_spec())
    mistake(spec)
    assert list(_validator().iter_errors(spec))


# -- images, health, order -------------------------------------------------------------------------
def test_compose_services_are_pinned_and_health_checked():
    spec = _spec()
    services = spec["services"]
    assert {"minio", "create-bucket", "postgres", "prefect-server"} <= set(services)
    assert {"bootstrap", "cpu-worker", "gpu-worker"} <= set(services)
    assert "sidpipe" not in services  # the workers replaced the one-off run service
    for name, service in services.items():
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin {image}"
    for name in ("minio", "postgres", "prefect-server"):
        assert "healthcheck" in services[name], name
    assert services["create-bucket"]["depends_on"]["minio"]["condition"] == "service_healthy"
    assert services["prefect-server"]["environment"][
        "PREFECT_SERVER_DATABASE_CONNECTION_URL"
    ].startswith("postgresql+asyncpg://")


def test_every_long_running_service_is_health_checked():
    for name, service in _spec()["services"].items():
        if name in ONE_SHOTS:
            assert service.get("restart") == "no", name
            continue
        assert "healthcheck" in service, name
        assert service.get("restart") == "unless-stopped", name
        if name in WORKERS:
            assert "--with-healthcheck" in service["command"], name  # serves :8080/health


def test_project_images_are_built_and_tagged():
    services = _spec()["services"]
    for name in ("bootstrap", "cpu-worker", "gpu-worker"):
        service = services[name]
        build = service["build"]
        assert (build if isinstance(build, str) else build["context"]) == ".", name
        repo, _, tag = service["image"].partition(":")
        assert repo == "sidpipe" and tag and tag != "latest", name
    gpu = services["gpu-worker"]
    assert "gpu" in gpu["build"]["args"]["EXTRAS"].split(",")
    assert gpu["image"] != services["cpu-worker"]["image"]  # two variants, two tags


def test_dependencies_start_in_order():
    services = _spec()["services"]
    for name, service in services.items():
        for dependency in _depends_on(service):
            assert dependency in services, f"{name} depends on unknown {dependency}"
            # a service outside the gpu profile cannot wait for one inside it
            if "gpu" in services[dependency].get("profiles", []):
                assert "gpu" in service.get("profiles", []), f"{name} -> {dependency}"
    assert _depends_on(services["bootstrap"]) == {
        "prefect-server": "service_healthy",
        "create-bucket": "service_completed_successfully",
    }
    assert _depends_on(services["prefect-server"]) == {"postgres": "service_healthy"}
    for worker in WORKERS:
        assert _depends_on(services[worker]) == {"bootstrap": "service_completed_successfully"}


# -- the names other code relies on ----------------------------------------------------------------
def test_pools_limits_and_results_block_are_named_consistently():
    services = _spec()["services"]
    assert (deploy.CPU_POOL, deploy.GPU_POOL, deploy.POOL_TYPE) == (
        "cpu-pool",
        "gpu-pool",
        "process",
    )
    assert deploy.GPU_POOL_CONCURRENCY == 1
    assert deploy.CONCURRENCY_LIMITS == ("sidpipe-caption", "sidpipe-interests", "sidpipe-embed")
    assert deploy.RESULTS_BLOCK_SLUG == "remote-file-system/sidpipe-results"

    bootstrap = services["bootstrap"]
    command = bootstrap["command"]
    assert command[:3] == ["sidpipe", "bootstrap", "--deploy"]
    assert command[command.index("--results-uri") + 1] == deploy.S3_RESULTS_URI
    limit = _interpolate(command[command.index("--limit") + 1], {})
    assert int(limit) == deploy.DEFAULT_LIMIT
    assert bootstrap["environment"]["SIDPIPE_APP_DIR"] == "/app"

    bucket = deploy.S3_RESULTS_URI.removeprefix("s3://").split("/")[0]
    assert f"store/{bucket}" in services["create-bucket"]["command"][0]
    for worker, pool in WORKERS.items():
        service = services[worker]
        command = service["command"]
        assert command[:3] == ["prefect", "worker", "start"]
        assert command[command.index("--pool") + 1] == pool
        env = _interpolate(service["environment"], {})
        assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
        assert env["PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK"] == deploy.RESULTS_BLOCK_SLUG
        assert env["SIDPIPE_STORE"] == f"s3://{bucket}/artifacts"
        assert env["SIDPIPE_ORCHESTRATION_CONCURRENCY_LIMITS"] == "true"
        for var in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert env[var], f"{worker}: {var}"
    gpu = services["gpu-worker"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert "profiles" not in services["cpu-worker"]


def test_model_urls_follow_the_gpu_profile_or_stay_empty():
    """Unset: the vLLM services of the gpu profile. Set empty in .env: a CPU-only stack."""
    services = _spec()["services"]
    env = services["cpu-worker"]["environment"]
    urls = {
        "SIDPIPE_CAPTION_URL": "captioner",
        "SIDPIPE_INTERESTS_URL": "interests-llm",
        "SIDPIPE_EMBED_URL": "gme-embedder",
    }
    for var, service in urls.items():
        assert "gpu" in services[service]["profiles"]
        assert _interpolate(env[var], {}) == f"http://{service}:8000/v1"
        assert _interpolate(env[var], {var: ""}) == ""


def test_prefect_yaml_deploys_to_the_bootstrapped_pools():
    path = ROOT / "prefect.yaml"
    if not path.exists():
        pytest.skip("prefect.yaml not in this checkout yet")
    pools = {
        d["name"]: d.get("work_pool", {}).get("name")
        for d in yaml.safe_load(path.read_text())["deployments"]
    }
    assert pools.get("nightly") == deploy.CPU_POOL
    assert pools.get("refit") == deploy.GPU_POOL
    assert pools.get("backfill") == deploy.CPU_POOL
    assert pools.get("aktrec") == deploy.GPU_POOL
    assert pools.get("asymrec") == deploy.GPU_POOL
    assert set(pools.values()) <= {deploy.CPU_POOL, deploy.GPU_POOL}


# -- Dockerfile -------------------------------------------------------------------------------------
def pyproject_text() -> str:
    return (ROOT / "pyproject.toml").read_text()


def test_dockerfile_builds_the_project_image():
    text = DOCKERFILE.read_text()
    base = re.search(r"^FROM\s+(\S+)", text, re.M).group(1)
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?(@sha256:[0-9a-f]{64})?", base), base
    assert re.search(r"^ARG EXTRAS=cpu,dask$", text, re.M)
    assert "torch==${TORCH_VERSION}" in text and "--index-url" in text
    assert re.search(r"^ARG TORCH_VERSION=2\.13\.0$", text, re.M)
    assert re.search(r"^ARG TORCH_INDEX=https://download\.pytorch\.org/whl/cpu$", text, re.M)
    assert 'pip install -e ".[${EXTRAS}]"' in text
    # The dependency layer installs against empty package folders: one per package in
    # pyproject.toml, or the editable install fails.
    layer = re.search(r"for pkg in ([^;]+);", text).group(1).split()
    dirs = re.search(r"\[tool\.setuptools\.package-dir\]\n(.*?)\n\n", pyproject_text(), re.S)
    mapping = dict(re.findall(r'"([\w.]+)" = "([\w/]+)"', dirs.group(1)))
    packages = re.findall(
        r'"(sidpipe[\w.]*)"', re.search(r"packages = \[(.*?)\]", pyproject_text(), re.S).group(1)
    )
    for package in packages:
        parent = max((p for p in mapping if package == p or package.startswith(p + ".")), key=len)
        folder = "/".join([mapping[parent], *package[len(parent) :].split(".")[1:]])
        assert folder in layer, f"{package} ({folder}) is missing from the Dockerfile's layer"
    assert re.search(r"^WORKDIR /app$", text, re.M)
    assert re.search(r"^COPY \. \.$", text, re.M)
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^dask = \["prefect-dask', pyproject, re.M)
    assert ".venv" in (ROOT / ".dockerignore").read_text().split()


def test_one_prefect_version_everywhere():
    """Workers (this package's pin, the installed Prefect), deployments and the server agree."""
    from importlib.metadata import requires, version

    root = Path(__file__).resolve().parent.parent
    (pin,) = [r for r in requires("sidpipe") if r.startswith("prefect==")]
    tested = pin.removeprefix("prefect==")
    assert version("prefect") == tested
    assert yaml.safe_load((root / "prefect.yaml").read_text())["prefect-version"] == tested
    image = _spec()["services"]["prefect-server"]["image"]
    assert image == f"prefecthq/prefect:{tested}-python3.11"
