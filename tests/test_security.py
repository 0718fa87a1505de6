"""Security (docs/security.md): a catalog's image references cannot read files outside its image
roots nor reach loopback, link-local or private addresses; secrets (API keys, credentials in
URLs, AWS keys) appear in no log, stored file, Prefect parameter, artifact or error message."""

import asyncio
import gzip
import logging
import os
import socket
import threading
from datetime import date
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import SAMPLE_DIR, sample_rows, write_catalog

from sidpipe.config import CatalogConfig
from sidpipe.models.images import ImageError, read_image_bytes
from sidpipe.tasks.ingest import ingest_catalog

pytestmark = pytest.mark.faults
SECRET = "sk-FAKE-SECRET-123"
AWS_SECRET = "aws-FAKE-SECRET-456"
JPEG = (SAMPLE_DIR / "images" / f"{sample_rows(1)[0]['item_id']}.jpg").read_bytes()


def verdict(tmp_path: Path, image: str, **settings) -> str | None:
    """The quarantine reason of one item whose image is `image` (None: it was accepted)."""
    rows = [{"item_id": "x", "title": "t", "image": image}]
    catalog = write_catalog(tmp_path / "shop", rows, copy_images=False)
    result = ingest_catalog(str(catalog), CatalogConfig(**settings))
    assert result.items.num_rows + result.quarantine.num_rows == 1
    return result.quarantine["reason"][0].as_py() if result.quarantine.num_rows else None


@pytest.fixture
def outside(tmp_path) -> Path:
    """A real image next to, not inside, the catalog's folder (tmp_path/shop)."""
    (tmp_path / "private").mkdir()
    path = tmp_path / "private" / "secret.jpg"
    path.write_bytes(JPEG)
    return path


# -- local files: the image roots ---------------------------------------------------------------
def test_dot_dot_cannot_leave_the_catalog_folder(tmp_path, outside):
    assert verdict(tmp_path, "../private/secret.jpg").startswith("unsafe_image:outside image root")


def test_an_absolute_path_outside_the_catalog_folder_is_refused(tmp_path, outside):
    assert verdict(tmp_path, str(outside)).startswith("unsafe_image:outside image root")


def test_a_symlink_inside_the_folder_that_points_outside_is_refused(tmp_path, outside):
    (tmp_path / "shop" / "images").mkdir(parents=True)
    (tmp_path / "shop" / "images" / "link.jpg").symlink_to(outside)
    assert verdict(tmp_path, "images/link.jpg").startswith("unsafe_image:outside image root")


def test_a_file_url_outside_the_catalog_folder_is_refused(tmp_path, outside):
    assert verdict(tmp_path, f"file://{outside}").startswith("unsafe_image:outside image root")


def test_image_roots_let_a_catalog_read_a_shared_folder(tmp_path, outside):
    assert verdict(tmp_path, str(outside), image_roots=[str(outside.parent)]) is None
    assert verdict(tmp_path, f"file://{outside}", image_roots=[str(outside.parent)]) is None
    # A root is a folder, not a name prefix: /private-2 is not under /private.
    assert verdict(tmp_path, str(outside), image_roots=[str(outside.parent) + "-2"]) is not None


def test_s3_images_outside_the_catalog_prefix_are_refused(s3):
    import s3fs

    fs = s3fs.S3FileSystem()
    for key in ("shop/images/ok.jpg", "other/x.jpg"):
        fs.pipe(f"{s3}/{key}".removeprefix("s3://"), JPEG)
    refs = {"ok": "images/ok.jpg", "up": "../other/x.jpg", "abs": f"{s3}/other/x.jpg"}
    catalog = "item_id,title,image\n" + "".join(f"{i},t,{ref}\n" for i, ref in refs.items())
    fs.pipe(f"{s3}/shop/catalog.csv".removeprefix("s3://"), catalog.encode())

    result = ingest_catalog(f"{s3}/shop/catalog.csv", CatalogConfig())
    assert result.items["item_id"].to_pylist() == ["ok"]
    reasons = {q["item_id"]: q["reason"] for q in result.quarantine.to_pylist()}
    assert set(reasons) == {"up", "abs"}
    assert all(r.startswith("unsafe_image:outside image root") for r in reasons.values())
    allowed = CatalogConfig(image_roots=[f"{s3}/other"])
    assert ingest_catalog(f"{s3}/shop/catalog.csv", allowed).items.num_rows == 3


