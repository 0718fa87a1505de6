"""Benchmark: how close the enrichment client gets to a model server's capacity, and its memory.

A vLLM test double (tests/vllm_double.py, in its own process) serves at most `--capacity`
requests at once, each taking `--latency` seconds: its ceiling is capacity / latency requests/s.
The benchmark runs sidpipe's real interests stage (client, cache writes, parsing) against it and
prints the achieved rate as a ratio of that ceiling, beside a naive client that sends one request
at a time, in the same run. Then it runs the stage over `--memory-items` items against a
zero-latency double and prints the peak memory (RSS) of the pipeline process.

    python bench/enrich_throughput.py                 # 9,600 requests + 100k-item memory run
    python bench/enrich_throughput.py --memory-items 10000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import pyarrow as pa

ROOT = Path(__file__).resolve().parent.parent
MODEL = "Qwen/Qwen2.5-7B-Instruct"


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.node()}: {os.cpu_count()} cores, {cpu}, Python {platform.python_version()}"


def start_double(capacity: int, latency: float) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "tests" / "vllm_double.py"),
            "--model",
            MODEL,
            "--capacity",
            str(capacity),
            "--latency",
            str(latency),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    return process, process.stdout.readline().strip()


def synthetic_items(n: int) -> pa.Table:
    return pa.table(
        {
            "item_id": [f"item-{i:07d}" for i in range(n)],
            "title": [f"Product {i} cotton shirt size {i % 7}" for i in range(n)],
            "description": [None] * n,
        }
    )


def run_stage(url: str, items: pa.Table, max_in_flight: int, store_dir: str) -> float:
    from sidpipe.config import InterestsConfig
    from sidpipe.storage.manifest import utcnow
    from sidpipe.storage.store import ArtifactStore
    from sidpipe.tasks.interests import interests_stage
    from sidpipe.tasks.stage import RunInfo

    run = RunInfo(run_id="bench", run_date=date.today(), catalog="bench", started_at=utcnow())
    started = time.perf_counter()
    outcome = interests_stage(
        ArtifactStore(store_dir),
        run,
        items,
        [],
        InterestsConfig(url=url, max_in_flight=max_in_flight),
    )
    elapsed = time.perf_counter() - started
    assert outcome.stats.computed == items.num_rows, outcome.stats
    return elapsed


async def naive(url: str, n: int) -> float:
    """One request at a time, no concurrency: what a simple loop over items achieves."""
    import httpx

    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=60) as client:
        for i in range(n):
            response = await client.post(
                f"{url}/chat/completions",
                json={"model": MODEL, "messages": [{"role": "user", "content": f"naive {i}"}]},
            )
            response.raise_for_status()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--capacity", type=int, default=64)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--requests", type=int, default=9600)
    parser.add_argument("--naive-requests", type=int, default=50)
    parser.add_argument("--memory-items", type=int, default=100_000)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    print(f"machine: {machine()}")

    ceiling = args.capacity / args.latency
    process, url = start_double(args.capacity, args.latency)
    try:
        with tempfile.TemporaryDirectory() as store:
            elapsed = run_stage(url, synthetic_items(args.requests), args.capacity, store)
        sidpipe_rate = args.requests / elapsed
        naive_rate = args.naive_requests / asyncio.run(naive(url, args.naive_requests))
    finally:
        process.terminate()
    print(
        f"\nserver double: capacity {args.capacity} at once, {args.latency * 1000:.0f} ms each "
        f"-> ceiling {ceiling:.0f} requests/s"
    )
    print(f"{'client':<34}{'requests':>10}{'req/s':>10}{'of ceiling':>12}{'vs naive':>10}")
    print(
        f"{'sidpipe interests stage':<34}{args.requests:>10,}{sidpipe_rate:>10.1f}"
        f"{sidpipe_rate / ceiling:>12.3f}{sidpipe_rate / naive_rate:>9.1f}x"
    )
    print(
        f"{'naive (one request at a time)':<34}{args.naive_requests:>10,}{naive_rate:>10.1f}"
        f"{naive_rate / ceiling:>12.3f}{1:>9.1f}x"
    )

    if args.memory_items:
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        process, url = start_double(256, 0.0)
        try:
            with tempfile.TemporaryDirectory() as store:
                elapsed = run_stage(url, synthetic_items(args.memory_items), 256, store)
        finally:
            process.terminate()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(
            f"\nmemory: {args.memory_items:,} items through the interests stage in "
            f"{elapsed:.0f} s ({args.memory_items / elapsed:.0f} items/s, zero-latency double)"
        )
        print(
            f"peak RSS of the pipeline process: {peak:.0f} MiB "
            f"(before the run: {rss_before:.0f} MiB)"
        )


if __name__ == "__main__":
    main()
