"""RQ-KMeans: residual k-means with faiss, no training loop.

Level l's codebook is faiss k-means of what levels 1..l-1 left of every item; an item's code at
each level is the nearest centroid of its residual. Public re-runs (GRID) find it as good as an
RQ-VAE for SIDs at a fraction of the cost. Embeddings are centred on their mean first, so the
first level spends its codes on how items differ, not on what they share. With
`balanced_codes`, each level's assignment carries per-code prices (`models.balance`) that keep
deep levels from collapsing onto a few codes; they are saved with the codebooks.

Knows arrays only: no items, files or Prefect.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from sidpipe.config import TokenizerConfig
from sidpipe.models.balance import (
    augmented,
    balanced_kmeans,
    calibrate_prices,
    is_balanced,
    priced_nearest,
)
from sidpipe.models.quantizer import BALANCE_ROUNDS, kmeans, nearby_tuples

ROWS = 4096  # rows encoded at a time (RQKMeans.encode)


@dataclass
class RQKMeansConfig:
    input_dim: int
    codebook_sizes: list[int]
    balanced: bool = False  # tokenizers saved before balancing have no prices


class RQKMeans:
    method = "rqkmeans"

    def __init__(
        self,
        config: RQKMeansConfig,
        mean: np.ndarray,
        codebooks: list[np.ndarray],
        prices: list[np.ndarray | None] | None = None,
    ):
        self.config = config
        self.mean = np.asarray(mean, np.float32)
        self.codebooks = [np.ascontiguousarray(c, np.float32) for c in codebooks]
        self.prices = prices if config.balanced else None

    def _code(self, level: int, residual: np.ndarray, k: int = 1) -> np.ndarray:
        prices = None if self.prices is None else self.prices[level]
        return _nearest(self.codebooks[level], residual, k, prices)

    def _searches(self) -> list[_LevelSearch]:
        prices = self.prices or [None] * len(self.codebooks)
        return [_LevelSearch(book, p) for book, p in zip(self.codebooks, prices, strict=True)]

    @property
    def codebook_sizes(self) -> list[int]:
        return list(self.config.codebook_sizes)

    def encode(self, x: np.ndarray, batch_size: int = ROWS) -> np.ndarray:
        """Code tuples [N, L] (int32), `batch_size` rows at a time through one reused buffer:
        blocks this small keep faiss's work arrays in cache and the allocator off the kernel
        (65,536-row blocks spent a quarter of their time in page faults, measured)."""
        searches = self._searches()
        dim = self.mean.shape[0]
        codes = np.empty((len(x), len(searches)), np.int32)
        # What the levels leave of a block; the column past `dim` stays 0 for priced searches.
        buffer = np.zeros((min(batch_size, len(x)), max(s.width for s in searches)), np.float32)
        for start in range(0, len(x), batch_size):
            residual = buffer[: min(batch_size, len(x) - start)]
            residual[:, :dim] = x[start : start + len(residual)]
            residual[:, :dim] -= self.mean
            for level, search in enumerate(searches):
                idx = search(residual)
                codes[start : start + len(residual), level] = idx
                residual[:, :dim] -= self.codebooks[level][idx]
        return codes

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Embeddings reconstructed from code tuples [N, L]."""
        out = np.broadcast_to(self.mean, (len(codes), self.mean.shape[0])).copy()
        for level, codebook in enumerate(self.codebooks):
            out += codebook[np.asarray(codes)[:, level]]
        return out

    def nearby_tuples(
        self, x: np.ndarray, count: int = 32, beam: int = 8
    ) -> tuple[np.ndarray, np.ndarray]:
        """Each item's `count` lowest-error code tuples that keep its codes above the last two
        levels, ascending: (tuples [N, count, L], squared errors [N, count] as a share of the
        item's squared centred norm); no prices."""
        residual = np.ascontiguousarray(x, np.float32) - self.mean
        scale = np.maximum((residual**2).sum(axis=1, keepdims=True), 1e-12)
        head = []
        for level, codebook in enumerate(self.codebooks[:-2]):
            head.append(self._code(level, residual))
            residual = residual - codebook[head[-1]]
        head_codes = np.stack(head, axis=1) if head else np.zeros((len(x), 0), np.int64)
        tuples, errors = nearby_tuples(head_codes, residual, self.codebooks[-2:], count, beam)
        return tuples, errors / scale

    def reconstruction_cosine_by_depth(self, x: np.ndarray, batch_size: int = 65536) -> list[float]:
        sums = np.zeros(len(self.codebooks))
        for start in range(0, len(x), batch_size):
            xb = np.asarray(x[start : start + batch_size], np.float32)
            codes = self.encode(xb)
            partial = np.broadcast_to(self.mean, xb.shape).copy()
            for depth, codebook in enumerate(self.codebooks):
                partial += codebook[codes[:, depth]]
                sums[depth] += _cosine_rows(partial, xb).sum()
        return [float(s / max(len(x), 1)) for s in sums]

    def state(self) -> tuple[dict[str, np.ndarray], dict]:
        tensors = {"mean": self.mean, **{f"codebook.{i}": c for i, c in enumerate(self.codebooks)}}
        tensors |= {f"prices.{i}": p for i, p in enumerate(self.prices or []) if p is not None}
        return tensors, asdict(self.config)

    @classmethod
    def from_state(cls, tensors: dict[str, np.ndarray], config: dict) -> RQKMeans:
        cfg = RQKMeansConfig(**config)
        levels = range(len(cfg.codebook_sizes))
        books = [tensors[f"codebook.{i}"] for i in levels]
        prices = [tensors.get(f"prices.{i}") for i in levels] if cfg.balanced else None
        return cls(cfg, tensors["mean"], books, prices)

    def calibrate(self, x: np.ndarray, seed: int) -> None:
        """Fit every level's prices afresh, level by level on what the levels before leave."""
        residual = torch.from_numpy(np.ascontiguousarray(x, np.float32) - self.mean)
        self.prices = []
        for level, codebook in enumerate(self.codebooks):
            book = torch.from_numpy(codebook)
            if not is_balanced(level):
                self.prices.append(None)
                residual = residual - book[torch.from_numpy(_nearest(codebook, residual.numpy()))]
                continue
            prices = calibrate_prices(residual, book, seed + level)
            self.prices.append(prices.numpy())
            residual = residual - book[priced_nearest(residual, book, prices)]


