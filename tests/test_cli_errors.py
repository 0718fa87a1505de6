"""Every expected failure a user can meet on the command line: two lines (`error:`, `hint:`), no
traceback, its exit code, within seconds (nothing starts Prefect's server first).

Each case runs the real `sidpipe` in a child process from an empty folder, as a new user would.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest


def rows(n: int) -> str:
    return "".join(f"i{i},title {i}\n" for i in range(n))


NO_AWS = {k: "" for k in os.environ if k.startswith("AWS_")} | {
    "AWS_EC2_METADATA_DISABLED": "true",  # no credentials anywhere, and no metadata server to ask
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
    "AWS_CONFIG_FILE": "/nonexistent",
}


def sidpipe(folder: Path, *args: str, **env: str) -> tuple[int, list[str], float]:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "sidpipe.cli", *args],
        cwd=folder,
        env={**os.environ, "COLUMNS": "200", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    return done.returncode, lines, time.perf_counter() - started


def write(folder: Path, name: str, text: str) -> str:
    (folder / name).write_text(text)
    return name


CASES = {
    "missing catalog": (
        lambda d: ["run", "--catalog", "does-not-exist.jsonl"],
        {},
        2,
        "does-not-exist.jsonl: catalog file not found",
    ),
    "catalog without item_id": (
        lambda d: ["run", "--catalog", write(d, "items.csv", "sku,title\n" + rows(100))],
        {},
        2,
        "no 'item_id' column",
    ),
    "catalog of 5 rows": (
        lambda d: ["run", "--catalog", write(d, "items.csv", "item_id,title\n" + rows(5))],
        {},
        2,
        "5 rows, but fitting a tokenizer needs at least 78",
    ),
    "dead model server": (
        lambda d: ["run"],
        {"SIDPIPE_CAPTION_URL": "http://127.0.0.1:9/v1"},
        3,
        "caption",
    ),
    "list setting not JSON": (
        lambda d: ["run"],
        {"SIDPIPE_TOKENIZER_CODEBOOK_SIZES": "256,256"},
        2,
        "SIDPIPE_TOKENIZER_CODEBOOK_SIZES='256,256' is not JSON",
    ),
    "run date not a date": (lambda d: ["run", "--run-date", "yesterday"], {}, 2, "not a date"),
    "s3 store without credentials": (
        lambda d: ["inspect", "fashion-sample", "--store", "s3://bucket/sidpipe"],
        NO_AWS,
        3,
        "cannot read s3://bucket/sidpipe",
    ),
    "mistyped store": (
        lambda d: ["inspect", "--store", "artefacts"],
        {},
        3,
        "no artifact store at artefacts",
    ),
    "unknown catalog's tokenizers": (
        lambda d: (d / "artifacts").mkdir() or ["tokenizers", "nope"],
        {},
        2,
        "catalog 'nope' has no tokenizer",
    ),
    "fit on a file that is not Parquet": (
        lambda d: ["fit", "--embeddings", write(d, "e.parquet", "x"), "--out", "out"],
        {},
        2,
        "e.parquet",
    ),
    "backfill against a dead Prefect server": (
        lambda d: ["backfill", "--from", "2026-11-01", "--to", "2026-11-02", "--submit"],
        {"PREFECT_API_URL": "http://127.0.0.1:9/api"},
        3,
        "cannot reach the Prefect server",
    ),
    "training before anything is published": (
        lambda d: (d / "artifacts").mkdir() or ["train", "genrec", "--config", "cpu-small"],
        {},
        2,
        "no published run of catalog 'beauty'",
    ),
    "click models with seeds that are not numbers": (
        lambda d: ["train", "aktrec", "--seeds", "1,two"],
        {},
        2,
        "--seeds '1,two': not whole numbers",
    ),
    "unknown training preset": (
        lambda d: ["train", "genrec", "--config", "nope"],
        {},
        2,
        "unknown training config 'nope'",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_an_expected_failure_is_an_error_line_and_a_hint(case, tmp_path):
    args, env, code, message = CASES[case]
    rc, lines, seconds = sidpipe(tmp_path, *args(tmp_path), **env)
    assert rc == code, lines
    assert len(lines) == 2, lines
    assert lines[0].startswith("error: ") and message in lines[0], lines
    assert lines[1].startswith("hint: ") and len(lines[1]) > len("hint: ") + 10, lines
    assert seconds < 30, f"{case}: {seconds:.1f}s (a check must not wait for Prefect)"


def test_a_backfill_submitted_where_nothing_is_deployed_says_what_to_deploy(prefect_api, tmp_path):
    from conftest import subprocess_env

    env = subprocess_env()
    rc, lines, _ = sidpipe(
        tmp_path,
        "backfill",
        "--from",
        "2026-11-01",
        "--to",
        "2026-11-02",
        "--submit",
        PREFECT_API_URL=env["PREFECT_API_URL"],
    )
    assert rc == 3, lines
    assert len(lines) == 2, lines
    assert "has no deployment sidpipe-backfill/backfill" in lines[0]
    assert "sidpipe bootstrap --deploy" in lines[1]


def test_version_short_help_and_flags_without_a_value(tmp_path):
    rc, lines, _ = sidpipe(tmp_path, "--version")
    assert rc == 0 and lines[0].startswith("sidpipe 0.")
    rc, lines, _ = sidpipe(tmp_path, "run", "-h")
    text = "\n".join(lines)
    assert rc == 0 and "--refit" in text and "--catalog" in text
    refit = next(line for line in lines if "--refit" in line)
    assert "<bool>" not in text and "<" not in refit, refit
    assert "<str>" in next(line for line in lines if "--catalog " in line)


def test_published_files_are_readable_by_others_under_the_usual_umask(tmp_path):
    from sidpipe.storage.store import ArtifactStore

    old = os.umask(0o022)
    try:
        # The mode is read at import: ask a fresh process, as a user's run would.
        code = (
            "import sys; from sidpipe.storage.store import ArtifactStore; "
            "ArtifactStore(sys.argv[1]).write_json({}, 'sids', 'x.json')"
        )
        subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True)
    finally:
        os.umask(old)
    assert (tmp_path / "sids" / "x.json").stat().st_mode & 0o777 == 0o644
    table = pa.table({"a": [1]})
    ArtifactStore(str(tmp_path)).write_parquet(table, "t.parquet")
    assert pq.read_table(tmp_path / "t.parquet").equals(table)
