"""RQ-VAE: the residual-quantized autoencoder that turns an item embedding into a code tuple.

An MLP encoder maps a standardized embedding to a latent; L residual levels quantize it, level l
picking the nearest of its own K_l codewords for what the earlier levels left; an MLP decoder
reconstructs the input from the sum of the chosen codewords. Each level's codebook starts from
faiss k-means on the *full* data's residuals (not a first batch, which cannot seed 4,096 codes),
codes unused for an epoch restart on a random residual, and training uses the straight-through
estimator with codebook and commitment losses.

Deterministic on CPU for a given seed. Knows nothing about items, files or Prefect.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)


@contextlib.contextmanager
def reproducible_threads():
    """One torch thread inside: with two, CPU results differed between processes in the last
    bits (measured), which flips some argmin codes; SIDs must be the same on every run."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _single_threaded(method):
    @functools.wraps(method)
    def wrapped(*args, **kwargs):
        with reproducible_threads():
            return method(*args, **kwargs)

    return wrapped


class CatalogTooSmallError(ValueError):
    """The data cannot fill the configured codebooks and the policy is to refuse."""


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
        raise CatalogTooSmallError(
            f"{n_items:,} items cannot fill codebooks {wanted}: that needs >= {need:,} items "
            f"({min_points_per_code} per code). "
            + (
                "Use smaller tokenizer.codebook_sizes or tokenizer.small_catalog=shrink."
                if cap >= 2
                else f"At least {2 * min_points_per_code} items are needed for any tokenizer."
            )
        )
    sizes = [min(k, cap) for k in requested]
    return sizes, (
        f"{n_items:,} items cannot fill codebooks {wanted} (needs >= {need:,} items at "
        f"{min_points_per_code} per code): shrinking to {'/'.join(map(str, sizes))}. "
        "Set tokenizer.small_catalog=refuse to fail instead."
    )


@dataclass
class RQVAEConfig:
    input_dim: int
    codebook_sizes: list[int]
    hidden_dims: list[int] = field(default_factory=lambda: [512, 256])
    latent_dim: int = 64
    commitment_weight: float = 0.25
    codebook_update: str = "gradient"  # "gradient" (codebook loss) or "ema" (moving averages)
    ema_decay: float = 0.99


@dataclass
class TrainConfig:
    epochs: int = 60
    batch_size: int = 1024
    learning_rate: float = 3e-3
    kmeans_iterations: int = 25
    seed: int = 42
    validation_share: float = 0.05  # held out for early stopping (none below 200 items)
    patience: int = 10  # epochs without a better held-out loss before stopping