# -- http(s): no loopback, link-local or private addresses --------------------------------------
@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8080/a.jpg", "http://localhost/a.jpg", "http://[::1]/a.jpg"]
)
def test_loopback_http_images_are_refused(tmp_path, url):
    reason = verdict(tmp_path, url, allow_http_images=True)
    assert reason.startswith("unsafe_image:") and "loopback" in reason


def test_the_cloud_metadata_address_is_refused(tmp_path):
    reason = verdict(tmp_path, "http://169.254.169.254/latest/meta-data/", allow_http_images=True)
    assert reason.startswith("unsafe_image:") and "link-local" in reason


def test_a_private_network_address_is_refused(tmp_path):
    reason = verdict(tmp_path, "https://10.1.2.3/a.jpg", allow_http_images=True)
    assert reason.startswith("unsafe_image:") and "private" in reason


@pytest.fixture
def fake_dns(monkeypatch):
    """Host names under .example resolve to the address this dict gives them."""
    names: dict[str, str] = {}
    real = socket.getaddrinfo

    def getaddrinfo(host, port=None, *args, **kwargs):
        if host in names:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (names[host], port or 0))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return names


def test_a_host_name_resolving_to_a_private_address_is_refused(tmp_path, fake_dns):
    fake_dns["images.example"] = "10.0.0.7"
    reason = verdict(tmp_path, "http://images.example/a.jpg", allow_http_images=True)
    assert reason.startswith("unsafe_image:host images.example resolves to 10.0.0.7")


def test_allow_listed_hosts_and_networks_are_accepted(tmp_path, fake_dns):
    fake_dns["images.example"] = "10.0.0.7"
    for url, allowed in [
        ("http://127.0.0.1:8080/a.jpg", ["127.0.0.1"]),
        ("http://localhost/a.jpg", ["LOCALHOST"]),
        ("http://images.example/a.jpg", ["10.0.0.0/8"]),
    ]:
        assert verdict(tmp_path, url, allow_http_images=True, allowed_image_hosts=allowed) is None


