"""Benchmark: SID tokenizers on Amazon Beauty, in one run.

Compares, at the same codebook sizes, on the same embeddings:
- sidpipe RQ-VAE and sidpipe RQ-KMeans, each with balanced codes off and on, with the TIGER
  suffix only and with `reassign`
  (colliding items moved to the nearest free last-level code);
- faiss.ResidualQuantizer (greedy, max_beam_size=1);
- vector-quantize-pytorch ResidualVQ (k-means init, dead-code expiry), if installed
  (`pip install vector-quantize-pytorch`).
Reported per method: fit time, encoding speed, distinct code tuples per item (before any suffix),
largest bucket, per-level utilization and perplexity, and the mean cosine between each item's
embedding and its reconstruction from the codes it was given.

    python bench/tokenizers.py            # Beauty, 3x256 (embeds Beauty once: ~3 min)
    python bench/tokenizer_scale.py       # a long-tailed 1M-item catalog at 4096/2048/1024
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.beauty import beauty_embeddings  # noqa: E402
from sidpipe.config import TokenizerConfig  # noqa: E402
from sidpipe.models.sid_table import assign_sids, code_matrix  # noqa: E402
from sidpipe.models.sids import sid_quality  # noqa: E402
from sidpipe.models.tokenizer import fit_tokenizer, reconstruction_cosine  # noqa: E402


def machine() -> str:
    cpu = "unknown CPU"
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in open("/proc/cpuinfo")
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{os.cpu_count()} CPU cores ({cpu}), {gpu}, torch {torch.__version__}, "
        f"Python {platform.python_version()}"
    )


def encode_rate(encode, x: np.ndarray, target: int = 200_000) -> float:
    """Items encoded per minute (x tiled up to `target` rows)."""
    reps = max(1, target // len(x))
    big = np.tile(x, (reps, 1))
    started = time.perf_counter()
    encode(big)
    return len(big) / (time.perf_counter() - started) * 60


def row(name, fit_s, rate, codes, sizes, cosine) -> dict:
    q = sid_quality(codes, sizes)
    return {
        "method": name,
        "fit_s": fit_s,
        "encode_per_min": rate,
        "distinct": q["distinct_tuple_rate"],
        "max_bucket": q["max_bucket"],
        "utilization": [lv["utilization"] for lv in q["levels"]],
        "perplexity": [lv["perplexity"] for lv in q["levels"]],
        "cosine": cosine,
    }


def sidpipe_rows(x, sizes, method, settings) -> list[dict]:
    cfg = TokenizerConfig(method=method, codebook_sizes=sizes, min_points_per_code=1, **settings)
    name = f"{method}, {'balanced' if cfg.balanced else 'plain'}"
    started = time.perf_counter()
    tokenizer, _ = fit_tokenizer(x, sizes, cfg)
    fit_s = time.perf_counter() - started
    codes = tokenizer.encode(x)
    rate = encode_rate(tokenizer.encode, x)
    ids = [str(i) for i in range(len(x))]
    reassigned, _ = assign_sids(
        ids,
        codes,
        "t",
        date.today(),
        nearby=lambda rows, count: tokenizer.nearby_tuples(x[rows], count),
        max_loss=cfg.reassign_max_loss,
    )
    moved = code_matrix(reassigned["codes"], codes.shape[1])
    return [
        row(
            f"sidpipe {name}",
            fit_s,
            rate,
            codes,
            sizes,
            reconstruction_cosine(tokenizer, x, codes),
        ),
        row(
            f"sidpipe {name} + reassign",
            fit_s,
            rate,
            moved,
            sizes,
            reconstruction_cosine(tokenizer, x, moved),
        ),
    ]


def faiss_rq_row(x, sizes) -> dict:
    import faiss

    bits = [int(np.log2(k)) for k in sizes]
    if len(set(bits)) != 1 or 2 ** bits[0] != sizes[0]:
        raise ValueError("faiss.ResidualQuantizer here needs equal power-of-two codebooks")
    mean = x.mean(axis=0)
    xc = np.ascontiguousarray(x - mean, np.float32)
    rq = faiss.ResidualQuantizer(x.shape[1], len(sizes), bits[0])
    rq.max_beam_size = 1
    started = time.perf_counter()
    rq.train(xc)
    fit_s = time.perf_counter() - started

    def encode(v):
        packed = rq.compute_codes(np.ascontiguousarray(v - mean, np.float32))
        return unpack(packed, bits[0], len(sizes))

    codes = encode(x)
    x_hat = rq.decode(rq.compute_codes(xc)) + mean
    cosine = float(
        np.mean((x_hat * x).sum(1) / (np.linalg.norm(x_hat, axis=1) * np.linalg.norm(x, axis=1)))
    )
    return row(
        "faiss ResidualQuantizer (beam 1)", fit_s, encode_rate(encode, x), codes, sizes, cosine
    )


def unpack(packed: np.ndarray, nbits: int, levels: int) -> np.ndarray:
    if nbits == 8:
        return packed[:, :levels].astype(np.int32)
    bits = np.unpackbits(packed, axis=1, bitorder="little")[:, : nbits * levels]
    weights = 1 << np.arange(nbits)
    return (bits.reshape(len(packed), levels, nbits) * weights).sum(axis=2).astype(np.int32)


def residual_vq_row(x, sizes, epochs: int = 20) -> dict | None:
    try:
        from vector_quantize_pytorch import ResidualVQ
    except ImportError:
        return None
    import torch

    if len(set(sizes)) != 1:
        return None
    torch.manual_seed(0)
    rvq = ResidualVQ(
        dim=x.shape[1],
        num_quantizers=len(sizes),
        codebook_size=sizes[0],
        kmeans_init=True,
        kmeans_iters=10,
        threshold_ema_dead_code=2,
        decay=0.95,
    )
    xt = torch.from_numpy(np.ascontiguousarray(x, np.float32))
    started = time.perf_counter()
    rvq.train()
    for _ in range(epochs):  # EMA codebooks learn in forward passes over the data
        for batch in torch.split(xt[torch.randperm(len(xt))], 1024):
            rvq(batch)
    fit_s = time.perf_counter() - started
    rvq.eval()

    @torch.no_grad()
    def encode(v):
        out = []
        for batch in torch.split(torch.from_numpy(np.ascontiguousarray(v, np.float32)), 65536):
            _, idx, _ = rvq(batch)
            out.append(idx.numpy())
        return np.concatenate(out).astype(np.int32)

    codes = encode(x)
    with torch.no_grad():
        quantized, _, _ = rvq(xt)
    x_hat = quantized.numpy()
    cosine = float(
        np.mean((x_hat * x).sum(1) / (np.linalg.norm(x_hat, axis=1) * np.linalg.norm(x, axis=1)))
    )
    return row(
        "vector-quantize-pytorch ResidualVQ", fit_s, encode_rate(encode, x), codes, sizes, cosine
    )


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    print(
        f"{'method':<36}{'fit s':>8}{'encode/min':>12}{'distinct':>10}{'max':>5}"
        f"{'cosine':>8}  utilization / perplexity per level"
    )
    for r in rows:
        util = "/".join(f"{u:.2f}" for u in r["utilization"])
        ppl = "/".join(f"{p:.0f}" for p in r["perplexity"])
        print(
            f"{r['method']:<36}{r['fit_s']:>8.1f}{r['encode_per_min']:>12,.0f}"
            f"{r['distinct']:>10.3f}{r['max_bucket']:>5}{r['cosine']:>8.3f}  {util} / {ppl}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--codebooks", default="256,256,256")
    args = parser.parse_args()
    print(f"machine: {machine()}")

    sizes = [int(k) for k in args.codebooks.split(",")]
    _, x = beauty_embeddings()
    rows = []
    for method in ("rqvae", "rqkmeans"):  # balanced codes on and off, whichever is the default
        for balanced in (False, True):
            rows += sidpipe_rows(x, sizes, method, {"balanced_codes": balanced})
    rows.append(faiss_rq_row(x, sizes))
    rvq = residual_vq_row(x, sizes)
    rows += [rvq] if rvq else []
    print_table(
        f"Amazon Beauty: {len(x):,} items, all-MiniLM-L6-v2 of 'Title; Brand; "
        f"Categories', codebooks {'/'.join(map(str, sizes))}",
        rows,
    )
    if rvq is None:
        print("(vector-quantize-pytorch not installed: pip install vector-quantize-pytorch)")

    print("(catalogs at scale, 4096/2048/1024: python bench/tokenizer_scale.py)")


if __name__ == "__main__":
    main()