def _cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    num = (a * b).sum(axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return num / np.maximum(den, 1e-12)


def _nearest(
    codebook: np.ndarray, v: np.ndarray, k: int = 1, prices: np.ndarray | None = None
) -> np.ndarray:
    """Index of each row's nearest codeword ([N]), or its k nearest in order ([N, k]); with
    prices, nearest by ||v - c||^2 + price (`models.balance.augmented`)."""
    v = np.ascontiguousarray(v, np.float32)
    if prices is not None:
        v = np.hstack([v, np.zeros((len(v), 1), np.float32)])
    return _LevelSearch(codebook, prices)(v, k)


class _LevelSearch:
    """Exact nearest-codeword search over one codebook (faiss IndexFlatL2): on the codebook
    itself, or, with prices, on its augmented form (`models.balance.augmented`), which a query
    padded with one 0 searches."""

    def __init__(self, codebook: np.ndarray, prices: np.ndarray | None = None) -> None:
        import faiss

        book = codebook if prices is None else augmented(codebook, prices)
        self.width = book.shape[1]
        self.index = faiss.IndexFlatL2(self.width)
        self.index.add(np.ascontiguousarray(book, np.float32))

    def __call__(self, v: np.ndarray, k: int = 1) -> np.ndarray:
        """Codes of the rows of v ([N] or [N, k]); columns of v past `width` are ignored, those
        up to it past the codebook's are 0."""
        _, idx = self.index.search(np.ascontiguousarray(v[:, : self.width]), k)
        return idx[:, 0] if k == 1 else idx


def fit_rqkmeans(
    x: np.ndarray, codebook_sizes: list[int], settings: TokenizerConfig, progress=None
) -> tuple[RQKMeans, dict]:
    """Residual k-means (progressive-dimension, `settings.kmeans_dim_steps` steps of
    `settings.kmeans_iterations`), then `settings.refine_rounds` of
    coordinate descent: each level's codebook is re-estimated as the mean of what the *other*
    levels leave of its items, and every item is re-encoded greedily. Greedy re-encoding can undo
    a round's gain, so the codebooks of the round with the lowest reconstruction error are kept.
    `progress(done, total, losses)` is called after each level and each round."""
    iterations, seed = settings.kmeans_iterations, settings.seed
    refine_rounds, dim_steps = settings.refine_rounds, settings.kmeans_dim_steps
    started = time.perf_counter()
    x = np.ascontiguousarray(x, np.float32)
    mean = x.mean(axis=0)
    residual = x - mean
    books, prices, device = [], [], "cpu"
    balanced = settings.balanced
    steps = len(codebook_sizes) + refine_rounds

    def report(done: int, mse: float) -> None:
        if progress is not None:
            progress(done, steps, {"total": mse})

    for level, k in enumerate(codebook_sizes):
        centroids, device = kmeans(residual, k, iterations, seed + level, dim_steps)
        if balanced and is_balanced(level):
            book, level_prices, codes = balanced_kmeans(
                torch.from_numpy(residual), torch.from_numpy(centroids), BALANCE_ROUNDS, seed
            )
            centroids, idx = book.numpy(), codes.numpy()
            prices.append(level_prices.numpy())
        else:
            idx = _nearest(centroids, residual)
            prices.append(None)
        books.append(centroids)
        residual = residual - centroids[idx]
        report(level + 1, float(np.mean(np.sum(residual**2, axis=1))))
    config = RQKMeansConfig(x.shape[1], list(codebook_sizes), balanced)
    model = RQKMeans(config, mean, books, prices)

    errors = [float(np.mean(np.sum(residual**2, axis=1)))]
    best = ([b.copy() for b in model.codebooks], model.prices)
    for round_ in range(refine_rounds):
        codes = model.encode(x)
        chosen = [book[codes[:, level]] for level, book in enumerate(model.codebooks)]
        total = sum(chosen)
        for level, k in enumerate(codebook_sizes):
            target = x - mean - (total - chosen[level])
            sums = np.zeros((k, x.shape[1]), np.float64)
            np.add.at(sums, codes[:, level], target)
            counts = np.bincount(codes[:, level], minlength=k)
            used = counts > 0  # an unused code keeps its centroid
            model.codebooks[level][used] = (sums[used] / counts[used, None]).astype(np.float32)
            new = model.codebooks[level][codes[:, level]]
            total = total - chosen[level] + new
            chosen[level] = new
        if balanced:  # prices of the old codewords over-correct the new ones
            model.calibrate(x, seed + 100 * (round_ + 1))
        codes = model.encode(x)
        x_hat = model.decode(codes)
        errors.append(float(np.mean(np.sum((x - x_hat) ** 2, axis=1))))
        if errors[-1] < min(errors[:-1]):
            best = ([b.copy() for b in model.codebooks], model.prices)
        report(len(codebook_sizes) + len(errors) - 1, errors[-1])
    model.codebooks, model.prices = best
    return model, {
        "method": "rqkmeans",
        "balanced": balanced,
        "codebook_sizes": list(codebook_sizes),
        "kmeans_iterations": iterations,
        "kmeans_dim_steps": dim_steps,
        "kmeans_device": device,
        "refine_rounds": refine_rounds,
        "mse_by_round": errors,
        "kept_round": int(np.argmin(errors)),
        "seconds": time.perf_counter() - started,
    }
