"""One interface over the SID tokenizers (RQ-VAE, RQ-KMeans): fit, encode, save, load.

Also the checks every tokenizer's input needs: a tokenizer fitted on a NaN, a zero vector or a
vector a thousand times longer than the rest learns garbage without a word, so such rows are
set aside with a reason before any fit or encode.
"""

from __future__ import annotations

import io
from typing import Any, Protocol

import numpy as np

from sidpipe.config import TokenizerConfig
from sidpipe.errors import CatalogTooSmallError, EmbeddingInputError
from sidpipe.models.rqkmeans import RQKMeans, fit_rqkmeans
from sidpipe.models.rqvae import RQVAE, fit_rqvae

# The one registry of tokenizer methods: how to fit one, and the class that loads it.
METHODS = {"rqvae": (fit_rqvae, RQVAE), "rqkmeans": (fit_rqkmeans, RQKMeans)}
# Part of every tokenizer id: bump when fitting changes, so new weights never share an old id.
ALGORITHM_VERSION = 4
HUGE_NORM_RATIO = 1e3  # a norm this many times the median is a broken vector, not an item


class Tokenizer(Protocol):
    method: str

    @property
    def codebook_sizes(self) -> list[int]: ...

    def encode(self, x: np.ndarray) -> np.ndarray: ...

    def reconstruction_cosine_by_depth(self, x: np.ndarray) -> list[float]: ...

    def decode(self, codes: np.ndarray) -> np.ndarray: ...

    def nearby_tuples(
        self, x: np.ndarray, count: int = 32, beam: int = 8
    ) -> tuple[np.ndarray, np.ndarray]: ...

    def state(self) -> tuple[dict[str, np.ndarray], dict]: ...


def reconstruction_cosine(
    tokenizer: Tokenizer, x: np.ndarray, codes: np.ndarray, batch_size: int = 65536
) -> float:
    """Mean cosine between items and their reconstruction from the codes they were given
    (which, after collision reassignment, are not always the nearest ones). x is read a batch
    at a time (it may be a `SpilledRows`)."""
    total = 0.0
    for start in range(0, len(codes), batch_size):
        xb = np.asarray(x[start : start + batch_size], np.float32)
        x_hat = tokenizer.decode(codes[start : start + batch_size])
        num = (x_hat * xb).sum(axis=1)
        den = np.linalg.norm(x_hat, axis=1) * np.linalg.norm(xb, axis=1)
        total += float((num / np.maximum(den, 1e-12)).sum(dtype=np.float64))
    return total / len(codes) if len(codes) else float("nan")


def stack_embeddings(vectors: list[Any], ids: list[str]) -> np.ndarray:
    """A float32 matrix from per-item vectors; rows of different lengths are a clear error."""
    lengths: dict[int, list[str]] = {}
    for item_id, v in zip(ids, vectors, strict=True):
        lengths.setdefault(len(v) if v is not None else 0, []).append(item_id)
    if len(lengths) > 1:
        detail = ", ".join(
            f"{dim} ({len(who):,} rows, e.g. {who[0]})" for dim, who in sorted(lengths.items())
        )
        raise EmbeddingInputError(f"embeddings have different dimensions: {detail}")
    return np.asarray(vectors, dtype=np.float32).reshape(len(ids), -1)


def screen_embeddings(ids: list[str], x: np.ndarray) -> tuple[list[int], list[tuple[str, str]]]:
    """Row indices fit to tokenize, and (item_id, reason) for the rest."""
    keep, rejects = screen_norms(*embedding_norms(x))
    return keep.tolist(), [(ids[row], why) for row, why in rejects]


