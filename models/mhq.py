"""MHQ, AsymRec's multi-faceted hierarchical quantization: the discrete targets AsymRec predicts.

Each *view* of an item is quantized into `levels` residual codes by a `ViewQuantizer`:

    standardize -> linear encoder (PCA-initialised) -> L x LevelQuantizer (EMA codebooks,
    k-means init, dead-code restart: models.quantizer) -> linear decoder

trained on reconstruction + commitment + a **semantic regularizer**: the cosine similarities
between the quantized latents of a batch must match those between the inputs, so the codes keep
the items' neighbourhoods and the latent cannot collapse onto a few directions (the dimensional
collapse AsymRec's regularizer is there to prevent).

The views (`collaborative_view` builds the second one):
- content: the item's published embedding;
- collaborative: positive PMI of items co-occurring within `window` steps of a training sequence,
  factorized by truncated SVD. An item no training sequence holds (a cold item) gets the ridge
  regression from content to collaborative embedding fitted on the other items, so every item has
  codes in every view.

The quantizers are fitted on the items the training sequences hold and then encode every item:
a cold item gets codes its warm neighbours use (codes only cold items chose would never be a
training target, and their output embeddings would stay at their initial values).

Deterministic for a seed (one torch thread). Knows arrays and tensors only.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sidpipe.models.quantizer import LevelQuantizer
from sidpipe.models.rqvae import reproducible_threads


class ViewQuantizer(nn.Module):
    """One view's residual quantizer: `sizes[l]` codes at level l in a `latent_dim` space."""

    def __init__(self, input_dim: int, latent_dim: int, sizes: list[int], decay: float) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(input_dim))
        self.register_buffer("scale", torch.ones(()))
        self.encoder = nn.Linear(input_dim, latent_dim)
        self.decoder = nn.Linear(latent_dim, input_dim)
        self.levels = nn.ModuleList(
            LevelQuantizer(k, latent_dim, ema=True, decay=decay) for k in sizes
        )

    def standardize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.scale

    def quantize(self, z: torch.Tensor):
        """Codes [N, L], the chosen codeword per level, the residual each level saw."""
        codes, chosen, residuals = [], [], []
        for level in self.levels:
            idx, q = level(z)
            codes.append(idx)
            chosen.append(q)
            residuals.append(z)
            z = z - q.detach()
        return torch.stack(codes, 1), chosen, residuals

    def losses(self, x: torch.Tensor, commitment: float, semantic: float):
        """(total loss, parts, codes, residuals) of a batch of raw inputs."""
        xs = self.standardize(x)
        z = self.encoder(xs)
        codes, chosen, residuals = self.quantize(z)
        z_q = z + (sum(chosen) - z).detach()  # straight-through
        parts = {
            "reconstruction": F.mse_loss(self.decoder(z_q), xs),
            "commitment": sum(
                F.mse_loss(r, q.detach()) for r, q in zip(residuals, chosen, strict=True)
            ),
            "semantic": F.mse_loss(_cosines(z_q), _cosines(xs)),
        }
        total = (
            parts["reconstruction"]
            + commitment * parts["commitment"]
            + semantic * parts["semantic"]
        )
        return total, parts, codes, [r.detach() for r in residuals]

    @torch.no_grad()
    def encode(self, x: np.ndarray) -> np.ndarray:
        codes, _, _ = self.quantize(self.encoder(self.standardize(torch.from_numpy(x))))
        return codes.numpy()

    @torch.no_grad()
    def reconstruction_cosine(self, x: np.ndarray) -> float:
        xs = self.standardize(torch.from_numpy(x))
        _, chosen, _ = self.quantize(self.encoder(xs))
        return float(F.cosine_similarity(self.decoder(sum(chosen)), xs, dim=1).mean())


def _cosines(x: torch.Tensor) -> torch.Tensor:
    x = F.normalize(x, dim=1)
    return x @ x.T


