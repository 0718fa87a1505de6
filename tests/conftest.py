"""Shared fixtures: an isolated Prefect, an in-process S3 (moto), small catalogs.

Prefect settings must be in the environment before Prefect is first imported (stack notes):
a throw-away PREFECT_HOME, analytics off (it locks sqlite), and a start-up timeout that a
2-core CI machine can meet.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="sidpipe-prefect-")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"
os.environ["PREFECT_LOGGING_EXTRA_LOGGERS"] = "sidpipe"
os.environ["PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW"] = "ignore"  # as the CLI sets it
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
for name in list(os.environ):
    if name.startswith("SIDPIPE_"):
        del os.environ[name]  # a developer's own settings must not leak into tests

# Prefect sets up its console log handler when first used, on the sys.stderr of that moment.
# Setting it up here binds it to the session's capture; first done inside a test that uses
# capsys, it would hold that test's capture file, closed afterwards, and every later flow's
# console lines and progress bars would fail with 'I/O operation on closed file'.
from prefect.logging.configuration import ensure_logging_setup  # noqa: E402

ensure_logging_setup()

import gzip  # noqa: E402
import json  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402

from sidpipe.config import PipelineConfig, load_config  # noqa: E402
from sidpipe.data import SAMPLE_CATALOG, bundled  # noqa: E402

SAMPLE_DIR = Path(SAMPLE_CATALOG).parent
S3_BUCKET = "sidpipe-test"


# -- Prefect -------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def prefect_api():
    """One Prefect test server for the whole session (about 15 s to start on 2 cores)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for a child process: this session's Prefect server (no second server to
    start) plus `extra`. Use inside tests that use `prefect_api`."""
    from prefect.settings import PREFECT_API_URL

    return {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), **extra}


def kill_during_run(config, point: str, day: date) -> subprocess.CompletedProcess:
    """Run the nightly flow in a child process that SIGKILLs itself at `point` (see
    tests/crash_runner.py for the points)."""
    return subprocess.run(
        [
            sys.executable,
            str(Path(__file__).resolve().parent / "crash_runner.py"),
            config.model_dump_json(),
            day.isoformat(),
            point,
        ],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


FAULT_ORCHESTRATION = {"shard_size": 30, "max_workers": 1}  # the fault matrix's runs


@pytest.fixture(scope="session")
def uninterrupted_sids(tmp_path_factory, prefect_api) -> bytes:
    """sids.parquet of the 120-item catalog (`small_catalog`) run once without a fault, with
    the fault matrix's settings: what every interrupted run must end up with, byte for byte."""
    from sidpipe.flows.nightly import nightly_tokenization
    from sidpipe.storage.store import ArtifactStore

    folder = tmp_path_factory.mktemp("uninterrupted")
    catalog = write_catalog(folder / "catalog", sample_rows(120))
    config = small_config(str(folder / "store"), str(catalog), orchestration=FAULT_ORCHESTRATION)
    manifest = nightly_tokenization(config, run_date=date(2026, 11, 20))
    return ArtifactStore(config.store).read_bytes(manifest["files"]["sids"]["path"])


# -- S3 (moto server, in-process, as s3fs's own test suite does) ---------------------------------
@pytest.fixture(scope="session")
def s3_server():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {
        k: os.environ.get(k)
        for k in (
            "AWS_ENDPOINT_URL",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_REGION",
            "AWS_DEFAULT_REGION",
            "AWS_ALLOW_HTTP",
        )
    }
    os.environ.update(
        {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": "us-east-1",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ALLOW_HTTP": "true",
        }
    )
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def s3(s3_server):
    """A fresh bucket on the moto server; returns its s3:// root."""
    import boto3
    import requests
    import s3fs

    requests.post(f"{s3_server}/moto-api/reset", timeout=10)
    s3fs.S3FileSystem.clear_instance_cache()
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=S3_BUCKET)
    yield f"s3://{S3_BUCKET}"
    s3fs.S3FileSystem.clear_instance_cache()


# -- catalogs ------------------------------------------------------------------------------------
def sample_rows(n: int) -> list[dict[str, str]]:
    with open(SAMPLE_CATALOG, newline="") as handle:
        rows = list(csv.DictReader(handle))[:n]
    return rows


def write_catalog(
    folder: Path, rows: list[dict], name: str = "catalog.csv", copy_images: bool = True
) -> Path:
    """A CSV catalog in `folder`, with the images its rows reference copied next to it."""
    folder.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    path = folder / name
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    if copy_images:
        (folder / "images").mkdir(exist_ok=True)
        for row in rows:
            src = SAMPLE_DIR / (row.get("image") or "")
            if row.get("image", "").startswith("images/") and src.is_file():
                shutil.copy(src, folder / row["image"])
    return path


