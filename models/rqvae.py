"""RQ-VAE: the residual-quantized autoencoder that turns an item embedding into a code tuple.

An MLP encoder maps a standardized embedding to a latent; L residual levels quantize it, level l
picking the nearest of its own K_l codewords for what the earlier levels left
(`models.quantizer.LevelQuantizer`: k-means init on the full data, EMA or gradient updates,
dead-code restart); an MLP decoder reconstructs the input from the sum of the chosen codewords.
Training uses the straight-through estimator with codebook and commitment losses and keeps the
epoch with the best held-out reconstruction.

Hyperparameters come from the pipeline's `TokenizerConfig` as they are; `RQVAEConfig` is the
architecture saved beside the weights, so a tokenizer loads without the settings that trained
it. Deterministic on CPU for a given seed. Knows nothing about items, files or Prefect.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from sidpipe.config import TokenizerConfig
from sidpipe.models.balance import PER_CODE, is_balanced, sample_rows
from sidpipe.models.quantizer import LevelQuantizer, nearby_tuples

EPOCH_CALIBRATION_STEPS = (
    10  # balanced: price steps after each epoch (the codewords moved a little)
)


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


@dataclass
class RQVAEConfig:
    """The architecture (what the weights need to load), saved in the tokenizer's config.json."""

    input_dim: int
    codebook_sizes: list[int]
    hidden_dims: list[int] = field(default_factory=lambda: [512, 256])
    latent_dim: int = 64
    commitment_weight: float = 0.25
    codebook_update: str = "gradient"  # "gradient" (codebook loss) or "ema" (moving averages)
    ema_decay: float = 0.99
    balanced: bool = False  # tokenizers saved before balancing have no prices

    @classmethod
    def from_settings(
        cls, settings: TokenizerConfig, input_dim: int, codebook_sizes: list[int]
    ) -> RQVAEConfig:
        return cls(
            input_dim=input_dim,
            codebook_sizes=list(codebook_sizes),
            hidden_dims=list(settings.hidden_dims),
            latent_dim=settings.latent_dim,
            commitment_weight=settings.commitment_weight,
            codebook_update=settings.codebook_update,
            ema_decay=settings.ema_decay,
            balanced=settings.balanced,
        )


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
        self.quantizers = nn.ModuleList(
            LevelQuantizer(k, config.latent_dim, ema, config.ema_decay, balanced)
            for k, balanced in zip(config.codebook_sizes, self._balanced_levels(), strict=True)
        )

    def _balanced_levels(self) -> list[bool]:
        return [
            self.config.balanced and is_balanced(i) for i in range(len(self.config.codebook_sizes))
        ]

    @property
    def levels(self) -> int:
        return len(self.quantizers)

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
        for level in self.quantizers:
            idx, q = level(residual)
            codes.append(idx)
            chosen.append(q)
            residuals.append(residual)
            residual = residual - q.detach()
        return torch.stack(codes, dim=1), chosen, residuals

    def forward(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor, list]:
        """(losses, codes [N, L], the residual each level saw) of a batch."""
        xs = self.standardize(x)
        z = self.encoder(xs)
        codes, chosen, residuals = self.quantize(z)
        codebook_loss = sum(
            ((r.detach() - q) ** 2).mean() for r, q in zip(residuals, chosen, strict=True)
        )
        commitment = sum(
            ((r - q.detach()) ** 2).mean() for r, q in zip(residuals, chosen, strict=True)
        )
        z_st = z + (sum(chosen) - z).detach()  # straight-through: decoder sees z_q
        recon = ((self.decoder(z_st) - xs) ** 2).mean()
        losses = {"reconstruction": recon, "codebook": codebook_loss, "commitment": commitment}
        codebook_term = 0.0 if self.config.codebook_update == "ema" else codebook_loss
        losses["total"] = recon + codebook_term + self.config.commitment_weight * commitment
        return losses, codes, [r.detach() for r in residuals]

    @torch.no_grad()
    @_single_threaded
    def encode(self, x: np.ndarray, batch_size: int = 8192) -> np.ndarray:
        """Code tuples [N, L] (int32) for embeddings [N, D]."""
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
        z_q = sum(q.codebook[idx[:, level]] for level, q in enumerate(self.quantizers))
        return (self.decoder(z_q) * self.std + self.mean).numpy()

    @torch.no_grad()
    @_single_threaded
    def nearby_tuples(
        self, x: np.ndarray, count: int = 32, beam: int = 8
    ) -> tuple[np.ndarray, np.ndarray]:
        """Each item's `count` lowest-error code tuples that keep its codes above the last two
        levels, ascending: (tuples [N, count, L], squared latent errors [N, count] as a share of
        the item's squared latent norm); no prices."""
        self.eval()
        xb = torch.from_numpy(np.ascontiguousarray(x, np.float32))
        z = self.encoder(self.standardize(xb))
        codes, _, residuals = self.quantize(z)
        books = [q.codebook.detach().numpy() for q in self.quantizers[-2:]]
        head = codes[:, : max(self.levels - 2, 0)].numpy()
        tuples, errors = nearby_tuples(head, residuals[-len(books)].numpy(), books, count, beam)
        return tuples, errors / np.maximum((z**2).sum(1, keepdim=True).numpy(), 1e-12)

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

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor, seed: int, steps: int | None = None) -> None:
        """Fit every level's prices on embeddings x, level by level (balanced only): afresh, or
        `steps` steps on from the current ones."""
        if not self.config.balanced:
            return
        x = sample_rows(x, PER_CODE * max(self.config.codebook_sizes), seed)
        residual = self.encoder(self.standardize(x))
        for level, quantizer in enumerate(self.quantizers):
            if quantizer.balanced:
                quantizer.calibrate(residual, seed + level, steps)
            residual = residual - quantizer(residual)[1]

    # -- saving ------------------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, np.ndarray], dict]:
        """Weights as arrays and the architecture that loads them."""
        tensors = {k: v.detach().cpu().numpy() for k, v in self.state_dict().items()}
        return tensors, asdict(self.config)

    @classmethod
    def from_state(cls, tensors: dict[str, np.ndarray], config: dict) -> RQVAE:
        model = cls(RQVAEConfig(**config))
        model.load_state_dict({k: torch.from_numpy(v) for k, v in _new_names(tensors).items()})
        model.eval()
        return model


