"""docker-compose.yml is valid YAML, pins every image and wires services by health."""

from pathlib import Path

import yaml

COMPOSE = Path(__file__).resolve().parent.parent / "docker-compose.yml"


def test_compose_services_are_pinned_and_health_checked():
    spec = yaml.safe_load(COMPOSE.read_text())
    services = spec["services"]
    assert {"minio", "create-bucket", "postgres", "prefect-server"} <= set(services)
    for name, service in services.items():
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin {image}"
    for name in ("minio", "postgres", "prefect-server"):
        assert "healthcheck" in services[name], name
    assert services["create-bucket"]["depends_on"]["minio"]["condition"] == "service_healthy"
    assert "prefect:3.8.8" in services["prefect-server"]["image"]
    assert services["prefect-server"]["environment"][
        "PREFECT_SERVER_DATABASE_CONNECTION_URL"
    ].startswith("postgresql+asyncpg://")
