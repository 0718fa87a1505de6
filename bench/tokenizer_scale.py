"""Benchmark: SID tokenizers at production scale (4096/2048/1024) on a long-tailed catalog.

Generates a seeded synthetic catalog of N embeddings that looks like a real one where it hurts
tokenizers: clusters of very different sizes (Zipf) and spreads, inside 200 broad categories,
1% exact duplicates and 0.1% outliers with a norm 50-500x the rest. It is written once, in
chunks, to a float16 memory-mapped file (`bench/.cache/`), so generating, fitting and encoding
a 1M x 1536 catalog never holds it in float32 memory.

Each method runs in its own process (so its peak RSS is its own): it fits on a seeded sample
(`tokenizer.fit_sample_size`), then encodes every item in 65,536-row shards read from the file.
Printed per method: distinct code tuples per item (before any suffix), per-level codebook usage
and perplexity, reconstruction cosine, fit seconds, encode items/min, peak RSS, and the machine;
faiss's ResidualQuantizer (greedy) is the peer, fitted on the same sample in the same run.

    python bench/tokenizer_scale.py --n 1000000 --dim 256
    python bench/tokenizer_scale.py --n 1000000 --dim 1536 --methods rqkmeans-balanced
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.tokenizers import machine  # noqa: E402

SIZES = [4096, 2048, 1024]
SHARD = 65536  # rows of 256 values encoded at a time (fewer rows when wider)
CHUNK = 65536  # rows generated at a time
CACHE = Path(__file__).resolve().parent / ".cache"
METHODS = ["rqkmeans", "rqkmeans-balanced", "rqvae", "rqvae-balanced", "faiss-rq"]


# -- the catalog ---------------------------------------------------------------------------------
def synthetic(n: int, dim: int, seed: int = 0) -> np.memmap:
    """The seeded long-tailed catalog [n, dim] as a float16 memmap (generated once, cached)."""
    path = CACHE / f"synthetic-{n}x{dim}-seed{seed}.f16"
    if path.exists():
        return np.memmap(path, np.float16, "r", shape=(n, dim))
    CACHE.mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    categories = rng.standard_normal((200, dim)).astype(np.float32)
    clusters = max(n // 50, 10)
    weights = 1.0 / np.arange(1, clusters + 1) ** 1.1  # Zipf: a few huge clusters, a long tail
    weights /= weights.sum()
    centers = categories[rng.integers(0, 200, clusters)]
    centers += 0.6 * rng.standard_normal((clusters, dim)).astype(np.float32)
    spread = np.exp(rng.normal(-1.0, 0.5, clusters)).astype(np.float32)
    tmp = path.with_suffix(".tmp")
    out = np.memmap(tmp, np.float16, "w+", shape=(n, dim))
    for start in range(0, n, CHUNK):  # the catalog never depends on SHARD
        rows = min(CHUNK, n - start)
        r = np.random.default_rng([seed, start])
        member = r.choice(clusters, size=rows, p=weights)
        x = centers[member] + spread[member, None] * r.standard_normal((rows, dim), np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        dup = r.choice(rows, rows // 100, replace=False)  # 1% exact copies of other items
        x[dup] = x[r.integers(0, rows, len(dup))]
        far = r.choice(rows, max(1, rows // 1000), replace=False)  # 0.1% huge-norm outliers
        x[far] *= r.uniform(50, 500, len(far))[:, None].astype(np.float32)
        out[start : start + rows] = x
    out.flush()
    del out
    tmp.rename(path)
    return np.memmap(path, np.float16, "r", shape=(n, dim))


def shards(x: np.memmap):
    """(start, float32 rows) of x in shards of about SHARD x 256 values, read with plain file
    reads: pages of a memory map would count in the process's RSS, a read buffer does not."""
    rows = max(1, SHARD * 256 // x.shape[1])
    with open(x.filename, "rb") as f:
        for start in range(0, len(x), rows):
            count = min(rows, len(x) - start) * x.shape[1]
            block = np.fromfile(f, np.float16, count).reshape(-1, x.shape[1])
            yield start, block.astype(np.float32)


def sample(x: np.memmap, size: int, seed: int = 0) -> np.ndarray:
    """A seeded sample of x's rows (float32), read shard by shard."""
    rows = np.sort(np.random.default_rng(seed).choice(len(x), min(size, len(x)), replace=False))
    parts = []
    for start, block in shards(x):
        inside = rows[(rows >= start) & (rows < start + len(block))]
        parts.append(block[inside - start])
    return np.concatenate(parts)


def run_method(method: str, x: np.memmap, fit_sample: int, settings: dict) -> dict:
    fit_x = sample(x, fit_sample)
    started = time.perf_counter()
    encode, decode, nearby = fit(method, fit_x, settings)
    fit_s = time.perf_counter() - started
    del fit_x
    codes = np.zeros((len(x), len(SIZES)), np.int32)
    cos_sum, encode_s = 0.0, 0.0
    for start, xb in shards(x):
        t = time.perf_counter()
        codes[start : start + len(xb)] = encode(xb)
        encode_s += time.perf_counter() - t
        cos_sum += float(cosines(decode(codes[start : start + len(xb)]), xb).sum())
    from sidpipe.models.sids import sid_quality

    q = sid_quality(codes, SIZES)
    result = {
        "method": method,
        "fit_s": fit_s,
        "encode_per_min": len(x) / encode_s * 60,
        "distinct": q["distinct_tuple_rate"],
        "max_bucket": q["max_bucket"],
        "usage": [lv["utilization"] for lv in q["levels"]],
        "perplexity": [lv["perplexity"] for lv in q["levels"]],
        "cosine": cos_sum / len(x),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }
    if nearby is None:
        return result
    from sidpipe.config import TokenizerConfig

    cap = TokenizerConfig(**settings).reassign_max_loss or 0.02  # and without one, the default
    return result | {"reassign": [reassigned(x, codes, decode, nearby, m) for m in (cap, None)]}


def reassigned(x: np.memmap, codes: np.ndarray, decode, nearby, max_loss: float | None) -> dict:
    """Distinct tuples and cosine after `collisions: reassign` (the pipeline's assign stage: items
    whose tuple another item keeps move to their lowest-error free tuple if it costs at most
    `max_loss`), and its seconds; measured after the encoder's peak RSS is read, so that figure
    is the encoder's."""
    from datetime import date

    from sidpipe.models.sid_table import assign_sids, code_matrix
    from sidpipe.models.sids import sid_quality

    started = time.perf_counter()
    table, stats = assign_sids(
        [f"{i:08d}" for i in range(len(x))],
        codes,
        "t",
        date(2026, 1, 1),
        nearby=lambda rows, count: nearby(np.asarray(x[rows], np.float32), count),
        max_loss=max_loss,
    )
    seconds = time.perf_counter() - started
    moved = code_matrix(table["codes"], codes.shape[1])
    changed = np.flatnonzero((moved != codes).any(axis=1))
    # Only moved items' reconstructions change: the cosine is corrected on those rows.
    rows = np.asarray(x[changed], np.float32)
    before, after = cosines(decode(codes[changed]), rows), cosines(decode(moved[changed]), rows)
    q = sid_quality(moved, SIZES)
    return {
        "max_loss": max_loss,
        "distinct": q["distinct_tuple_rate"],
        "max_bucket": q["max_bucket"],
        "moved": stats["reassigned"],
        "declined": stats["reassign_declined"],
        "cosine_delta": float((after - before).sum()) / len(x),
        "seconds": seconds,
    }


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of each row of a with the same row of b."""
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(1) / np.maximum(den, 1e-12)


def fit(method: str, x: np.ndarray, settings: dict):
    """(encode, decode, nearby tuples or None) of `method` fitted on x (`settings`: more
    TokenizerConfig fields)."""
    if method == "faiss-rq":
        return (*fit_faiss_rq(x), None)
    from sidpipe.config import TokenizerConfig
    from sidpipe.models.tokenizer import fit_tokenizer

    name, _, balanced = method.partition("-")
    config = TokenizerConfig(
        method=name,
        codebook_sizes=SIZES,
        balanced_codes=bool(balanced),
        min_points_per_code=1,
        **settings,
    )
    tokenizer, _ = fit_tokenizer(x, SIZES, config)
    return tokenizer.encode, tokenizer.decode, tokenizer.nearby_tuples


def fit_faiss_rq(x: np.ndarray):
    """faiss.ResidualQuantizer, greedy (beam 1), 12/11/10 bits, on mean-centred inputs."""
    import faiss

    mean = x.mean(axis=0)
    bits = [int(np.log2(k)) for k in SIZES]
    nbits = faiss.UInt64Vector()  # per-level bits: the SWIG constructor takes no Python list
    for b in bits:
        nbits.push_back(b)
    rq = faiss.ResidualQuantizer(x.shape[1], nbits)
    rq.max_beam_size = 1
    rq.train(np.ascontiguousarray(x - mean))

    def encode(v: np.ndarray) -> np.ndarray:
        packed = rq.compute_codes(np.ascontiguousarray(v - mean, np.float32))
        bitstream = np.unpackbits(packed, axis=1, bitorder="little")  # faiss packs LSB first
        out, at = np.zeros((len(v), len(bits)), np.int32), 0
        for level, b in enumerate(bits):
            out[:, level] = bitstream[:, at : at + b].astype(np.int32) @ (1 << np.arange(b))
            at += b
        return out

    def decode(codes: np.ndarray) -> np.ndarray:
        out = np.broadcast_to(mean, (len(codes), len(mean))).copy()
        books = faiss.vector_to_array(rq.codebooks).reshape(-1, x.shape[1])
        offsets = np.cumsum([0, *SIZES[:-1]])
        for level, offset in enumerate(offsets):
            out += books[offset + codes[:, level]]
        return out

    return encode, decode


def encode_ceiling(dim: int, rows: int = 4096, seconds: float = 1.0) -> tuple[float, float]:
    """(items/min, GFLOP/s) if encoding were nothing but the float32 matrix products an exact
    nearest-code search cannot skip: a block of `rows` items times every level's codebook
    (rows x dim x k multiply-adds per level), at the best rate numpy's or torch's BLAS reaches
    for that shape on this machine. The bound every exact encoder here shares (faiss's search
    is such a product plus a pass for the minimum), so an encoder's share of it says how much
    speed is left to find without changing what it computes."""
    import torch

    rng = np.random.default_rng(0)
    block = rng.standard_normal((rows, dim), np.float32)
    books = [rng.standard_normal((dim, k), np.float32) for k in SIZES]
    best = float("inf")
    for matmul, cast in ((np.matmul, np.asarray), (torch.mm, torch.from_numpy)):
        a, bs = cast(block), [cast(b) for b in books]
        total = 0.0
        for b in bs:
            matmul(a, b)  # warm up
            reps, started = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - started) < seconds / len(bs):
                matmul(a, b)
                reps += 1
            total += elapsed / reps
        best = min(best, total)
    flops = 2 * rows * dim * sum(SIZES)
    return rows / best * 60, flops / best / 1e9


# -- the table -----------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--fit-sample", type=int, default=262_144)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--settings", default="{}", help="more tokenizer settings, JSON")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # run one method, print its JSON
    args = parser.parse_args()
    x = synthetic(args.n, args.dim)
    if args.one:
        print(json.dumps(run_method(args.one, x, args.fit_sample, json.loads(args.settings))))
        return
    print(
        f"{args.n:,} x {args.dim} synthetic items, codebooks {SIZES}, fit on a sample of "
        f"{min(args.fit_sample, args.n):,}; {machine()}",
        flush=True,
    )
    rows = []
    for method in args.methods.split(","):
        cmd = [
            sys.executable,
            __file__,
            "--n",
            str(args.n),
            "--dim",
            str(args.dim),
            "--fit-sample",
            str(args.fit_sample),
            "--settings",
            args.settings,
            "--one",
            method,
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            print(f"{method}: failed: {done.stderr.strip().splitlines()[-1:]}", flush=True)
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(line(rows[-1]), flush=True)
    per_min, gflops = encode_ceiling(args.dim)
    print(
        f"encode ceiling: {per_min / 1e6:.2f}M items/min (the float32 products of an exact "
        f"search alone, at this machine's best BLAS rate: {gflops:.0f} GFLOP/s)"
    )
    for r in rows:
        print(f"{r['method']}: encodes at {r['encode_per_min'] / per_min:.2f}x the ceiling")
    peer = next((r for r in rows if r["method"] == "faiss-rq"), None)
    if peer:
        for r in rows:
            print(
                f"{r['method']}: cosine {r['cosine'] / peer['cosine']:.4f}x faiss-rq's, "
                f"distinct {r['distinct'] / max(peer['distinct'], 1e-9):.2f}x"
            )
            for a in r.get("reassign", []):
                cosine = r["cosine"] + a["cosine_delta"]
                print(
                    f"{r['method']} + reassign (max_loss {a['max_loss']}): cosine "
                    f"{cosine / peer['cosine']:.4f}x faiss-rq's, distinct "
                    f"{a['distinct'] / peer['distinct']:.2f}x"
                )


def line(r: dict) -> str:
    usage = "/".join(f"{u:.2f}" for u in r["usage"])
    perplexity = "/".join(f"{p:.0f}" for p in r["perplexity"])
    return (
        f"| {r['method']} | {r['distinct']:.3f} | {r['max_bucket']} | {usage} | {perplexity} "
        + (
            f"| {r['cosine']:.4f} | {r['fit_s']:.0f} | {r['encode_per_min'] / 1e6:.2f}M "
            f"| {r['peak_rss_gb']:.2f} |"
        )
        + "".join(
            f"\n| {r['method']} + reassign, max_loss {a['max_loss']} | {a['distinct']:.3f} | "
            f"{a['max_bucket']} | | | {r['cosine'] + a['cosine_delta']:.4f} | +{a['seconds']:.0f} "
            f"| | | ({a['moved']:,} items moved, {a['declined']:,} kept a suffix)"
            for a in r.get("reassign", [])
        )
    )


if __name__ == "__main__":
    main()
