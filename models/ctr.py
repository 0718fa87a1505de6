"""Click models on SIDs, one family: a base model, DIN, SID features concatenated, and AKT-Rec
with its three ablations. They share the item embeddings, history pooling and the MLP head, so a
comparison changes one thing at a time.

| model                   | item embedding              | history   | fusion                  |
|-------------------------|-----------------------------|-----------|-------------------------|
| base                    | ID                          | mean      | [t, h, t*h] -> MLP      |
| din                     | ID                          | attention | [t, h, t*h] -> MLP      |
| sid-concat              | [ID; cluster per level]     | mean      | [t, h, t*h] -> MLP      |
| aktrec                  | gate*ID + (1-gate)*cluster  | mean      | activity-weighted views |
| aktrec-symmetric        | as aktrec; L_trans symmetric                                    |
| aktrec-no-gate          | ID + cluster                | mean      | activity-weighted views |
| aktrec-no-aggregation   | gate*ID + (1-gate)*cluster  | mean      | views concatenated      |

AKT-Rec (choices the paper leaves open, documented in the README):
- clusters: items sharing a SID prefix of length 1..`cluster_levels`; an item's cluster part is
  the mean of its clusters' embeddings;
- gate: sigmoid(w * log1p(training clicks) + b), one weight per dimension: a rarely clicked item
  leans on its cluster;
- L_trans on the clusters of prefix length `transfer_level` that hold both head and tail items:
  c_head / c_tail = the mean individual embedding of the cluster's head / tail items; InfoNCE
  over those clusters (positive: the same cluster's other half; negatives: the other clusters),
  cosine / `temperature`; `l1 * L(c_head, sg(c_tail)) + l2 * L(c_tail, sg(c_head))`, l1 < l2, so
  tails move towards heads more than heads towards tails; the symmetric ablation weighs both
  (l1 + l2) / 2;
- aggregation: views (individual, cluster, content = the published embedding projected, history)
  mixed by softmax weights from the sample's activity (log1p item clicks, log1p history length).
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.nn import functional as F

CTRModelName = Literal[
    "base",
    "din",
    "sid-concat",
    "aktrec",
    "aktrec-symmetric",
    "aktrec-no-gate",
    "aktrec-no-aggregation",
]
CTR_MODELS: tuple[str, ...] = get_args(CTRModelName)


class CTRConfig(BaseModel):
    """Hyperparameters shared by every click model (each uses the parts it has)."""

    model_config = ConfigDict(extra="forbid")

    dim: int = Field(default=32, ge=2, description="Embedding size.")
    mlp: list[int] = Field(default=[200, 80], description="Hidden sizes of the MLP head.")
    cluster_levels: int = Field(default=2, ge=1, description="SID prefix lengths 1..N: clusters.")
    transfer_level: int = Field(default=1, ge=1, description="Prefix length L_trans aligns.")
    head_share: float = Field(default=0.2, gt=0, lt=1, description="Head: top share by clicks.")
    temperature: float = Field(default=0.2, gt=0)
    l1: float = Field(default=0.05, ge=0, description="Weight of L(c_head, sg(c_tail)).")
    l2: float = Field(default=0.2, ge=0, description="Weight of L(c_tail, sg(c_head)).")


class ItemSide:
    """Per-item inputs fixed by the data (row `n_items` is the padding item)."""

    def __init__(self, codes: np.ndarray, clicks: np.ndarray, content, config: CTRConfig):
        n, levels = codes.shape
        depth = min(config.cluster_levels, levels)
        ids, sizes = [], []
        for level in range(1, depth + 1):  # a prefix tuple -> a dense cluster id
            _, cluster = np.unique(codes[:, :level], axis=0, return_inverse=True)
            cluster = cluster.reshape(-1)
            sizes.append(int(cluster.max()) + 1)
            ids.append(np.r_[cluster, sizes[-1]])  # padding -> its own row
        self.clusters = torch.from_numpy(np.stack(ids, 1).astype(np.int64))  # [n + 1, depth]
        self.cluster_sizes = sizes
        self.transfer = min(config.transfer_level, depth) - 1
        self.activity = torch.from_numpy(np.r_[np.log1p(clicks), 0.0].astype(np.float32))
        order = np.argsort(-clicks, kind="stable")
        head = np.zeros(n, bool)
        head[order[: max(1, int(config.head_share * n))]] = True
        self.head = torch.from_numpy(head)
        self.content = None
        if content is not None:
            self.content = torch.from_numpy(
                np.vstack([content, np.zeros((1, content.shape[1]))]).astype(np.float32)
            )

    def to(self, device) -> ItemSide:
        for name in ("clusters", "activity", "head", "content"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))
        return self


def mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])  # no activation after the last layer


class CTRNet(nn.Module):
    def __init__(self, kind: str, config: CTRConfig, n_items: int, side: ItemSide):
        super().__init__()
        self.kind, self.config, self.n_items = kind, config, n_items
        self.side = side
        d = config.dim
        self.aktrec = kind.startswith("aktrec")
        self.uses_clusters = self.aktrec or kind == "sid-concat"
        self.ids = nn.Embedding(n_items + 1, d, padding_idx=n_items)
        nn.init.normal_(self.ids.weight, std=0.05)
        if self.uses_clusters:
            self.clusters = nn.ModuleList(nn.Embedding(k + 1, d) for k in side.cluster_sizes)
        self.gated = self.aktrec and kind != "aktrec-no-gate"
        if self.gated:
            self.gate = nn.Linear(1, d)
        self.content = None
        if self.aktrec and side.content is not None:
            self.content = nn.Linear(side.content.shape[1], d)
        item_dim = d * (1 + len(side.cluster_sizes)) if kind == "sid-concat" else d
        if kind == "din":
            self.attention = mlp([4 * item_dim, 36, 1])
        self.aggregate = self.aktrec and kind != "aktrec-no-aggregation"
        views = 3 + (self.content is not None)  # individual, cluster, history (+ content)
        if self.aggregate:
            self.view_weights = mlp([2, 16, views])
            head_in = 4 * d
        else:
            head_in = 3 * item_dim + (d if self.content is not None else 0)
        self.head = mlp([head_in, *config.mlp, 1])

    # -- embeddings ------------------------------------------------------------------------------
    def _parts(self, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Individual and cluster embeddings of item indices (-1: padding)."""
        items = torch.where(items < 0, self.n_items, items)
        individual = self.ids(items)
        if not self.uses_clusters:
            return individual, None
        clusters = self.side.clusters[items]
        parts = [table(clusters[..., k]) for k, table in enumerate(self.clusters)]
        if self.kind == "sid-concat":
            return torch.cat([individual, *parts], -1), None
        return individual, torch.stack(parts, 0).mean(0)

    def item_embedding(self, items: torch.Tensor, parts=None) -> torch.Tensor:
        """The item's embedding; `parts` = `_parts(items)` when the caller has them already."""
        individual, cluster = parts if parts is not None else self._parts(items)
        if cluster is None:
            return individual
        if not self.gated:
            return individual + cluster
        activity = self.side.activity[torch.where(items < 0, self.n_items, items)]
        gate = torch.sigmoid(self.gate(activity.unsqueeze(-1)))
        return gate * individual + (1 - gate) * cluster

    # -- scoring ---------------------------------------------------------------------------------
    def forward(self, items: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        """Click logits [B] of items [B] after histories [B, H] (-1: none)."""
        parts = self._parts(items)
        target = self.item_embedding(items, parts)
        past = self.item_embedding(history)
        mask = (history >= 0).unsqueeze(-1).float()
        length = mask.sum(1)
        if self.kind == "din":
            t = target.unsqueeze(1).expand_as(past)
            scores = self.attention(torch.cat([past, t, past - t, past * t], -1))
            pooled = (scores * mask * past).sum(1)
        else:
            pooled = (mask * past).sum(1) / length.clamp(min=1)
        features = [target, pooled, target * pooled]
        if self.aggregate:
            individual, cluster = parts
            views = [individual, cluster, pooled]
            if self.content is not None:
                views.append(self.content(self.side.content[torch.where(items < 0, -1, items)]))
            activity = torch.stack([self.side.activity[items], torch.log1p(length.squeeze(-1))], -1)
            weights = torch.softmax(self.view_weights(activity), -1)
            fused = (weights.unsqueeze(-1) * torch.stack(views, 1)).sum(1)
            features = [fused, *features]
        elif self.content is not None:
            features.append(self.content(self.side.content[items]))
        return self.head(torch.cat(features, -1)).squeeze(-1)

    def transfer_loss(self) -> torch.Tensor:
        """AKT-Rec's L_trans (0 for the other models, or with fewer than 2 usable clusters)."""
        if not self.aktrec:
            return self.ids.weight.new_zeros(())
        individual = self.ids.weight[: self.n_items]
        cluster = self.side.clusters[: self.n_items, self.side.transfer]
        k = self.side.cluster_sizes[self.side.transfer]
        means = []
        for part in (self.side.head, ~self.side.head):
            total = individual.new_zeros(k, individual.shape[1])
            total.index_add_(0, cluster[part], individual[part])
            count = torch.bincount(cluster[part], minlength=k).float()
            means.append((total, count))
        usable = (means[0][1] > 0) & (means[1][1] > 0)
        if int(usable.sum()) < 2:
            return individual.new_zeros(())
        c_head = means[0][0][usable] / means[0][1][usable, None]
        c_tail = means[1][0][usable] / means[1][1][usable, None]
        c = self.config
        to_head = info_nce(c_tail, c_head.detach(), c.temperature)
        to_tail = info_nce(c_head, c_tail.detach(), c.temperature)
        if self.kind == "aktrec-symmetric":
            return (c.l1 + c.l2) / 2 * (to_head + to_tail)
        return c.l1 * to_tail + c.l2 * to_head


def info_nce(anchors: torch.Tensor, positives: torch.Tensor, temperature: float) -> torch.Tensor:
    """Row i of `anchors` should match row i of `positives` against every other row."""
    logits = F.normalize(anchors, dim=-1) @ F.normalize(positives, dim=-1).T / temperature
    return F.cross_entropy(logits, torch.arange(len(anchors), device=anchors.device))


class CTRBatches:
    """Shuffled training batches (items, histories, labels) drawn with a seeded generator."""

    def __init__(self, items, history, labels, batch_size: int, seed: int):
        self.items = torch.tensor(items, dtype=torch.int64)
        self.history = torch.from_numpy(np.ascontiguousarray(history, np.int64))
        self.labels = torch.tensor(labels, dtype=torch.float32)
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.steps_per_epoch = -(-len(items) // batch_size)

    def epoch(self):
        order = torch.randperm(len(self.items), generator=self.generator)
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            yield self.items[rows], self.history[rows], self.labels[rows]


class ClickModel:
    """What the shared training loop needs of a model: `module`, `device`, `loss(batch)`."""

    def __init__(self, net: CTRNet):
        self.module = net

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def loss(self, batch) -> torch.Tensor:
        items, history, labels = batch
        logits = self.module(items, history)
        return F.binary_cross_entropy_with_logits(logits, labels) + self.module.transfer_loss()

    @torch.no_grad()
    def predict(self, items: np.ndarray, history: np.ndarray, batch: int = 4096) -> np.ndarray:
        """Click probabilities [N]."""
        self.module.eval()
        out = []
        for start in range(0, len(items), batch):
            i = torch.from_numpy(items[start : start + batch]).to(self.device)
            h = torch.from_numpy(history[start : start + batch]).to(self.device)
            out.append(torch.sigmoid(self.module(i, h)).float().cpu().numpy())
        self.module.train()
        return np.concatenate(out) if out else np.zeros(0, np.float32)
