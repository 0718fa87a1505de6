"""AsymRec: continuous item embeddings in, multi-view discrete codes out (asymmetric SIDs).

    history items -> published content embeddings -> MSP (K expert projections mixed by a
    router) -> SASRec's causal encoder -> hidden state h -> one head per view and level (MHQ)

- **MSP** (input side): each history item enters as its published content embedding
  (standardized), mapped to the hidden size by `experts` linear projections mixed by a softmax
  router over the same embedding. No item-id table: a cold item has an input like any other.
  `experts: 1` is one linear projection (the no-MSP ablation).
- **MHQ** (output side): every item has codes in several views, each quantized into `levels`
  residual levels (`models.mhq`: EMA codebooks, semantic regularizer), fitted when the model is
  built from the published embeddings of the items training sequences hold and from those
  sequences (then every item, cold ones too, is encoded), deterministic for a seed,
  and saved with the weights (the codes are a buffer, the frozen quantizers a submodule).
  `targets: published` uses the published SIDs (codes + collision suffix) as the only view
  instead (the no-MHQ ablation).
- **Heads and decoding**: each code of each view and level has an output embedding; the decoder
  predicts every view's codes in parallel (a softmax over each level's codebook), and an item's
  score is the sum of its codes' logits, i.e. h . (sum of its code embeddings). Ranking scores
  every catalog item this way, so every returned item exists, and the ranking is exact.
  `item_residual` (the default, sidpipe's addition; `false` is the paper's form) adds a
  learned per-item output vector, starting at 0, to that sum: the codes carry what items
  share, the residual what a frequent-enough item's codes cannot say alone. Inputs stay
  ID-free. An item no training sequence held (a cold item) has codes, but codes no training
  target trained as its own (and a residual only ever pushed down): it is ranked by the output
  embeddings of its `unseen_neighbours` nearest seen items by content cosine, softmax-weighted
  (`unseen_items: neighbours`), or by its content view's codes alone (`content`), or by all
  its codes (`codes`); never by its own residual.
- **Loss**: `code_loss_weight` x the mean cross-entropy of the target's code at every view and
  level, plus `item_loss_weight` x the cross-entropy of the target among all items scored by
  their codes; at every position of SASRec's training windows.
"""

from __future__ import annotations

import logging
import time
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from sidpipe.errors import TrainingDataError
from sidpipe.models.mhq import collaborative_view, fit_view
from sidpipe.models.recommender import RecData
from sidpipe.models.sasrec import CausalEncoder, SequenceScorer
from sidpipe.models.unseen import borrowed, content_neighbours, unseen_items

log = logging.getLogger(__name__)
View = Literal["content", "collaborative"]


