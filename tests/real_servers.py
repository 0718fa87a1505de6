"""Real servers for tests: PostgreSQL in a temporary folder, a Prefect server on it, a worker.

Each is started the way an operator would start it and stopped (with its children) when its
context ends. PostgreSQL refuses to run as root: as root, its commands run as the `postgres`
user (Debian's package creates it), in a folder that user owns.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from conftest import SMALL_TOKENIZER

PG_USER = "postgres"  # the unprivileged user PostgreSQL's commands run as under root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_bin(command: str) -> str:
    found = shutil.which(command) or next(
        iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{command}"), reverse=True)), None
    )
    if found is None:
        pytest.skip(f"PostgreSQL is not installed ({command} not found)")
    return found


def _as_pg_user(command: list[str]) -> list[str]:
    return ["runuser", "-u", PG_USER, "--", *command] if os.geteuid() == 0 else command


@contextmanager
def postgres() -> Iterator[str]:
    """A fresh PostgreSQL cluster on a free port; yields Prefect's connection URL for it."""
    root = Path(tempfile.mkdtemp(prefix="sidpipe-pg-"))
    data, port = root / "data", free_port()
    if os.geteuid() == 0:
        root.chmod(0o755)
        shutil.chown(root, PG_USER)

    def pg(*command: str, timeout: float = 120) -> None:
        subprocess.run(_as_pg_user(list(command)), check=True, capture_output=True, timeout=timeout)

    pg(pg_bin("initdb"), "-D", str(data), "-U", "prefect", "-A", "trust", "--no-sync", "-E", "UTF8")
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    pg(pg_bin("pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "start")
    try:
        pg(pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "prefect", "prefect")
        yield f"postgresql+asyncpg://prefect@127.0.0.1:{port}/prefect"
    finally:
        subprocess.run(
            _as_pg_user([pg_bin("pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]),
            capture_output=True,
            timeout=60,
        )
        shutil.rmtree(root, ignore_errors=True)


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without the test session's Prefect and sidpipe settings (a
    server and its workers read their own), plus `extra`."""
    keep = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PREFECT_", "SIDPIPE_")) or k == "PREFECT_SERVER_ANALYTICS_ENABLED"
    }
    return {**keep, **extra}


@contextmanager
def process(command: list[str], env: dict[str, str], log: Path, cwd: Path | None = None):
    """A background process in its own process group, logging to `log`; stopped at the end."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            command, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield proc
    finally:
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=wait)
                break
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not healthy after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


@contextmanager
def prefect_server(database_url: str, home: Path) -> Iterator[str]:
    """`prefect server start` on the database; yields its API URL once /api/health answers."""
    port = free_port()
    env = clean_env(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_DATABASE_CONNECTION_URL=database_url,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_API_URL=f"http://127.0.0.1:{port}/api",  # the UI's own calls, on this port
    )
    log = home / "server.log"
    home.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1"]
    with process([*command, "--port", str(port)], env, log) as proc:
        api = f"http://127.0.0.1:{port}/api"
        wait_healthy(f"{api}/health", proc, log)
        yield api


# -- sidpipe on the server, as an operator sets it up ---------------------------------------------
REPO = Path(__file__).resolve().parent.parent
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


class Api:
    """The few REST calls the UI makes, against the server under test."""

    def __init__(self, url: str):
        self.http = httpx.Client(base_url=url, timeout=30)

    def deployment(self, name: str) -> dict:
        return self._ok(self.http.get(f"/deployments/name/{name}"))

    def start(self, deployment: dict, parameters: dict) -> str:
        run = self.http.post(
            f"/deployments/{deployment['id']}/create_flow_run", json={"parameters": parameters}
        )
        return self._ok(run)["id"]

    def wait(self, run_id: str, timeout: float = 600) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self._ok(self.http.get(f"/flow_runs/{run_id}"))
            if run["state"] and run["state"]["type"] in FINAL:
                return run
            time.sleep(1)
        raise AssertionError(f"flow run {run_id} not finished after {timeout:.0f} s")

    def runs_of(self, deployment: dict) -> list[dict]:
        body = {"flow_runs": {"deployment_id": {"any_": [deployment["id"]]}}, "limit": 200}
        return self._ok(self.http.post("/flow_runs/filter", json=body))

    def runs_named(self, name: str) -> list[dict]:
        body = {"flow_runs": {"name": {"any_": [name]}}, "limit": 200}
        return self._ok(self.http.post("/flow_runs/filter", json=body))

    def artifacts(self, run_id: str) -> list[dict]:
        body = {"artifacts": {"flow_run_id": {"any_": [run_id]}}, "limit": 200}
        return self._ok(self.http.post("/artifacts/filter", json=body))

    def logs(self, run_id: str) -> list[dict]:
        lines: list[dict] = []
        while True:
            body = {
                "logs": {"flow_run_id": {"any_": [run_id]}},
                "sort": "TIMESTAMP_ASC",
                "limit": 200,
                "offset": len(lines),
            }
            page = self._ok(self.http.post("/logs/filter", json=body))
            lines += page
            if len(page) < 200:
                return lines

    def logs_once(self, run_id: str, text: str, timeout: float = 60) -> list[dict]:
        """The run's log lines once one contains `text`: a worker ships them in batches, so
        they may land after the run's final state."""
        deadline = time.monotonic() + timeout
        while True:
            lines = self.logs(run_id)
            if any(text in line["message"] for line in lines) or time.monotonic() > deadline:
                return lines
            time.sleep(1)

    @staticmethod
    def _ok(response: httpx.Response):
        assert response.status_code < 300, response.text
        return response.json()


@dataclass
class Stack:
    api: str  # the Prefect API URL
    ui: str  # the Prefect UI
    store: Path  # the workers' artifact store
    bootstrap_output: str  # what `sidpipe bootstrap --deploy` printed
    worker_log: Path


@contextmanager
def sidpipe_on_prefect(tmp: Path, catalog: Path) -> Iterator[Stack]:
    """PostgreSQL, a Prefect server on it, `sidpipe bootstrap --deploy` (results in a local
    folder; the deployer's environment sets its own SIDPIPE_STORE, which must not leak into the
    deployments) and a process worker on cpu-pool started with only PREFECT_API_URL, the
    results block, the store and the catalog (no PREFECT_LOGGING_EXTRA_LOGGERS)."""
    started = time.monotonic()
    with postgres() as database, prefect_server(database, tmp / "server") as api:
        print(f"PostgreSQL + Prefect server ready in {time.monotonic() - started:.1f} s")
        deployer = clean_env(
            PREFECT_API_URL=api, PREFECT_HOME=str(tmp / "deployer"), SIDPIPE_STORE="/mine"
        )
        command = [sys.executable, "-m", "sidpipe.cli", "bootstrap", "--deploy"]
        done = subprocess.run(
            [*command, "--results-uri", str(tmp / "results")],
            env=deployer,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        slug = re.search(r"PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK=(\S+)", done.stdout).group(1)
        worker_env = clean_env(
            PREFECT_API_URL=api,
            PREFECT_HOME=str(tmp / "worker"),
            PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK=slug,
            PREFECT_WORKER_QUERY_SECONDS="1",
            PREFECT_WORKER_PREFETCH_SECONDS="1",
            SIDPIPE_STORE=str(tmp / "store"),
            SIDPIPE_CATALOG_URI=str(catalog),
            SIDPIPE_CATALOG_NAME="shop",
            **SMALL_TOKENIZER,
        )
        worker = [sys.executable, "-m", "prefect", "worker", "start", "--pool", "cpu-pool"]
        log = tmp / "worker.log"
        with process(worker, worker_env, log, cwd=REPO):
            ui = api.removesuffix("/api")
            yield Stack(api, ui, tmp / "store", done.stdout, log)