@pytest.fixture
def web():
    """An http server on 127.0.0.1: `routes` maps a path to (status, headers, body); `seen`
    records (path, Host header) of every request."""
    routes: dict[str, tuple[int, dict, bytes]] = {}
    seen: list[tuple[str, str]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append((self.path, self.headers.get("Host")))
            status, headers, body = routes.get(self.path, (404, {}, b""))
            self.send_response(status)
            for name, value in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    server.routes, server.seen, server.port = routes, seen, server.server_address[1]
    routes["/img.jpg"] = (200, {"Content-Type": "image/jpeg"}, JPEG)
    yield server
    server.shutdown()


def test_downloads_check_the_host_again(web, fake_dns):
    # Ingest accepted these once; at download the answer is loopback (DNS rebinding).
    fake_dns["images.example"] = "127.0.0.1"
    for url in (
        f"http://127.0.0.1:{web.port}/img.jpg",
        f"http://images.example:{web.port}/img.jpg",
    ):
        with pytest.raises(ImageError, match="unsafe_image:.*loopback"):
            read_image_bytes(url, 10**6, True)
    assert web.seen == []  # refused before connecting


def test_an_allow_listed_host_is_downloaded_pinned_to_the_checked_address(web, fake_dns):
    fake_dns["images.example"] = "127.0.0.1"
    url = f"http://images.example:{web.port}/img.jpg"
    assert read_image_bytes(url, 10**6, True, allowed_hosts=["127.0.0.0/8"]) == JPEG
    assert web.seen == [("/img.jpg", f"images.example:{web.port}")]  # the host's own name
    assert read_image_bytes(url, 10**6, True, allowed_hosts=["images.example"]) == JPEG


def test_redirects_are_checked_hop_by_hop(web):
    web.routes["/local"] = (302, {"Location": "/img.jpg"}, b"")
    web.routes["/away"] = (302, {"Location": f"http://[::1]:{web.port}/img.jpg"}, b"")
    web.routes["/meta"] = (301, {"Location": "http://169.254.169.254/latest/"}, b"")
    base, allowed = f"http://127.0.0.1:{web.port}", ["127.0.0.1"]
    assert read_image_bytes(f"{base}/local", 10**6, True, allowed_hosts=allowed) == JPEG
    for hop in ("/away", "/meta"):
        with pytest.raises(ImageError, match="unsafe_image:"):
            read_image_bytes(f"{base}{hop}", 10**6, True, allowed_hosts=allowed)
    assert [path for path, _ in web.seen] == ["/local", "/img.jpg", "/away", "/meta"]


# -- secrets ------------------------------------------------------------------------------------
def assert_secret_free(where: str, data: bytes | str) -> None:
    data = data.encode() if isinstance(data, str) else data
    for secret in (SECRET, AWS_SECRET):
        assert secret.encode() not in data, f"{secret} leaked in {where}"


def assert_file_secret_free(name: str, data: bytes) -> None:
    """All bytes, and what compressed formats hold (Parquet pages, gzip)."""
    import io

    assert_secret_free(name, data)
    if name.endswith(".parquet"):
        assert_secret_free(name, repr(pq.read_table(io.BytesIO(data)).to_pylist()))
    if name.endswith(".gz"):
        assert_secret_free(name, gzip.decompress(data))


def assert_tree_secret_free(root: Path) -> int:
    files = [p for p in root.rglob("*") if p.is_file()]
    for path in files:
        assert_file_secret_free(str(path), path.read_bytes())
    return len(files)


def assert_prefect_secret_free() -> int:
    """Flow runs (parameters, state messages), task runs, logs and artifacts through the API,
    then the bytes of Prefect's own database and home folder."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler
    from prefect.settings import get_current_settings

    async def read() -> tuple[int, list[str]]:
        await APILogHandler.aflush()
        async with get_client() as client:
            runs = await client.read_flow_runs()
            texts = [run.model_dump_json() for run in runs]
            texts += [t.model_dump_json() for t in await client.read_task_runs()]
            texts += [a.model_dump_json() for a in await client.read_artifacts()]
            ids = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[r.id for r in runs]))
            offset = 0
            while logs := await client.read_logs(log_filter=ids, offset=offset):
                texts += [log.message for log in logs]
                offset += len(logs)
            return len(runs), texts

    count, texts = asyncio.run(read())
    for text in texts:
        assert_secret_free("Prefect's API", text)
    database = get_current_settings().server.database.connection_url.get_secret_value()
    folder = Path(database.split(":///", 1)[-1]).parent
    assert assert_tree_secret_free(folder) >= 1
    assert_tree_secret_free(Path(os.environ["PREFECT_HOME"]))
    return count


@pytest.fixture
def keys(monkeypatch):
    from sidpipe.models import openai_client

    monkeypatch.setattr(openai_client, "BACKOFF_BASE_SECONDS", 0.001)
    return monkeypatch


def test_a_run_records_and_logs_no_secret(tmp_path, s3, keys, caplog, prefect_api):
    """API keys (YAML and environment), credentials in a server URL and the AWS secret key:
    through `sidpipe run` to an S3 store, with one item failing."""
    import s3fs
    from typer.testing import CliRunner
    from vllm_double import VLLMDouble

    from sidpipe.cli import app

    keys.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    s3fs.S3FileSystem.clear_instance_cache()
    rows = sample_rows(24)
    rows[5] = dict(rows[5], title="ALWAYS-500 " + rows[5]["title"])
    catalog = write_catalog(tmp_path / "shop", rows)
    with (
        VLLMDouble("Qwen/Qwen2.5-VL-7B-Instruct") as vlm,
        VLLMDouble("Qwen/Qwen2.5-7B-Instruct") as llm,
        VLLMDouble("Alibaba-NLP/gme-Qwen2-VL-2B-Instruct") as gme,
    ):
        with_credentials = vlm.url.replace("http://", f"http://sidpipe:{SECRET}@")
        (tmp_path / "sidpipe.yaml").write_text(
            f"caption: {{url: '{with_credentials}', max_retries: 1}}\n"
            f"embed: {{url: '{gme.url}', api_key: {SECRET}}}\n"
            "tokenizer: {codebook_sizes: [4, 4], min_points_per_code: 2, epochs: 2,"
            " hidden_dims: [32], latent_dim: 8}\n"
        )
        keys.setenv("SIDPIPE_INTERESTS_URL", llm.url)
        keys.setenv("SIDPIPE_INTERESTS_API_KEY", SECRET)
        caplog.set_level(logging.INFO)
        result = CliRunner().invoke(
            app,
            ["run", "--config", str(tmp_path / "sidpipe.yaml"), "--store", f"{s3}/store"]
            + ["--catalog", str(catalog), "--catalog-name", "shop", "--run-date", "2026-12-01"],
        )
    assert result.exit_code == 0, result.output
    assert "24 in = 23 assigned + 0 quarantined + 1 failed" in result.output
    assert_secret_free("the CLI's output", result.output)
    assert_secret_free("the log", caplog.text)
    assert "***@127.0.0.1" in caplog.text  # the caption server's URL, logged without its key

    fs = s3fs.S3FileSystem()
    files = fs.find(s3.removeprefix("s3://"))
    assert any(f.endswith("errors.parquet") for f in files)
    for name in files:
        assert_file_secret_free(name, fs.cat(name))
    assert assert_prefect_secret_free() >= 1


def test_a_failed_run_reveals_no_secret(tmp_path, small_catalog, keys, prefect_api):
    from typer.testing import CliRunner
    from vllm_double import VLLMDouble

    from sidpipe.cli import app
    from sidpipe.errors import EndpointUnavailableError
    from sidpipe.flows.nightly import nightly_tokenization

    with VLLMDouble("Qwen/Qwen2.5-VL-7B-Instruct", served_model="another/model") as vlm:
        keys.setenv("SIDPIPE_CAPTION_URL", vlm.url)
        keys.setenv("SIDPIPE_CAPTION_API_KEY", SECRET)
        store = tmp_path / "store"
        cli = CliRunner().invoke(
            app, ["run", "--store", str(store), "--catalog", str(small_catalog)]
        )
        assert cli.exit_code == 3 and "another/model" in cli.output
        assert_secret_free("the CLI's error", cli.output)

        from sidpipe.config import load_config

        config = load_config(store=str(store), catalog={"uri": str(small_catalog)})
        assert config.caption.api_key.get_secret_value() == SECRET
        with pytest.raises(EndpointUnavailableError) as error:
            nightly_tokenization(config, run_date=date(2026, 12, 2))
        keys.delenv("SIDPIPE_CAPTION_API_KEY")
        keys.setenv("SIDPIPE_CAPTION_URL", vlm.url.replace("http://", f"http://u:{SECRET}@"))
        cli = CliRunner().invoke(
            app, ["run", "--store", str(store), "--catalog", str(small_catalog)]
        )
        assert cli.exit_code == 3 and "http://***@127.0.0.1" in cli.output
        assert_secret_free("the CLI's error", cli.output)
    assert_secret_free("the error", f"{error.value.one_line} {error.value!r}")
    assert assert_tree_secret_free(store) >= 1  # the failed run's record
    assert_prefect_secret_free()


def test_a_server_error_hides_the_credentials_in_its_url():
    from vllm_double import VLLMDouble

    from sidpipe.config import CaptionConfig
    from sidpipe.errors import EndpointUnavailableError
    from sidpipe.models.openai_client import OpenAICompatClient

    async def check(url: str) -> None:
        async with OpenAICompatClient(CaptionConfig(url=url)) as client:
            await client.health_check()

    with VLLMDouble("Qwen/Qwen2.5-VL-7B-Instruct", served_model="another/model") as vlm:
        with pytest.raises(EndpointUnavailableError) as error:
            asyncio.run(check(vlm.url.replace("http://", f"http://u:{SECRET}@")))
    assert_secret_free("a server error", error.value.one_line)


def test_credentials_in_urls_are_hidden_wherever_a_config_is_shown():
    from fastapi.encoders import jsonable_encoder

    from sidpipe.config import load_config
    from sidpipe.flows.backfill import without_secrets

    url = f"http://sidpipe:{SECRET}@gpu-1:8000/v1"
    config = load_config(caption={"url": url, "api_key": SECRET})
    assert config.caption.urls == [url]  # still used to connect
    for shown in (
        config.model_dump_json(),
        jsonable_encoder(config),
        config.model_dump(mode="json"),
    ):
        assert_secret_free("a config as JSON (manifest, Prefect parameter)", repr(shown))
    assert "http://***@gpu-1:8000/v1" in config.model_dump_json()
    settings = {"caption": {"url": url, "api_key": SECRET, "model": "m"}, "store": "s3://b"}
    assert without_secrets(settings) == {"caption": {"model": "m"}, "store": "s3://b"}