def _new_names(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Tokenizers saved before the per-level quantizer named their codebooks `codebooks.<l>`
    and their EMA statistics `ema_count_<l>` / `ema_sum_<l>`."""
    renamed = {}
    for name, value in tensors.items():
        if name.startswith("codebooks."):
            name = f"quantizers.{name.split('.')[1]}.codebook"
        elif name.startswith(("ema_count_", "ema_sum_")):
            stat, level = name.rsplit("_", 1)
            name = f"quantizers.{level}.{stat}"
        renamed[name] = value
    return renamed


# -- fitting -----------------------------------------------------------------------------------------
def fit_rqvae(
    x: np.ndarray,
    codebook_sizes: list[int],
    settings: TokenizerConfig,
    progress: Callable[[int, int, dict[str, float]], None] | None = None,
) -> tuple[RQVAE, dict]:
    """Train an RQ-VAE on embeddings x [N, D]; (model, fit report). Deterministic on CPU."""
    with reproducible_threads():
        return _fit(x, codebook_sizes, settings, progress)


def _fit(x, codebook_sizes, settings: TokenizerConfig, progress):
    started = time.perf_counter()
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    x = np.ascontiguousarray(x, dtype=np.float32)
    model = RQVAE(RQVAEConfig.from_settings(settings, x.shape[1], codebook_sizes))
    xt = torch.from_numpy(x)
    model.mean.copy_(xt.mean(dim=0))
    model.std.copy_(xt.std(dim=0).clamp_min(1e-6))

    # Codebook init: k-means per level on the residuals of the full data.
    with torch.no_grad():
        residual = model.encoder(model.standardize(xt)).numpy()
    device = "cpu"
    for level, quantizer in enumerate(model.quantizers):
        residual, device = quantizer.init_kmeans(
            residual, settings.kmeans_iterations, settings.seed + level
        )

    optimizer = torch.optim.Adam(
        [p for p in model.parameters() if p.requires_grad], lr=settings.learning_rate
    )
    # A held-out split decides when to stop and which epoch's weights to keep (none below 200).
    shuffled = rng.permutation(len(x))
    n_val = int(len(x) * settings.validation_share) if len(x) >= 200 else 0
    val_x, xt = xt[torch.from_numpy(shuffled[:n_val])], xt[torch.from_numpy(shuffled[n_val:])]
    best_loss, best_epoch, best_state = float("inf"), -1, None
    n = len(xt)
    # At least 8 steps an epoch: a small catalog in one giant batch barely trains.
    batch = max(1, min(settings.batch_size, max(64, n // 8)))
    history: list[dict[str, float]] = []
    restarts: list[int] = [0] * model.levels
    losses: dict[str, float] = {}
    for epoch in range(settings.epochs):
        model.train()
        order = torch.from_numpy(rng.permutation(n))
        usage = [torch.zeros(k, dtype=torch.long) for k in codebook_sizes]
        totals: dict[str, float] = {}
        for start in range(0, n, batch):
            xb = xt[order[start : start + batch]]
            step_losses, codes, residuals = model(xb)
            optimizer.zero_grad(set_to_none=True)
            step_losses["total"].backward()
            optimizer.step()
            for level, quantizer in enumerate(model.quantizers):
                if quantizer.ema:
                    quantizer.ema_update(codes[:, level], residuals[level])
                usage[level] += torch.bincount(codes[:, level], minlength=len(usage[level]))
            for name, value in step_losses.items():
                totals[name] = totals.get(name, 0.0) + value.item() * len(xb)
        losses = {name: value / n for name, value in totals.items()}
        if epoch < settings.epochs - 1:
            _restart_dead_codes(model, xt, usage, rng, restarts)
        model.calibrate(xt, settings.seed + epoch, EPOCH_CALIBRATION_STEPS)  # codewords moved
        if n_val:
            with torch.no_grad():
                model.eval()
                # Reconstruction, not the total: the codebook terms grow as the encoder moves.
                losses["validation"] = model(val_x)[0]["reconstruction"].item()
            if losses["validation"] < best_loss - 1e-6:
                best_loss, best_epoch = losses["validation"], epoch
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        history.append({"epoch": epoch, **losses})
        if progress is not None:
            progress(epoch + 1, settings.epochs, losses)
        if n_val and epoch - best_epoch >= settings.patience:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.calibrate(
        xt, settings.seed + settings.epochs
    )  # the kept codewords' own prices, fitted afresh
    return model, {
        "method": "rqvae",
        "codebook_sizes": list(codebook_sizes),
        "epochs": len(history),
        "seconds": time.perf_counter() - started,
        "final_losses": losses,
        "kmeans_device": device,
        "dead_code_restarts": restarts,
        "history": history[:: max(1, math.ceil(len(history) / 50))],
        "best_epoch": best_epoch,  # the epoch whose weights were kept (-1: no held-out split)
    }


def _restart_dead_codes(model: RQVAE, xt, usage, rng, restarts: list[int]) -> None:
    """A code no item chose this epoch moves onto a random residual, so capacity is never
    silently wasted (the collapse peers report)."""
    dead_levels = [torch.nonzero(c == 0).flatten() for c in usage]
    if not any(len(d) for d in dead_levels):
        return
    sample = torch.from_numpy(rng.choice(len(xt), size=min(len(xt), 4096), replace=False))
    with torch.no_grad():
        _, _, pools = model.quantize(model.encoder(model.standardize(xt[sample])))
        for level, dead in enumerate(dead_levels):
            if len(dead):
                pool = pools[level].detach().clone()
                pick = torch.from_numpy(rng.integers(0, len(pool), len(dead)))
                model.quantizers[level].restart(dead, pool, pick)
                restarts[level] += len(dead)