def sample_items(n: int, images: bool = True):
    """The first `n` sample products as a stage's input table (text only: `images=False`)."""
    import pyarrow as pa

    return pa.Table.from_pylist(
        [
            {
                "item_id": r["item_id"],
                "title": r["title"],
                "description": None,
                "image": str(SAMPLE_DIR / r["image"]) if images else None,
                "image_fingerprint": r["item_id"] if images else None,
                "articleType": r["articleType"],
            }
            for r in sample_rows(n)
        ]
    )


# A tokenizer that fits in seconds, for tests where a worker runs the flow: SIDPIPE_* variables.
SMALL_TOKENIZER = {
    "SIDPIPE_TOKENIZER_CODEBOOK_SIZES": "[8,8,8]",
    "SIDPIPE_TOKENIZER_MIN_POINTS_PER_CODE": "4",
    "SIDPIPE_TOKENIZER_EPOCHS": "5",
    "SIDPIPE_TOKENIZER_HIDDEN_DIMS": "[64]",
    "SIDPIPE_TOKENIZER_LATENT_DIM": "16",
}


@pytest.fixture
def small_catalog(tmp_path) -> Path:
    """120 real products from the bundled sample."""
    return write_catalog(tmp_path / "catalog", sample_rows(120))


def small_config(
    store: str, catalog: str, orchestration: dict | None = None, **tokenizer
) -> PipelineConfig:
    """Settings that keep a flow test to seconds: a small tokenizer, few epochs."""
    return load_config(
        store=store,
        catalog={"uri": catalog, "name": "test-catalog"},
        orchestration=orchestration,
        tokenizer={
            "codebook_sizes": [8, 8, 8],
            "min_points_per_code": 4,
            "epochs": 5,
            "hidden_dims": [64],
            "latent_dim": 16,
            **tokenizer,
        },
    )


# -- a deterministic embedder double (for stage tests that are not about embedding quality) ---
class HashEmbedder:
    """Maps text to a fixed pseudo-random unit vector. Counts calls so tests can see caching."""

    name = "test/hash-embedder"
    revision = "1"
    dim = 16

    def __init__(self) -> None:
        self.embedded = 0

    def input_key(self, item) -> dict:
        return {"text": item.text}

    def embed(self, inputs, progress=None):
        out = np.zeros((len(inputs), self.dim), np.float32)
        for i, item in enumerate(inputs):
            seed = int.from_bytes(item.text.encode()[:8].ljust(8, b"\0"), "little") ^ len(item.text)
            v = np.random.default_rng(seed).standard_normal(self.dim)
            out[i] = v / np.linalg.norm(v)
        self.embedded += len(inputs)
        return out, {}


@pytest.fixture
def hash_embedder() -> HashEmbedder:
    return HashEmbedder()


# -- a slice of Amazon Beauty, tokenized by the real pipeline (training flows) -------------------
BEAUTY_SLICE_USERS = 300


@pytest.fixture(scope="session")
def beauty_slice(tmp_path_factory, prefect_api):
    """The first 300 Beauty users and their items, tokenized (16x16x16 codes) into a store."""
    from sidpipe.flows.nightly import nightly_tokenization

    folder = tmp_path_factory.mktemp("beauty-slice")
    interactions = pq.read_table(bundled("amazon-beauty-2014", "interactions.parquet"))
    users = [str(u) for u in range(1, BEAUTY_SLICE_USERS + 1)]
    interactions = interactions.filter(
        pc.is_in(interactions["user_id"], value_set=pc.cast(users, "string"))
    )
    pq.write_table(interactions, folder / "interactions.parquet")
    wanted = set(interactions["item_id"].to_pylist())
    with (
        gzip.open(bundled("amazon-beauty-2014", "catalog.jsonl.gz"), "rt") as src,
        open(folder / "catalog.jsonl", "w") as out,
    ):
        for line in src:
            if json.loads(line)["item_id"] in wanted:
                out.write(line)
    store = str(folder / "store")
    nightly_tokenization(
        load_config(
            store=store,
            catalog={"uri": str(folder / "catalog.jsonl"), "name": "beauty-slice"},
            tokenizer={
                "method": "rqkmeans",
                "codebook_sizes": [16, 16, 16],
                "min_points_per_code": 4,
            },
        )
    )
    return {
        "store": store,
        "interactions": str(folder / "interactions.parquet"),
        "items": len(wanted),
    }