def embedding_norms(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(finite [N] bool, L2 norms [N], 0 where not finite): what screening needs of each row,
    so that rows read a chunk at a time can be screened together."""
    finite = np.isfinite(x).all(axis=1)
    return finite, np.where(finite, np.linalg.norm(np.where(finite[:, None], x, 0), axis=1), 0.0)


def screen_norms(finite: np.ndarray, norms: np.ndarray) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """`screen_embeddings` from `embedding_norms` of every row (the median is over all rows):
    the rows kept, as an int64 array, and (row, reason) for the rest, in row order. Nothing is
    held per kept row but its index, so a catalog of any size screens in a few bytes an item."""
    usable = finite & (norms > 0)
    median = float(np.median(norms[usable])) if usable.any() else 0.0
    huge = usable & (norms > HUGE_NORM_RATIO * median) if median > 0 else np.zeros_like(usable)
    rejects = []
    for row in np.flatnonzero(~usable | huge).tolist():
        if not finite[row]:
            why = "embedding has NaN or infinite values"
        elif norms[row] == 0.0:
            why = "embedding is the zero vector"
        else:
            why = (
                f"embedding norm {norms[row]:.3g} is over "
                f"{HUGE_NORM_RATIO:g}x the median ({median:.3g})"
            )
        rejects.append((row, why))
    return np.flatnonzero(usable & ~huge), rejects


def size_codebooks(
    n_items: int, requested: list[int], min_points_per_code: int, policy: str
) -> tuple[list[int], str | None]:
    """Codebook sizes the data can support, and a message when they differ from `requested`.

    k-means needs about `min_points_per_code` items per code (faiss warns below 39); every level
    clusters residuals of all items, so each level is capped at n_items // min_points_per_code.
    """
    cap = n_items // min_points_per_code
    need = max(requested) * min_points_per_code
    if all(k <= cap for k in requested):
        return list(requested), None
    wanted = "/".join(map(str, requested))
    if policy == "refuse" or cap < 2:
        hint = (
            "use smaller tokenizer.codebook_sizes or tokenizer.small_catalog=shrink"
            if cap >= 2
            else f"at least {2 * min_points_per_code} items are needed for any tokenizer "
            "(tokenizer.min_points_per_code x 2)"
        )
        raise CatalogTooSmallError(
            f"{n_items:,} items cannot fill codebooks {wanted}: that needs >= {need:,} items "
            f"({min_points_per_code} per code)",
            hint,
        )
    sizes = [min(k, cap) for k in requested]
    return sizes, (
        f"{n_items:,} items cannot fill codebooks {wanted} (needs >= {need:,} items at "
        f"{min_points_per_code} per code): shrinking to {'/'.join(map(str, sizes))}. "
        "Set tokenizer.small_catalog=refuse to fail instead."
    )


def fit_sample(x: np.ndarray, size: int | None, seed: int) -> np.ndarray:
    """The rows a tokenizer is fitted on: a seeded sample of `size` rows, in their order (all of
    x when size is None or not smaller)."""
    if size is None or size >= len(x):
        return np.asarray(x[0 : len(x)], np.float32)  # x itself for an array; read for SpilledRows
    rows = np.sort(np.random.default_rng(seed).choice(len(x), size, replace=False))
    return np.asarray(x[rows], np.float32)


def fit_tokenizer(
    x: np.ndarray, codebook_sizes: list[int], settings: TokenizerConfig, progress=None
) -> tuple[Tokenizer, dict]:
    """Fit a tokenizer of `settings.method` on x [N, D]: (tokenizer, fit report). Rows far
    longer than the rest (`settings.max_norm_ratio`) are left out of the fit; the report
    counts them (`left_out_of_fit`)."""
    fit, _ = METHODS[settings.method]
    typical = typical_rows(x, settings.max_norm_ratio, max(codebook_sizes))
    fit_x = x if len(typical) == len(x) else x[typical]
    tokenizer, report = fit(fit_x, codebook_sizes, settings, progress)
    return tokenizer, {**report, "left_out_of_fit": len(x) - len(typical)}


def typical_rows(x: np.ndarray, ratio: float | None, at_least: int) -> np.ndarray:
    """Indices of x's rows whose norm is at most `ratio` times the median: the rows a tokenizer
    learns from. All rows when ratio is None, or when fewer than `at_least` would be left.

    Screening (`HUGE_NORM_RATIO`) quarantines broken vectors; rows between the two ratios are
    items, encoded like any other, but 0.1% of rows at 50-500x the norm set an RQ-VAE's
    standardization and reconstruction loss and ruin it (measured: bench/tokenizer_scale.py)."""
    everything = np.arange(len(x))
    if ratio is None or len(x) == 0:
        return everything
    norms = np.linalg.norm(x, axis=1)
    typical = np.flatnonzero(norms <= ratio * np.median(norms))
    return typical if len(typical) >= at_least else everything


def save_tokenizer(tokenizer: Tokenizer) -> tuple[bytes, dict]:
    """safetensors bytes and the JSON config (with its method) that rebuild the tokenizer."""
    from safetensors.numpy import save

    tensors, config = tokenizer.state()
    weights = save({k: np.ascontiguousarray(v) for k, v in tensors.items()})
    return weights, {"method": tokenizer.method, **config}


def load_tokenizer_state(weights: bytes, config: dict) -> Tokenizer:
    """The tokenizer saved as (weights, config) by `save_tokenizer`, any version of it."""
    from safetensors.numpy import load

    config = dict(config)
    method = config.pop("method", "rqvae")
    if method not in METHODS:
        raise ValueError(f"unknown tokenizer method {method!r}")
    return METHODS[method][1].from_state(load(weights), config)


def read_embeddings_parquet(data: bytes) -> tuple[list[str], list[Any]]:
    """(item_ids, vectors) from a Parquet file with `item_id` and `embedding` columns."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(data))
    except Exception as exc:  # noqa: BLE001 - any reader error: one clear message
        raise EmbeddingInputError(f"not a readable Parquet file: {exc}") from None
    missing = {"item_id", "embedding"} - set(table.column_names)
    if missing:
        raise EmbeddingInputError(
            f"embeddings file lacks column(s) {', '.join(sorted(missing))} "
            f"(has: {', '.join(table.column_names)})"
        )
    ids = [str(i) for i in table["item_id"].to_pylist()]
    return ids, table["embedding"].to_pylist()
