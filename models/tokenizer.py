"""One interface over the SID tokenizers (RQ-VAE, RQ-KMeans): fit, encode, save, load.

Also the checks every tokenizer's input needs: a tokenizer fitted on a NaN, a zero vector or a
vector a thousand times longer than the rest learns garbage without a word, so such rows are
set aside with a reason before any fit or encode.
"""

from __future__ import annotations

import io
from typing import Any, Protocol

import numpy as np

from sidpipe.models.rqkmeans import RQKMeans, fit_rqkmeans
from sidpipe.models.rqvae import RQVAE, RQVAEConfig, TrainConfig, fit_rqvae, load_rqvae, save_rqvae

METHODS = ("rqvae", "rqkmeans")
# Part of every tokenizer id: bump when fitting changes, so new weights never share an old id.
ALGORITHM_VERSION = 2
HUGE_NORM_RATIO = 1e3  # a norm this many times the median is a broken vector, not an item


class Tokenizer(Protocol):
    method: str

    @property
    def codebook_sizes(self) -> list[int]: ...

    def encode(self, x: np.ndarray) -> np.ndarray: ...

    def reconstruction_cosine_by_depth(self, x: np.ndarray) -> list[float]: ...

    def decode(self, codes: np.ndarray) -> np.ndarray: ...

    def last_level_ranking(self, x: np.ndarray) -> np.ndarray: ...


def reconstruction_cosine(tokenizer: Tokenizer, x: np.ndarray, codes: np.ndarray) -> float:
    """Mean cosine between items and their reconstruction from the codes they were given
    (which, after collision reassignment, are not always the nearest ones)."""
    x_hat = tokenizer.decode(codes)
    num = (x_hat * x).sum(axis=1)
    den = np.linalg.norm(x_hat, axis=1) * np.linalg.norm(x, axis=1)
    return float(np.mean(num / np.maximum(den, 1e-12)))


class EmbeddingInputError(ValueError):
    """Embeddings that cannot be tokenized at all (e.g. rows of different dimensions)."""


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
    finite = np.isfinite(x).all(axis=1)
    norms = np.where(finite, np.linalg.norm(np.where(finite[:, None], x, 0), axis=1), 0.0)
    median = float(np.median(norms[finite & (norms > 0)])) if (finite & (norms > 0)).any() else 0.0
    keep, rejects = [], []
    for i, item_id in enumerate(ids):
        if not finite[i]:
            rejects.append((item_id, "embedding has NaN or infinite values"))
        elif norms[i] == 0.0:
            rejects.append((item_id, "embedding is the zero vector"))
        elif median > 0 and norms[i] > HUGE_NORM_RATIO * median:
            rejects.append(
                (
                    item_id,
                    f"embedding norm {norms[i]:.3g} is over "
                    f"{HUGE_NORM_RATIO:g}x the median ({median:.3g})",
                )
            )
        else:
            keep.append(i)
    return keep, rejects


def fit_tokenizer(
    x: np.ndarray, method: str, codebook_sizes: list[int], settings: Any, progress=None
) -> tuple[Tokenizer, dict]:
    """Fit a tokenizer of `method` on x [N, D]; `settings` is a TokenizerConfig."""
    if method == "rqkmeans":
        return fit_rqkmeans(
            x, codebook_sizes, settings.kmeans_iterations, settings.seed, settings.refine_rounds
        )
    if method == "rqvae":
        model, report = fit_rqvae(
            x,
            RQVAEConfig(
                input_dim=x.shape[1],
                codebook_sizes=codebook_sizes,
                hidden_dims=list(settings.hidden_dims),
                latent_dim=settings.latent_dim,
                commitment_weight=settings.commitment_weight,
                codebook_update=settings.codebook_update,
                ema_decay=settings.ema_decay,
            ),
            TrainConfig(
                epochs=settings.epochs,
                batch_size=settings.batch_size,
                learning_rate=settings.learning_rate,
                kmeans_iterations=settings.kmeans_iterations,
                seed=settings.seed,
                validation_share=settings.validation_share,
                patience=settings.patience,
            ),
            progress=progress,
        )
        return model, {"method": "rqvae", **report.to_dict()}
    raise ValueError(f"unknown tokenizer method {method!r}; use one of {', '.join(METHODS)}")


def save_tokenizer(tokenizer: Tokenizer) -> tuple[bytes, dict]:
    """safetensors bytes and the JSON config (with its method) that rebuild the tokenizer."""
    from safetensors.numpy import save

    if isinstance(tokenizer, RQVAE):
        weights, config = save_rqvae(tokenizer)
        return weights, {"method": "rqvae", **config}
    tensors, config = tokenizer.state()
    return save({k: np.ascontiguousarray(v) for k, v in tensors.items()}), {
        "method": tokenizer.method,
        **config,
    }


def load_tokenizer_state(weights: bytes, config: dict) -> Tokenizer:
    config = dict(config)
    method = config.pop("method", "rqvae")
    if method == "rqvae":
        return load_rqvae(weights, config)
    if method == "rqkmeans":
        from safetensors.numpy import load

        return RQKMeans.from_state(load(weights), config)
    raise ValueError(f"unknown tokenizer method {method!r}")


def read_embeddings_parquet(data: bytes) -> tuple[list[str], list[Any]]:
    """(item_ids, vectors) from a Parquet file with `item_id` and `embedding` columns."""
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(data))
    missing = {"item_id", "embedding"} - set(table.column_names)
    if missing:
        raise EmbeddingInputError(
            f"embeddings file lacks column(s) {', '.join(sorted(missing))} "
            f"(has: {', '.join(table.column_names)})"
        )
    ids = [str(i) for i in table["item_id"].to_pylist()]
    return ids, table["embedding"].to_pylist()
