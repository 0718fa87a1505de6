"""Benchmark: peak memory of the fit and assign stages as the catalog grows.

The fit and assign stages read the embed stage's vectors. Today they spill the stage cache to a
local file a part at a time and read it back in blocks (`storage/spill.py`); the baseline, run
in the same invocation, is the previous way: the whole N x D matrix read into memory at once
(`stage_matrix`). For each N, a store is filled once through the real embed stage with the
seeded long-tailed catalog of `bench/tokenizer_scale.py` (as float32), then each way runs in its
own process, fit (on a fixed `fit_sample_size`) and the reconstruction report, and prints its
peak RSS and seconds, the ratio spill/whole, and the machine.

    python bench/fit_stage_memory.py --n 100000 400000 --dim 256
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.tokenizer_scale import CACHE, synthetic  # noqa: E402
from bench.tokenizers import machine  # noqa: E402

SETTINGS = {"method": "rqkmeans", "codebook_sizes": [256, 256, 256], "fit_sample_size": 32768}


class CatalogEmbedder:
    """The embed stage's embedder for this benchmark: item `i` (title "item i") gets row i of
    the synthetic catalog. It stands in for GME so the store holds a realistic cache."""

    name, revision = "bench/synthetic", "1"

    def __init__(self, x: np.ndarray) -> None:
        self.x, self.dim = x, x.shape[1]

    def input_key(self, item) -> dict:
        return {"text": item.text}

    def embed(self, inputs, progress=None):
        rows = [int(item.text.split()[1].rstrip(".")) for item in inputs]
        if progress:
            progress(len(rows))
        return np.asarray(self.x[rows], np.float32), {}


def run_info():
    from sidpipe.storage.manifest import utcnow
    from sidpipe.tasks.stage import RunInfo

    return RunInfo(run_id="bench", run_date=date(2026, 12, 5), catalog="c", started_at=utcnow())


def build(n: int, dim: int) -> tuple[Path, str]:
    """A store whose embed stage holds the n-item catalog; (folder, the outcome as JSON)."""
    import pyarrow as pa

    from sidpipe.config import EmbedConfig
    from sidpipe.storage.store import ArtifactStore
    from sidpipe.tasks.embed import embed_stage

    folder = CACHE / f"fit-memory-{n}x{dim}"
    done = folder / "embed-outcome.json"
    if done.exists():
        return folder, done.read_text()
    x = synthetic(n, dim)
    items = pa.table(
        {
            "item_id": [f"{i:09d}" for i in range(n)],
            "title": [f"item {i}" for i in range(n)],
            "description": pa.nulls(n, pa.string()),
            "image": pa.nulls(n, pa.string()),
        }
    )
    store = ArtifactStore(str(folder / "store"))
    outcome = embed_stage(store, run_info(), items, [], CatalogEmbedder(x), EmbedConfig())
    done.write_text(outcome.model_dump_json())
    return folder, done.read_text()


def child(way: str, folder: str, outcome_json: str) -> None:
    """Fit and the reconstruction report, one way; prints a JSON line."""
    from sidpipe.config import TokenizerConfig
    from sidpipe.models.tokenizer import screen_embeddings
    from sidpipe.storage.hashing import hash_strings
    from sidpipe.storage.store import ArtifactStore
    from sidpipe.tasks.fit import fit_stage
    from sidpipe.tasks.fitting import fit_and_store, load_tokenizer
    from sidpipe.tasks.stage import StageOutcome, stage_matrix, stage_rows

    store = ArtifactStore(str(Path(folder) / "store"))
    embed, run = StageOutcome.model_validate_json(outcome_json), run_info()
    config = TokenizerConfig(**SETTINGS)
    started = time.perf_counter()
    if way == "spill":
        tokenizer_id = fit_stage(store, run, embed, config).tokenizer_id
        tokenizer, _ = load_tokenizer(store, tokenizer_id)
        with stage_rows(store, run, embed, "embedding") as x:
            cosine = tokenizer.reconstruction_cosine_by_depth(x)
    else:
        ids, hashes, x = stage_matrix(store, run, embed, "embedding")
        keep, _ = screen_embeddings(ids, x)
        fitted = fit_and_store(
            store,
            x[keep],
            config,
            embed=embed.model | {"key": embed.key},
            data_hash=hash_strings([hashes[i] for i in keep]),
            trained_on={"run_id": run.run_id, "catalog": run.catalog},
        )
        tokenizer_id, cosine = (
            fitted.tokenizer_id,
            fitted.tokenizer.reconstruction_cosine_by_depth(x),
        )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024
    seconds = time.perf_counter() - started
    print(json.dumps({"way": way, "id": tokenizer_id, "gb": peak, "s": seconds, "cos": cosine}))


def arguments(doc: str) -> argparse.Namespace:
    """--n, --dim, and the hidden --child WAY FOLDER OUTCOME a benchmark re-runs itself with."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[100_000, 400_000])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    return parser.parse_args()


def in_child(script: str, way: str, folder: Path, outcome: str) -> dict:
    """Run one way of a benchmark in its own process (its own peak RSS); its JSON line."""
    command = [sys.executable, script, "--child", way, str(folder), outcome]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    args = arguments(__doc__)
    if args.child:
        return child(*args.child)
    print(f"machine: {machine()}")
    print(f"settings: {SETTINGS}")
    print("| N x D | whole matrix: peak RSS, s | spill: peak RSS, s | RSS ratio spill/whole |")
    print("|---|---:|---:|---:|")
    for n in args.n:
        folder, outcome = build(n, args.dim)
        results = {}
        for way in ("whole", "spill"):
            shutil.rmtree(folder / "store" / "tokenizers", ignore_errors=True)  # fit afresh
            results[way] = in_child(__file__, way, folder, outcome)
        whole, spill = results["whole"], results["spill"]
        assert whole["id"] == spill["id"], (whole["id"], spill["id"])  # the same tokenizer
        print(
            f"| {n:,} x {args.dim} | {whole['gb']:.2f} GB, {whole['s']:.0f} s "
            f"| {spill['gb']:.2f} GB, {spill['s']:.0f} s | {spill['gb'] / whole['gb']:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
