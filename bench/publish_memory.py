"""Benchmark: peak memory of publishing `embeddings.parquet` as the catalog grows.

The publish stage writes every assigned item's embedding to `embeddings.parquet` and copies
each staged file to its published name, hashing it for the manifest. Today both stream: the
table is written a block of rows at a time from a local spill of the embed stage
(`tasks.publish.write_embeddings`) and the copy reads and hashes 8 MB at a time
(`ArtifactStore.copy`). The baseline, run in the same invocation, is the previous way: the whole
N x D matrix read at once (`stage_matrix`), the table built and written in one piece, then the
file read back whole to be copied and hashed. Each way runs in its own process on the store that
`bench/fit_stage_memory.py` builds (the seeded long-tailed catalog through the real embed
stage); the two published tables must be equal. Prints peak RSS and seconds per way, the ratio
stream/whole, and the machine.

    python bench/publish_memory.py --n 100000 1000000 --dim 256
"""

from __future__ import annotations

import hashlib
import json
import resource
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.fit_stage_memory import arguments, build, in_child, run_info  # noqa: E402
from bench.tokenizers import machine  # noqa: E402


def child(way: str, folder: str, outcome_json: str) -> None:
    """Stage and publish embeddings.parquet one way; prints a JSON line."""
    import pyarrow as pa

    from sidpipe.storage.layout import EMBEDDINGS_FILE, SIDS_FILE, staging_dir
    from sidpipe.storage.store import ArtifactStore
    from sidpipe.tasks.publish import write_embeddings
    from sidpipe.tasks.stage import StageOutcome, read_index, stage_matrix

    store = ArtifactStore(str(Path(folder) / "store"))
    embed, run = StageOutcome.model_validate_json(outcome_json), run_info()
    staging, target = staging_dir(run.run_id), (way, EMBEDDINGS_FILE)
    # Every item got a SID (the assign stage's staged output, item ids only here).
    store.write_parquet(read_index(store, run, embed).select(["item_id"]), *staging, SIDS_FILE)
    started = time.perf_counter()
    if way == "stream":
        rows = write_embeddings(store, run, [embed])
        _, sha256, size = store.copy((*staging, EMBEDDINGS_FILE), target)
    else:
        ids, _, x = stage_matrix(store, run, embed, "embedding")
        table = pa.table(
            {
                "item_id": pa.array(ids, pa.string()),
                "embedding": pa.FixedSizeListArray.from_arrays(
                    pa.array(x.reshape(-1), pa.float32()), x.shape[1]
                ),
            }
        )
        rows = table.num_rows
        store.write_parquet(table, *staging, EMBEDDINGS_FILE)
        del table, x
        data = store.read_bytes(*staging, EMBEDDINGS_FILE)
        store.write_bytes(data, *target)
        sha256, size = hashlib.sha256(data).hexdigest(), len(data)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024
    seconds = time.perf_counter() - started
    print(
        json.dumps(
            {"way": way, "rows": rows, "bytes": size, "sha256": sha256, "gb": peak, "s": seconds}
        )
    )


def main() -> None:
    args = arguments(__doc__)
    if args.child:
        return child(*args.child)
    import pyarrow.parquet as pq

    print(f"machine: {machine()}")
    print("| N x D | file | whole (before): peak RSS, s | stream: peak RSS, s | RSS ratio |")
    print("|---|---:|---:|---:|---:|")
    for n in args.n:
        folder, outcome = build(n, args.dim)
        results = {}
        for way in ("whole", "stream"):
            shutil.rmtree(folder / "store" / way, ignore_errors=True)
            results[way] = in_child(__file__, way, folder, outcome)
        whole, stream = results["whole"], results["stream"]
        published = [pq.read_table(folder / "store" / w / "embeddings.parquet") for w in results]
        assert whole["rows"] == stream["rows"] == n and published[0].equals(published[1])
        del published
        print(
            f"| {n:,} x {args.dim} | {stream['bytes'] / 1e9:.2f} GB "
            f"| {whole['gb']:.2f} GB, {whole['s']:.0f} s | {stream['gb']:.2f} GB, "
            f"{stream['s']:.0f} s | {stream['gb'] / whole['gb']:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
