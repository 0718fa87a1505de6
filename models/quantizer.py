"""One level of a residual quantizer: a codebook, how it starts, how it learns, how it recovers.

`LevelQuantizer` picks, for each residual, the nearest of its K codewords. Its codebook starts
from faiss k-means on the residuals of the *full* data (`init_kmeans`; a first batch cannot seed
4,096 codes); it learns either by gradient (the codebook loss) or by exponential moving averages
of the residuals that chose each code (`ema_update`); and a code nobody chose restarts on a
random residual (`restart`), so capacity is never silently wasted. With `balanced`, it picks by
distance plus a per-code price that keeps codes evenly used (`models.balance`). A residual
quantizer (the RQ-VAE, or any model that needs codes) stacks levels and keeps its own loop thin.

`kmeans` is the one faiss k-means of the project (RQ-KMeans uses it too). Knows tensors and
arrays only: no items, files or Prefect.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from sidpipe.models.balance import balanced_kmeans, calibrate_prices, priced_nearest, priced_scores

BALANCE_ROUNDS = 2  # balanced k-means rounds after plain k-means, when a level is balanced


def kmeans(
    x: np.ndarray, k: int, iterations: int, seed: int, dim_steps: int = 1
) -> tuple[np.ndarray, str]:
    """faiss k-means centroids [k, d] and the device it ran on ('gpu' or 'cpu').

    With `dim_steps` > 1, progressive-dimension k-means, as faiss's ResidualQuantizer trains its
    levels: the rows are rotated onto their principal axes, clustered on the first few, and each
    of `dim_steps` steps re-clusters on more of them from the previous step's centroids
    (`iterations` each), ending on all. Starting where the variance is keeps k-means out of the
    poor local optima a 4,096-code level falls into at full dimension (measured: more codes in
    use and a higher reconstruction cosine, README "Benchmark: a million items"). Fewer rows
    than dimensions (a tiny catalog) get plain k-means: the principal axes need more.
    faiss-cpu silently ignores gpu=True, so the device is read from faiss, not assumed.
    """
    import faiss

    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    # faiss's PCA needs more rows than dimensions: a smaller set clusters on all of them at once.
    steps = dim_steps if len(x) > x.shape[1] else 1
    progressive = {"progressive_dim_steps": steps, "apply_pca": True} if steps > 1 else {}
    km = faiss.Kmeans(
        x.shape[1],
        k,
        niter=iterations,
        seed=seed,
        gpu=gpus > 0,
        verbose=False,
        min_points_per_centroid=1,
        max_points_per_centroid=256,
        **progressive,
    )
    km.train(np.ascontiguousarray(x, dtype=np.float32))
    return np.asarray(km.centroids, dtype=np.float32), "gpu" if gpus > 0 else "cpu"


class LevelQuantizer(nn.Module):
    """K codewords of size `dim`; `ema=True` updates them by moving averages, not gradients."""

    def __init__(
        self, size: int, dim: int, ema: bool = False, decay: float = 0.99, balanced: bool = False
    ) -> None:
        super().__init__()
        self.ema, self.decay, self.balanced = ema, decay, balanced
        self.codebook = nn.Parameter(torch.zeros(size, dim), requires_grad=not ema)
        if balanced:  # per-code prices of the balanced assignment (models.balance)
            self.register_buffer("prices", torch.zeros(size))
        if ema:
            # Per code: a moving count of the items that chose it and of their residuals' sum.
            self.register_buffer("ema_count", torch.ones(size))
            self.register_buffer("ema_sum", torch.zeros(size, dim))

    @property
    def size(self) -> int:
        return self.codebook.shape[0]

    def forward(self, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(code of each residual [N], its codeword [N, dim])."""
        if self.balanced:
            idx = priced_nearest(residual.detach(), self.codebook.detach(), self.prices)
        else:
            idx = torch.cdist(residual, self.codebook).argmin(dim=1)
        return idx, self.codebook[idx]

    @torch.no_grad()
    def calibrate(self, residual: torch.Tensor, seed: int, steps: int | None = None) -> None:
        """Fit the prices to these residuals and the current codewords: afresh, or `steps` steps
        on from the current prices."""
        book = self.codebook.detach()
        prices = (
            calibrate_prices(residual, book, seed)
            if steps is None
            else calibrate_prices(residual, book, seed, steps, start=self.prices)
        )
        self.prices.copy_(prices)

    def distances(self, residual: torch.Tensor) -> torch.Tensor:
        """What the assignment minimizes, per residual and code [N, K] (up to a row constant)."""
        if self.balanced:
            return priced_scores(residual, self.codebook, self.prices)
        return torch.cdist(residual, self.codebook)

    @torch.no_grad()
    def init_kmeans(
        self, residual: np.ndarray, iterations: int, seed: int
    ) -> tuple[np.ndarray, str]:
        """Codewords from k-means of these residuals; returns what this level leaves of them
        and the device k-means ran on."""
        centroids, device = kmeans(residual, self.size, iterations, seed)
        if self.balanced:
            book, prices, idx = balanced_kmeans(
                torch.from_numpy(residual), torch.from_numpy(centroids), BALANCE_ROUNDS, seed
            )
            centroids = book.numpy()
            self.prices.copy_(prices)
        else:
            idx = torch.cdist(torch.from_numpy(residual), torch.from_numpy(centroids)).argmin(1)
        self.codebook.data.copy_(torch.from_numpy(centroids))
        self.reset_ema(torch.arange(self.size))
        return residual - centroids[idx.numpy()], device

    @torch.no_grad()
    def reset_ema(self, codes: torch.Tensor) -> None:
        """Restart the moving averages of codes that were just (re)initialized, so stale
        statistics cannot pull them back (espnet #6284's bug)."""
        if self.ema:
            self.ema_count[codes] = 1.0
            self.ema_sum[codes] = self.codebook.data[codes]

    @torch.no_grad()
    def ema_update(self, idx: torch.Tensor, residual: torch.Tensor) -> None:
        """Move each used codeword towards the mean residual of the items that chose it."""
        chosen = torch.bincount(idx, minlength=self.size).to(self.ema_count.dtype)
        sums = torch.zeros_like(self.ema_sum).index_add_(0, idx, residual)
        self.ema_count.mul_(self.decay).add_(chosen, alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.ema_count.sum()
        smoothed = (self.ema_count + 1e-5) / (n + self.size * 1e-5) * n  # Laplace: no 0 division
        self.codebook.data.copy_(self.ema_sum / smoothed[:, None])

    @torch.no_grad()
    def restart(self, dead: torch.Tensor, pool: torch.Tensor, pick: torch.Tensor) -> None:
        """Move the `dead` codes onto residuals `pool[pick]` (dead-code restart)."""
        self.codebook.data[dead] = pool[pick]
        self.reset_ema(dead)


def nearby_tuples(
    head: np.ndarray, residual: np.ndarray, books: list[np.ndarray], count: int, beam: int
) -> tuple[np.ndarray, np.ndarray]:
    """Each row's `count` lowest-error code tuples, ascending: its fixed leading codes (`head`,
    [N, L - 2]) completed over the last two codebooks (`books`; one for a 1-level tokenizer),
    with `residual` what the leading codes leave. Returns (tuples [N, count, L] int32, squared
    errors [N, count]). The first of the two codebooks is searched over each row's `beam`
    nearest codes, the last over all of them: a two-level beam search, for reassignment."""
    tail, errors = _completions(np.ascontiguousarray(residual, np.float32), books, count, beam)
    lead = np.broadcast_to(np.asarray(head)[:, None, :], (*tail.shape[:2], head.shape[1]))
    return np.concatenate([lead.astype(np.int32), tail], axis=2), errors


def _completions(
    r: np.ndarray, books: list[np.ndarray], count: int, beam: int
) -> tuple[np.ndarray, np.ndarray]:
    last = books[-1]
    if len(books) == 1:
        errors = _squared_distances(r, last)
        top = _smallest(errors, count)
        return top[..., None].astype(np.int32), np.take_along_axis(errors, top, axis=1)
    first = books[0]
    near = _smallest(_squared_distances(r, first), beam)  # [N, B]
    left = r[:, None, :] - first[near]  # [N, B, D]: what each candidate first code leaves
    errors = _squared_distances(left.reshape(-1, r.shape[1]), last).reshape(len(r), -1)
    top = _smallest(errors, count)  # [N, count] over B x K_last
    pairs = np.stack(
        [np.take_along_axis(near, top // last.shape[0], axis=1), top % last.shape[0]], axis=-1
    )
    return pairs.astype(np.int32), np.take_along_axis(errors, top, axis=1)


def _smallest(values: np.ndarray, k: int) -> np.ndarray:
    """Column indices of each row's k smallest values, ascending (ties by index)."""
    k = min(k, values.shape[1])
    if k < values.shape[1]:
        part = np.argpartition(values, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(k), values.shape).copy()
    order = np.lexsort((part, np.take_along_axis(values, part, axis=1)))
    return np.take_along_axis(part, order, axis=1)


def _squared_distances(v: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """||v_i - c_k||^2 [N, K] (clipped at 0 against rounding)."""
    d = (v**2).sum(1)[:, None] - 2 * v @ codebook.T + (codebook**2).sum(1)[None, :]
    return np.maximum(d, 0)