def fit_view(
    x: np.ndarray,
    latent_dim: int,
    sizes: list[int],
    *,
    steps: int,
    batch_size: int = 512,
    learning_rate: float = 1e-3,
    commitment: float = 0.25,
    semantic: float = 1.0,
    decay: float = 0.99,
    seed: int = 42,
    fit_rows: np.ndarray | None = None,
) -> tuple[ViewQuantizer, np.ndarray, dict]:
    """A quantizer fitted on the rows `fit_rows` (all: None) of one view's vectors x [N, D];
    (quantizer, codes of every row [N, L], report)."""
    with reproducible_threads():
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        every = np.ascontiguousarray(x, np.float32)
        x = every if fit_rows is None else np.ascontiguousarray(every[fit_rows])
        latent_dim = min(latent_dim, x.shape[1])
        vq = ViewQuantizer(x.shape[1], latent_dim, sizes, decay)
        xt = torch.from_numpy(x)
        with torch.no_grad():
            vq.mean.copy_(xt.mean(0))
            centered = xt - vq.mean
            vq.scale.copy_(centered.norm(dim=1).mean().clamp_min(1e-6))
            # PCA start: the encoder keeps the top directions, the decoder maps them back.
            _, _, v = torch.linalg.svd(centered / vq.scale, full_matrices=False)
            vq.encoder.weight.copy_(v[:latent_dim])
            vq.encoder.bias.zero_()
            vq.decoder.weight.copy_(v[:latent_dim].T)
            vq.decoder.bias.zero_()
            residual = vq.encoder(vq.standardize(xt)).numpy()
        for level, quantizer in enumerate(vq.levels):
            residual, _ = quantizer.init_kmeans(residual, 20, seed + level)
        optimizer = torch.optim.Adam(
            [p for p in vq.parameters() if p.requires_grad], lr=learning_rate
        )
        usage = [torch.zeros(k) for k in sizes]
        restarts = [0] * len(sizes)
        parts = {}
        for step in range(steps):
            batch = xt[torch.from_numpy(rng.choice(len(x), min(batch_size, len(x)), replace=False))]
            total, parts, codes, residuals = vq.losses(batch, commitment, semantic)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            for level, quantizer in enumerate(vq.levels):
                quantizer.ema_update(codes[:, level], residuals[level])
                usage[level] += torch.bincount(codes[:, level], minlength=sizes[level])
            if (step + 1) % 100 == 0 and step + 1 < steps:
                _restart_dead(vq, batch, usage, rng, restarts)
                usage = [torch.zeros(k) for k in sizes]
        _polish(vq, xt)
        vq.requires_grad_(False)
        vq.eval()
        codes = vq.encode(every)
    report = {
        "sizes": list(sizes),
        "latent_dim": latent_dim,
        "steps": steps,
        "final_losses": {k: float(v.detach()) for k, v in parts.items()},
        "fitted_on": len(x),
        "reconstruction_cosine": vq.reconstruction_cosine(every),
        "usage": [float(len(np.unique(codes[:, level])) / k) for level, k in enumerate(sizes)],
        "distinct_tuples": float(len(np.unique(codes, axis=0)) / max(len(codes), 1)),
        "dead_code_restarts": restarts,
    }
    return vq, codes, report


@torch.no_grad()
def _polish(vq: ViewQuantizer, xt: torch.Tensor, iterations: int = 3) -> None:
    """A few Lloyd steps per level on all items with the trained encoder: codes the moving
    latent left empty restart on the residuals farthest from their codeword, and every code
    ends at the mean of its items (what the EMA tracks, without its lag)."""
    z = vq.encoder(vq.standardize(xt))
    for quantizer in vq.levels:
        for _ in range(iterations):
            idx, chosen = quantizer(z)
            counts = torch.bincount(idx, minlength=quantizer.size)
            dead = torch.nonzero(counts == 0).flatten()
            if len(dead):
                far = (z - chosen).norm(dim=1).topk(min(len(dead), len(z))).indices
                quantizer.restart(dead[: len(far)], z, far)
                idx, _ = quantizer(z)
                counts = torch.bincount(idx, minlength=quantizer.size)
            sums = torch.zeros_like(quantizer.codebook).index_add_(0, idx, z)
            alive = counts > 0
            quantizer.codebook.data[alive] = sums[alive] / counts[alive, None].to(z.dtype)
        quantizer.reset_ema(torch.arange(quantizer.size))
        z = z - quantizer.codebook[quantizer(z)[0]]


@torch.no_grad()
def _restart_dead(vq: ViewQuantizer, batch, usage, rng, restarts: list[int]) -> None:
    """Codes no batch chose in the last 100 steps move onto residuals of this batch."""
    _, _, pools = vq.quantize(vq.encoder(vq.standardize(batch)))
    for level, quantizer in enumerate(vq.levels):
        dead = torch.nonzero(usage[level] == 0).flatten()
        if len(dead):
            pick = torch.from_numpy(rng.integers(0, len(batch), len(dead)))
            quantizer.restart(dead, pools[level], pick)
            restarts[level] += len(dead)


def collaborative_view(
    sequences: list[np.ndarray],
    n_items: int,
    content: np.ndarray,
    dim: int,
    window: int = 3,
    ridge: float = 1.0,
    seed: int = 42,
) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings [n_items, dim], bool mask of items learned from co-occurrence): PPMI-SVD of
    the training sequences; the other items mapped from `content` by ridge regression."""
    pairs = []
    for seq in sequences:
        for gap in range(1, window + 1):
            if len(seq) > gap:
                pairs.append(np.stack([seq[:-gap], seq[gap:]], 1))
    pairs = np.concatenate(pairs) if pairs else np.zeros((0, 2), np.int64)
    pairs = np.concatenate([pairs, pairs[:, ::-1]])  # symmetric
    keys, counts = np.unique(pairs[:, 0] * n_items + pairs[:, 1], return_counts=True)
    rows, cols = keys // n_items, keys % n_items
    marginal = np.bincount(rows, weights=counts, minlength=n_items)
    total = counts.sum()
    pmi = np.log(counts * total / (marginal[rows] * marginal[cols]))
    keep = pmi > 0
    learned = marginal > 0
    dim = max(1, min(dim, int(learned.sum()) - 1))
    matrix = torch.sparse_coo_tensor(
        torch.from_numpy(np.stack([rows[keep], cols[keep]])),
        torch.from_numpy(pmi[keep].astype(np.float32)),
        (n_items, n_items),
        check_invariants=True,
    ).coalesce()
    with reproducible_threads():
        torch.manual_seed(seed)
        u, s, _ = torch.svd_lowrank(matrix, q=dim, niter=4)
    out = (u * s.sqrt()).numpy().astype(np.float32)
    if (~learned).any() and learned.sum() > 1:
        c = content - content[learned].mean(0)
        a = c[learned]
        w = np.linalg.solve(a.T @ a + ridge * np.eye(a.shape[1]), a.T @ out[learned])
        out[~learned] = c[~learned] @ w
    return out, learned
