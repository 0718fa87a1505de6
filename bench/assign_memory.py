"""Benchmark: peak memory and time of building a SID table (`models.sid_table.assign_sids`),
a nightly run's way: N items, a previous table of the same tokenizer, 10% of the items changed
(a new content hash, and a new last-level code for each of those).

The baseline, run in the same invocation, is `assign_sids` as it was at another commit
(`--baseline`, default 8769407, the row-by-row version: a dict per previous row, Python tuples
and strings per item), loaded from `git show`; each way runs in its own process, is given the
inputs its stage built (Python lists then, Arrow arrays now), and must give an identical table.
Prints peak RSS above the inputs (the kernel's peak mark reset once the inputs are built, Linux
only), seconds, the ratios and the machine.

`--reassign` runs the nightly build with `collisions: reassign`: each changed item's codes are
then the next (kept) item's, so every one of them must move, and its nearby tuples are its own
with the last code shifted by 0, 1, 2, ... (errors rising), the same function both ways.

    python bench/assign_memory.py --n 100000 1000000
    python bench/assign_memory.py --n 1000000 4000000 --reassign
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.tokenizers import machine  # noqa: E402

SIZES = [4096, 2048, 1024]


def inputs(n: int, arrow: bool, crowded: bool = False):
    """(ids, codes, hashes, changed codes, changed hashes) of a seeded catalog of n items; with
    `crowded`, each changed item takes the next item's codes."""
    import pyarrow as pa

    rng = np.random.default_rng(0)
    ids = [f"item-{i:09d}" for i in range(n)]
    codes = rng.integers(0, SIZES, size=(n, len(SIZES))).astype(np.int32)
    hashes = [f"{i:064x}" for i in range(n)]
    changed_hashes = [h if i % 10 else f"{i + 1:064x}"[::-1] for i, h in enumerate(hashes)]
    changed = codes.copy()
    changed[::10, -1] = (changed[::10, -1] + 1) % SIZES[-1]
    if crowded:
        changed[: n - 1 : 10] = codes[1::10][: len(changed[: n - 1 : 10])]
    if arrow:
        ids, hashes, changed_hashes = (
            pa.array(v, pa.string()) for v in (ids, hashes, changed_hashes)
        )
    return ids, codes, hashes, changed, changed_hashes


def load(way: str, baseline: str):
    if way == "now":
        from sidpipe.models import sid_table

        return sid_table
    folder = ROOT / "bench" / ".cache"
    folder.mkdir(exist_ok=True)
    # The baseline's own sids.py too (its sid_string), imported under the commit's name.
    for name in ("sids", "sid_table"):
        source = subprocess.run(
            ["git", "show", f"{baseline}:models/{name}.py"],
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        source = source.replace("from sidpipe.models.sids import", f"from sids_{baseline} import")
        (folder / f"{name}_{baseline}.py").write_text(source)
    sys.path.insert(0, str(folder))
    return importlib.import_module(f"sid_table_{baseline}")


def _status_gb(field: str) -> float:
    """A memory figure of this process from /proc/self/status (Linux), in GB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> float:
    """Collect garbage, reset the kernel's peak-RSS mark to the current RSS and return it: the
    peak measured after this is the call's, not that of building its inputs (lists freed after
    their conversion to Arrow would otherwise hide under an earlier, higher peak)."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    return _status_gb("VmRSS")


def shifted_nearby(codes: np.ndarray):
    """A `Nearby` for the benchmark: a row's tuples are its own (of `codes`) with the last code
    shifted by 0, 1, 2, ..., errors 0, 0.01, 0.02, ..."""

    def nearby(rows, count):
        own = codes[np.asarray(rows, np.int64)]
        tuples = np.repeat(own[:, None, :], count, axis=1)
        tuples[:, :, -1] = (own[:, None, -1] + np.arange(count)) % SIZES[-1]
        return tuples, np.tile(np.arange(count, dtype=np.float32) / 100, (len(rows), 1))

    return nearby


def one(way: str, n: int, baseline: str, reassign: bool) -> None:
    """Run one way in this process; print its JSON (and write its table for the check)."""
    import pyarrow.parquet as pq

    module = load(way, baseline)
    ids, codes, hashes, changed, changed_hashes = inputs(n, way == "now", reassign)
    options = {"nearby": shifted_nearby(changed.copy())} if reassign else {}
    before = _reset_peak()
    started = time.perf_counter()
    first, _ = module.assign_sids(ids, codes, "tok", date(2026, 12, 1), hashes)
    first_s = time.perf_counter() - started
    started = time.perf_counter()
    table, stats = module.assign_sids(
        ids, changed, "tok", date(2026, 12, 2), changed_hashes, previous=first, **options
    )
    nightly_s = time.perf_counter() - started
    peak = _status_gb("VmHWM")
    pq.write_table(table, ROOT / "bench" / ".cache" / f"assign-{way}-{n}.parquet")
    print(
        json.dumps(
            {
                "way": way,
                "inputs_gb": before,
                "above_inputs_gb": peak - before,
                "first_s": first_s,
                "nightly_s": nightly_s,
                "kept": stats["kept_exactly"],
                "reassigned": stats["reassigned"],
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--baseline", default="8769407")
    parser.add_argument("--reassign", action="store_true", help="collisions: reassign")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # way, n
    args = parser.parse_args()
    if args.one:
        one(args.one[0], int(args.one[1]), args.baseline, args.reassign)
        return
    import pyarrow.parquet as pq

    mode = "collisions: reassign" if args.reassign else "collisions: suffix"
    print(f"assign_sids, nightly run (previous table, 10% changed, {mode}); {machine()}")
    print("| N | way | inputs | peak above inputs | first run s | nightly run s |")
    print("|---:|---|---:|---:|---:|---:|")
    for n in args.n:
        rows = {}
        for way in ("then", "now"):
            out = subprocess.run(
                [sys.executable, __file__, "--one", way, str(n), "--baseline", args.baseline]
                + ["--reassign"] * args.reassign,
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            rows[way] = r = json.loads(out.strip().splitlines()[-1])
            label = f"at {args.baseline}" if way == "then" else "now"
            print(
                f"| {n:,} | {label} | {r['inputs_gb']:.2f} GB | {r['above_inputs_gb']:.2f} GB "
                f"| {r['first_s']:.1f} | {r['nightly_s']:.1f} |"
            )
        tables = [
            pq.read_table(ROOT / "bench" / ".cache" / f"assign-{w}-{n}.parquet") for w in rows
        ]
        same = tables[0].equals(tables[1])
        then, now = rows["then"], rows["now"]
        print(
            f"N={n:,}: memory above inputs {now['above_inputs_gb'] / then['above_inputs_gb']:.2f}x, "
            f"nightly time {now['nightly_s'] / then['nightly_s']:.2f}x the baseline's; "
            f"tables identical: {same} ({now['reassigned']:,} items moved by reassign)"
        )
        if not same:
            raise SystemExit("the two ways gave different SID tables")


if __name__ == "__main__":
    main()
