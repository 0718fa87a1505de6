"""What resuming a killed run saves: Amazon Beauty (12,101 items) through `sidpipe run`.

Three ways to finish after a machine dies halfway through the embed stage:
- start over on an empty store (the baseline: a pipeline with no stage cache, no checkpoints);
- `sidpipe run` again: the run is adopted, finished shards are kept (`resumed`);
- `sidpipe run` again with `orchestration.resume: false`: a new run that still finds the
  embeddings in the content-addressed cache but redoes every shard's lookups.

The kill is a SIGKILL from outside, sent once half the embed shards have their checkpoint.
Prints wall times, the ratios against starting over, and the machine.

    python bench/resume.py [--shard-size 1000]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.beauty import beauty_items  # noqa: E402


def write_catalog(folder: Path) -> Path:
    path = folder / "beauty.jsonl.gz"
    with gzip.open(path, "wt") as handle:
        for item in beauty_items():
            categories = ", ".join(dict.fromkeys(c for p in item["categories"] for c in p))
            row = {
                "item_id": str(item["item_id"]),
                "title": item["title"],
                "brand": item.get("brand"),
                "categories": categories,
            }
            handle.write(json.dumps(row) + "\n")
    return path


def sidpipe_run(env: dict, **extra_env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "sidpipe.cli", "run"],
        env={**env, **extra_env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def timed(env: dict, **extra_env: str) -> float:
    started = time.perf_counter()
    proc = sidpipe_run(env, **extra_env)
    if proc.wait() != 0:
        raise RuntimeError(f"sidpipe run failed ({proc.returncode})")
    return time.perf_counter() - started


def kill_halfway(env: dict, store: Path, shards: int) -> None:
    proc = sidpipe_run(env)
    while len(list(store.glob("runs/*/shards/embed-*.json"))) < shards // 2:
        if proc.poll() is not None:
            raise RuntimeError("the run finished before it could be killed")
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def embed_stats(store: Path) -> dict:
    (manifest,) = store.glob("sids/beauty/*/_MANIFEST.json")
    return json.loads(manifest.read_text())["stages"]["embed"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shard-size", type=int, default=1000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sidpipe-bench-resume-"))
    catalog = write_catalog(work)
    n_items = 12101
    shards = -(-n_items // args.shard_size)
    base = {
        **os.environ,
        "PREFECT_HOME": str(work / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "SIDPIPE_CATALOG_URI": str(catalog),
        "SIDPIPE_CATALOG_NAME": "beauty",
        "SIDPIPE_TOKENIZER_METHOD": "rqkmeans",  # keep the fit short: this measures resume
        "SIDPIPE_TOKENIZER_CODEBOOK_SIZES": "[256,256,256]",
        "SIDPIPE_ORCHESTRATION_SHARD_SIZE": str(args.shard_size),
        "SIDPIPE_ORCHESTRATION_MAX_WORKERS": "1",
    }
    # Warm-up on the bundled sample: Prefect's database exists, model files are in page cache.
    warmup = {k: v for k, v in base.items() if not k.startswith("SIDPIPE_CATALOG")}
    timed({**warmup, "SIDPIPE_STORE": str(work / "warmup")})

    rows = []
    full = timed({**base, "SIDPIPE_STORE": str(work / "fresh")})
    rows.append(("start over (empty store)", full, "-"))
    scenarios = (
        ("sidpipe run again (resume)", "resume", {}),
        ("again, resume: false", "no-resume", {"SIDPIPE_ORCHESTRATION_RESUME": "false"}),
    )
    for name, folder, extra in scenarios:
        store = work / folder
        env = {**base, "SIDPIPE_STORE": str(store)}
        kill_halfway(env, store, shards)
        seconds = timed(env, **extra)
        s = embed_stats(store)
        detail = f"computed {s['computed']:,}, cached {s['cached']:,}, resumed {s['resumed']:,}"
        rows.append((name, seconds, detail))

    print(
        f"\nAmazon Beauty, {n_items:,} items, {shards} shards of {args.shard_size:,}; killed after "
        f"{shards // 2} embed shards"
    )
    cpu = platform.processor() or platform.platform()
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, {cpu}, no GPU")
    print(f"{'finish after the kill':32s} {'seconds':>8s} {'vs start over':>14s}  embed items")
    for name, seconds, detail in rows:
        print(f"{name:32s} {seconds:8.1f} {seconds / full:13.2f}x  {detail}")


if __name__ == "__main__":
    main()