def _mlp(dims: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


class RQVAE(nn.Module):
    method = "rqvae"

    def __init__(self, config: RQVAEConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("mean", torch.zeros(config.input_dim))
        self.register_buffer("std", torch.ones(config.input_dim))
        self.encoder = _mlp([config.input_dim, *config.hidden_dims, config.latent_dim])
        self.decoder = _mlp([config.latent_dim, *reversed(config.hidden_dims), config.input_dim])
        ema = config.codebook_update == "ema"
        self.codebooks = nn.ParameterList(
            [
                nn.Parameter(torch.zeros(k, config.latent_dim), requires_grad=not ema)
                for k in config.codebook_sizes
            ]
        )
        if ema:
            # Per code: a moving count of the items that chose it and of their residuals' sum.
            for level, k in enumerate(config.codebook_sizes):
                self.register_buffer(f"ema_count_{level}", torch.ones(k))
                self.register_buffer(f"ema_sum_{level}", torch.zeros(k, config.latent_dim))
        self._last_residuals: list[torch.Tensor] = []

    @property
    def levels(self) -> int:
        return len(self.codebooks)

    @property
    def codebook_sizes(self) -> list[int]:
        return list(self.config.codebook_sizes)

    def standardize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def quantize(
        self, z: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """Codes [N, L], the chosen codeword per level, and the residual each level saw."""
        residual = z
        codes, chosen, residuals = [], [], []
        for codebook in self.codebooks:
            idx = torch.cdist(residual, codebook).argmin(dim=1)
            q = codebook[idx]
            codes.append(idx)
            chosen.append(q)
            residuals.append(residual)
            residual = residual - q.detach()
        return torch.stack(codes, dim=1), chosen, residuals

    def forward(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        xs = self.standardize(x)
        z = self.encoder(xs)
        codes, chosen, residuals = self.quantize(z)
        codebook_loss = sum(
            ((r.detach() - q) ** 2).mean() for r, q in zip(residuals, chosen, strict=True)
        )
        commitment = sum(
            ((r - q.detach()) ** 2).mean() for r, q in zip(residuals, chosen, strict=True)
        )
        z_q = sum(chosen)
        z_st = z + (z_q - z).detach()  # straight-through: decoder sees z_q, encoder gets grads
        recon = ((self.decoder(z_st) - xs) ** 2).mean()
        losses = {
            "reconstruction": recon,
            "codebook": codebook_loss,
            "commitment": commitment,
        }
        codebook_term = 0.0 if self.config.codebook_update == "ema" else codebook_loss
        losses["total"] = recon + codebook_term + self.config.commitment_weight * commitment
        self._last_residuals = [r.detach() for r in residuals]
        return z_st, losses, codes

    @torch.no_grad()
    def reset_ema(self, level: int, codes: torch.Tensor) -> None:
        """Restart the moving averages of codes that were just (re)initialized, so stale
        statistics cannot pull them back (espnet #6284's bug)."""
        if self.config.codebook_update != "ema":
            return
        getattr(self, f"ema_count_{level}")[codes] = 1.0
        getattr(self, f"ema_sum_{level}")[codes] = self.codebooks[level].data[codes]

    @torch.no_grad()
    def ema_update(self, codes: torch.Tensor) -> None:
        """Move each used codeword towards the mean residual of the items that chose it."""
        decay = self.config.ema_decay
        for level, book in enumerate(self.codebooks):
            residual = self._last_residuals[level]
            count = getattr(self, f"ema_count_{level}")
            total = getattr(self, f"ema_sum_{level}")
            chosen = torch.bincount(codes[:, level], minlength=len(book)).to(count.dtype)
            sums = torch.zeros_like(total).index_add_(0, codes[:, level], residual)
            count.mul_(decay).add_(chosen, alpha=1 - decay)
            total.mul_(decay).add_(sums, alpha=1 - decay)
            n = count.sum()
            smoothed = (count + 1e-5) / (n + len(book) * 1e-5) * n  # Laplace: no division by 0
            book.data.copy_(total / smoothed[:, None])

    @torch.no_grad()
    def encode(self, x: np.ndarray, batch_size: int = 8192) -> np.ndarray:
        """Code tuples [N, L] (int32) for embeddings [N, D]."""
        with reproducible_threads():
            return self._encode(x, batch_size)

    def _encode(self, x: np.ndarray, batch_size: int) -> np.ndarray:
        self.eval()
        out = []
        for start in range(0, len(x), batch_size):
            xb = torch.from_numpy(np.ascontiguousarray(x[start : start + batch_size], np.float32))
            codes, _, _ = self.quantize(self.encoder(self.standardize(xb)))
            out.append(codes.to(torch.int32).numpy())
        return np.concatenate(out) if out else np.zeros((0, self.levels), np.int32)

    @torch.no_grad()
    @_single_threaded
    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Embeddings reconstructed from code tuples [N, L] (in the input's scale)."""
        self.eval()
        idx = torch.from_numpy(np.asarray(codes, dtype=np.int64))
        z_q = sum(book[idx[:, level]] for level, book in enumerate(self.codebooks))
        return (self.decoder(z_q) * self.std + self.mean).numpy()

    @torch.no_grad()
    @_single_threaded
    def last_level_ranking(self, x: np.ndarray) -> np.ndarray:
        """Last-level codes ordered from nearest to farthest, per item [N, K_last]."""
        self.eval()
        xb = torch.from_numpy(np.ascontiguousarray(x, np.float32))
        _, _, residuals = self.quantize(self.encoder(self.standardize(xb)))
        distances = torch.cdist(residuals[-1], self.codebooks[-1])
        return distances.argsort(dim=1).to(torch.int32).numpy()

    @torch.no_grad()
    @_single_threaded
    def reconstruction_cosine_by_depth(self, x: np.ndarray, batch_size: int = 8192) -> list[float]:
        """Mean cosine(x, decode(sum of the first d codewords)) for d = 1..L (TriAlignGR Fig. 4)."""
        self.eval()
        sums = np.zeros(self.levels)
        for start in range(0, len(x), batch_size):
            xb = torch.from_numpy(np.ascontiguousarray(x[start : start + batch_size], np.float32))
            _, chosen, _ = self.quantize(self.encoder(self.standardize(xb)))
            partial = torch.zeros_like(chosen[0])
            for depth, q in enumerate(chosen):
                partial = partial + q
                x_hat = self.decoder(partial) * self.std + self.mean
                sums[depth] += torch.nn.functional.cosine_similarity(x_hat, xb, dim=1).sum().item()
        return [float(s / max(len(x), 1)) for s in sums]


def kmeans(x: np.ndarray, k: int, iterations: int, seed: int) -> tuple[np.ndarray, str]:
    """faiss k-means centroids [k, d] and the device it ran on ('gpu' or 'cpu').

    faiss-cpu silently ignores gpu=True, so the device is read from faiss, not assumed.
    """
    import faiss

    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    km = faiss.Kmeans(
        x.shape[1],
        k,
        niter=iterations,
        seed=seed,
        gpu=gpus > 0,
        verbose=False,
        min_points_per_centroid=1,
        max_points_per_centroid=256,
    )
    km.train(np.ascontiguousarray(x, dtype=np.float32))
    return np.asarray(km.centroids, dtype=np.float32), "gpu" if gpus > 0 else "cpu"


@dataclass
class FitReport:
    codebook_sizes: list[int]
    epochs: int
    seconds: float
    final_losses: dict[str, float]
    kmeans_device: str
    dead_code_restarts: list[int]
    history: list[dict[str, float]]
    best_epoch: int = -1  # the epoch whose weights were kept (-1: no held-out split)

    def to_dict(self) -> dict:
        return asdict(self)


def fit_rqvae(
    x: np.ndarray,
    model_config: RQVAEConfig,
    train: TrainConfig,
    progress: Callable[[int, int, dict[str, float]], None] | None = None,
) -> tuple[RQVAE, FitReport]:
    """Train an RQ-VAE on embeddings x [N, D]. Deterministic on CPU for a given seed."""
    with reproducible_threads():
        return _fit_rqvae(x, model_config, train, progress)


def _fit_rqvae(x, model_config, train, progress):
    import time

    started = time.perf_counter()
    torch.manual_seed(train.seed)
    rng = np.random.default_rng(train.seed)
    x = np.ascontiguousarray(x, dtype=np.float32)
    model = RQVAE(model_config)
    xt = torch.from_numpy(x)
    model.mean.copy_(xt.mean(dim=0))
    model.std.copy_(xt.std(dim=0).clamp_min(1e-6))

    # Codebook init: k-means per level on the residuals of the full data.
    with torch.no_grad():
        residual = model.encoder(model.standardize(xt)).numpy()
    device = "cpu"
    for level, k in enumerate(model_config.codebook_sizes):
        centroids, device = kmeans(residual, k, train.kmeans_iterations, train.seed + level)
        model.codebooks[level].data.copy_(torch.from_numpy(centroids))
        model.reset_ema(level, torch.arange(k))
        idx = torch.cdist(torch.from_numpy(residual), torch.from_numpy(centroids)).argmin(1)
        residual = residual - centroids[idx.numpy()]

    optimizer = torch.optim.Adam(
        [p for p in model.parameters() if p.requires_grad], lr=train.learning_rate
    )
    # A held-out split decides when to stop and which epoch's weights to keep.
    shuffled = rng.permutation(len(x))
    n_val = int(len(x) * train.validation_share) if len(x) >= 200 else 0
    val_x, xt = xt[torch.from_numpy(shuffled[:n_val])], xt[torch.from_numpy(shuffled[n_val:])]
    best_loss, best_epoch, best_state = float("inf"), -1, None
    n = len(xt)
    # At least 8 steps an epoch: a small catalog in one giant batch barely trains.
    batch = max(1, min(train.batch_size, max(64, n // 8)))
    history: list[dict[str, float]] = []
    restarts: list[int] = [0] * model.levels
    losses: dict[str, float] = {}
    for epoch in range(train.epochs):
        model.train()
        order = torch.from_numpy(rng.permutation(n))
        usage = [torch.zeros(k, dtype=torch.long) for k in model_config.codebook_sizes]
        totals: dict[str, float] = {}
        for start in range(0, n, batch):
            xb = xt[order[start : start + batch]]
            _, step_losses, codes = model(xb)
            optimizer.zero_grad(set_to_none=True)
            step_losses["total"].backward()
            optimizer.step()
            if model_config.codebook_update == "ema":
                model.ema_update(codes)
            for level in range(model.levels):
                usage[level] += torch.bincount(codes[:, level], minlength=len(usage[level]))
            for name, value in step_losses.items():
                totals[name] = totals.get(name, 0.0) + value.item() * len(xb)
        losses = {name: value / n for name, value in totals.items()}
        # Dead-code restart: a code no item chose this epoch moves onto a random residual, so
        # capacity is never silently wasted (the collapse peers report).
        if epoch < train.epochs - 1:
            dead_levels = [torch.nonzero(c == 0).flatten() for c in usage]
            if any(len(d) for d in dead_levels):
                sample = torch.from_numpy(rng.choice(n, size=min(n, 4096), replace=False))
                pools = _level_residuals(model, xt[sample])
            with torch.no_grad():
                for level, dead in enumerate(dead_levels):
                    if len(dead):
                        pool = pools[level]
                        pick = torch.from_numpy(rng.integers(0, len(pool), len(dead)))
                        model.codebooks[level].data[dead] = pool[pick]
                        model.reset_ema(level, dead)
                        restarts[level] += len(dead)
        if n_val:
            with torch.no_grad():
                model.eval()
                # Reconstruction, not the total: the codebook terms grow as the encoder moves.
                losses["validation"] = model(val_x)[1]["reconstruction"].item()
            if losses["validation"] < best_loss - 1e-6:
                best_loss, best_epoch = losses["validation"], epoch
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        history.append({"epoch": epoch, **losses})
        if progress is not None:
            progress(epoch + 1, train.epochs, losses)
        if n_val and epoch - best_epoch >= train.patience:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    report = FitReport(
        codebook_sizes=list(model_config.codebook_sizes),
        epochs=len(history),
        best_epoch=best_epoch,
        seconds=time.perf_counter() - started,
        final_losses=losses,
        kmeans_device=device,
        dead_code_restarts=restarts,
        history=history[:: max(1, math.ceil(len(history) / 50))],
    )
    return model, report


@torch.no_grad()
def _level_residuals(model: RQVAE, xb: torch.Tensor) -> list[torch.Tensor]:
    _, _, residuals = model.quantize(model.encoder(model.standardize(xb)))
    return [r.detach().clone() for r in residuals]


def save_rqvae(model: RQVAE) -> tuple[bytes, dict]:
    """safetensors bytes and the JSON config needed to rebuild the model."""
    from safetensors.torch import save

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    return save(state), asdict(model.config)


def load_rqvae(weights: bytes, config: dict) -> RQVAE:
    from safetensors.torch import load

    model = RQVAE(RQVAEConfig(**config))
    model.load_state_dict(load(weights))
    model.eval()
    return model