class AsymRecConfig(BaseModel):
    """AsymRec's hyperparameters (the `model:` section of a training config)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["asymrec"] = "asymrec"
    d_model: int = 64
    heads: int = 2
    layers: int = 2
    dropout: float = Field(default=0.3, ge=0, lt=1)
    experts: int = Field(
        default=4, ge=1, description="MSP's expert projections (1: one linear projection)."
    )
    targets: Literal["mhq", "published"] = Field(
        default="mhq", description="mhq: the views below; published: the published SIDs."
    )
    views: list[View] = Field(default=["content", "collaborative"], min_length=1)
    levels: int = Field(default=3, ge=1, description="Residual levels per view.")
    codebook_size: int = Field(
        default=256, ge=2, description="Codes per level (fewer for a catalog under 16x this)."
    )
    latent_dim: int = Field(default=32, ge=2, description="Quantizer latent size.")
    collaborative_dim: int = Field(default=64, ge=2, description="PPMI-SVD dimensions.")
    semantic_weight: float = Field(default=1.0, ge=0, description="Semantic regularizer.")
    quantizer_steps: int = Field(default=1000, ge=1, description="MHQ fitting steps per view.")
    unseen_items: Literal["neighbours", "content", "codes"] = Field(
        default="neighbours",
        description=(
            "Ranking an item no training sequence held: by its nearest seen items' output"
            " embeddings (content cosine, softmax-weighted), by its content view's codes only"
            " (scaled to as many views), or by all its codes."
        ),
    )
    unseen_neighbours: int = Field(default=5, ge=1, description="unseen_items: neighbours.")
    item_residual: bool = Field(
        default=True,
        description=(
            "Add a learned per-item output vector (starting at 0) to each item's code"
            " embeddings, so an item need not score exactly as the sum of codes it shares"
            " (false: the paper's form, scores from codes alone)."
        ),
    )
    item_loss_weight: float = Field(default=1.0, ge=0)
    code_loss_weight: float = Field(default=1.0, ge=0)
    seed: int = Field(default=42, description="Seed of the MHQ fit.")


class AsymRecNet(CausalEncoder):
    """Content embeddings [n, D] and target codes [n, C] (buffers) -> next-item losses/scores."""

    def __init__(
        self,
        content: np.ndarray,
        codes: np.ndarray,
        sizes: list[int],
        config: AsymRecConfig,
        max_history: int,
    ) -> None:
        super().__init__(config.d_model, config.heads, config.layers, config.dropout, max_history)
        self.config = config
        x = torch.from_numpy(np.asarray(content, np.float32))
        x = (x - x.mean(0)) / x.std(0).clamp_min(1e-6)
        self.register_buffer("content", torch.cat([torch.zeros(1, x.shape[1]), x]))  # 0: padding
        self.register_buffer("codes", torch.from_numpy(np.asarray(codes, np.int64)))
        self.register_buffer("unseen", torch.zeros(len(codes), dtype=torch.bool))
        # unseen_items: neighbours (derived from the data when the model is built, not saved)
        self.register_buffer("neighbour_index", torch.zeros(0, 1, dtype=torch.long), False)
        self.register_buffer("neighbour_weight", torch.zeros(0, 1), False)
        self.sizes = list(sizes)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        self.register_buffer("offsets", torch.from_numpy(starts.astype(np.int64)))
        d, k = config.d_model, config.experts
        self.experts = nn.Linear(x.shape[1], k * d)
        self.router = nn.Linear(x.shape[1], k) if k > 1 else None
        self.code_embedding = nn.Embedding(int(sum(sizes)), d)
        nn.init.normal_(self.code_embedding.weight, std=0.02)
        self.residual = nn.Embedding(len(codes), d) if config.item_residual else None
        if self.residual is not None:
            nn.init.zeros_(self.residual.weight)

    def project(self, items: torch.Tensor) -> torch.Tensor:
        """MSP: items [B, T] (1-based, 0 = padding) -> inputs [B, T, d]."""
        x = self.content[items]
        out = self.experts(x).unflatten(-1, (self.config.experts, self.config.d_model))
        if self.router is None:
            return out[..., 0, :]
        gate = torch.softmax(self.router(x), dim=-1)
        return (gate.unsqueeze(-1) * out).sum(-2)

    def states(self, history: torch.Tensor) -> torch.Tensor:
        return self.encode(self.project(history), history != 0)

    def code_sum(self) -> torch.Tensor:
        """[n, d]: the sum of each item's code embeddings over views and levels."""
        return self.code_embedding(self.codes + self.offsets).sum(1)

    def item_embeddings(self) -> torch.Tensor:
        """[n, d]: each item's output embedding, `code_sum` plus its `item_residual`."""
        table = self.code_sum()
        return table if self.residual is None else table + self.residual.weight

    def forward(self, history: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        real = targets > 0
        h = self.states(history)[real]
        target = targets[real] - 1
        loss = h.new_zeros(())
        if self.config.item_loss_weight:
            logits = h @ self.item_embeddings().T
            loss = loss + self.config.item_loss_weight * F.cross_entropy(logits.float(), target)
        if self.config.code_loss_weight:
            logits = (h @ self.code_embedding.weight.T).float()
            codes = self.codes[target]
            per_level = [
                F.cross_entropy(logits[:, start : start + size], codes[:, c])
                for c, (start, size) in enumerate(
                    zip(self.offsets.tolist(), self.sizes, strict=True)
                )
            ]
            loss = loss + self.config.code_loss_weight * torch.stack(per_level).mean()
        return loss

    def mark_unseen(self, unseen: np.ndarray, embeddings: np.ndarray) -> None:
        """Note the items no training sequence held and (`unseen_items: neighbours`) each one's
        nearest seen items by cosine of their content `embeddings` (`models.unseen`)."""
        self.unseen.copy_(torch.from_numpy(unseen))
        if self.config.unseen_items == "neighbours":
            k = self.config.unseen_neighbours
            self.neighbour_index, self.neighbour_weight = content_neighbours(unseen, embeddings, k)

    def ranking_embeddings(self) -> torch.Tensor:
        """What items are ranked by: `item_embeddings`, except for items no training sequence
        held (`unseen_items`): their nearest seen items' embeddings, or their content codes."""
        table = self.item_embeddings()
        views = self.config.views
        if not self.unseen.any():
            return table
        if self.config.unseen_items == "codes":
            return torch.where(self.unseen[:, None], self.code_sum(), table)
        if self.config.unseen_items == "neighbours":
            return borrowed(table, self.unseen, self.neighbour_index, self.neighbour_weight)
        if self.config.targets != "mhq" or "content" not in views:
            return torch.where(self.unseen[:, None], self.code_sum(), table)
        first = views.index("content") * self.config.levels
        columns = (
            self.codes[:, first : first + self.config.levels]
            + self.offsets[first : first + self.config.levels]
        )
        content = self.code_embedding(columns).sum(1) * len(views)
        return torch.where(self.unseen[:, None], content, table)

    @torch.no_grad()
    def scores(self, history: torch.Tensor) -> torch.Tensor:
        return self.states(history)[:, -1] @ self.ranking_embeddings().T


class AsymRecRecommender(SequenceScorer):
    """AsymRec in the shared harness: SASRec's windows in, exact scores of every item out."""

    name = "asymrec"
    config_class = AsymRecConfig

    def __init__(self, config: AsymRecConfig, data: RecData, max_history: int) -> None:
        if data.embeddings is None:
            raise TrainingDataError(
                "asymrec needs the published content embeddings (embeddings.parquet)",
                hint="publish the catalog again with this version of sidpipe",
            )
        self.config, self.max_history = config, max_history
        started = time.perf_counter()
        quantizers: dict[str, nn.Module] = {}
        if config.targets == "published":
            codes = np.column_stack([data.codes, data.suffix])
            sizes = [*data.codebook_sizes, int(data.suffix.max()) + 1]
            self.targets = {"published": {"sizes": sizes}}
        else:
            codes, sizes, self.targets, quantizers = fit_mhq(config, data)
        log.info(
            "asymrec targets (%s): %d codes per item, fitted in %.1fs",
            config.targets,
            len(sizes),
            time.perf_counter() - started,
        )
        self.module = AsymRecNet(data.embeddings, codes, sizes, config, max_history)
        self.module.quantizers = nn.ModuleDict(quantizers)  # frozen; saved with the weights
        self.module.mark_unseen(unseen_items(data.sequences, data.n_items), data.embeddings)

    def summary(self) -> dict:
        return {
            "tasks": ["next_item_codes"],
            "experts": self.config.experts,
            "item_residual": self.config.item_residual,
            "targets": self.targets,
        }


def fit_mhq(config: AsymRecConfig, data: RecData) -> tuple[np.ndarray, list[int], dict, dict]:
    """MHQ's codes [n_items, views x levels], the codebook sizes, a report per view and the
    fitted quantizer of each view."""
    size = min(config.codebook_size, max(2, data.n_items // 16))
    sizes = [size] * config.levels
    content = np.asarray(data.embeddings, np.float32)
    train_parts = [seq[:-2] for seq in data.sequences]
    seen = ~unseen_items(data.sequences, data.n_items)
    columns, reports, quantizers = [], {}, {}
    for v, view in enumerate(config.views):
        if view == "content":
            x = content
        else:
            x, learned = collaborative_view(
                train_parts, data.n_items, content, config.collaborative_dim, seed=config.seed
            )
        quantizers[view], codes, report = fit_view(
            x,
            config.latent_dim,
            sizes,
            steps=config.quantizer_steps,
            semantic=config.semantic_weight,
            seed=config.seed + 100 * v,
            fit_rows=np.flatnonzero(seen) if seen.sum() >= 2 * max(sizes) else None,
        )
        if view == "collaborative":
            report["items_from_interactions"] = int(learned.sum())
        columns.append(codes)
        reports[view] = report
    codes = np.concatenate(columns, 1)
    reports["distinct_items"] = float(len(np.unique(codes, axis=0)) / max(len(codes), 1))
    return codes, sizes * len(config.views), reports, quantizers
