"""SASRec (Kang & McAuley, 2018): a causal self-attention encoder over item ids, the baseline
the generative recommender is compared with in the same harness (same splits, same metrics).

Trained with full softmax cross-entropy over all items at every position; public re-runs measured
this CE variant well above the BCE one in TIGER's table (see the README's results), so the
report names the loss. Scores every item, so ranking is exact. An item no training sequence
held (a held-out cold item) is ranked, and read in a history, by its content neighbours' rows
(`unseen_items: neighbours`, `models.unseen`), since its own row was only ever pushed down.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from sidpipe.models.recommender import Batches, Examples, RecData, Recommender
from sidpipe.models.unseen import borrowed, content_neighbours, unseen_items


class SASRecConfig(BaseModel):
    """SASRec's hyperparameters (the `model:` section of a training config)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["sasrec"] = "sasrec"
    d_model: int = 64
    heads: int = 2
    layers: int = 2
    dropout: float = Field(default=0.3, ge=0, lt=1)
    unseen_items: Literal["neighbours", "own"] = Field(
        default="neighbours",
        description=(
            "Ranking (and reading in a history) an item no training sequence held: by its"
            " nearest seen items' rows (content cosine, softmax-weighted; needs the published"
            " embeddings), or by its own row, which training only ever pushed down."
        ),
    )
    unseen_neighbours: int = Field(default=5, ge=1, description="unseen_items: neighbours.")


class CausalEncoder(nn.Module):
    """SASRec's sequence encoder without its item table: embedded history items (plus learned
    positions) through causal self-attention blocks; the hidden state at each position predicts
    the next item. AsymRec feeds it projected content embeddings instead of item ids."""

    def __init__(self, d_model: int, heads: int, layers: int, dropout: float, max_history: int):
        super().__init__()
        self.d_model = d_model
        self.position = nn.Embedding(max_history, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model, heads, 4 * d_model, dropout, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)

    def encode(self, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """x [B, T, d] embedded items (left-padded), real [B, T] bool -> hidden states [B, T, d]."""
        t = x.shape[1]
        real = real.unsqueeze(-1)
        x = self.drop(x + self.position(torch.arange(t, device=x.device))) * real
        # Causal mask only, padded positions zeroed at the input and output (the original
        # SASRec also re-zeroes them after every block; here they keep a constant state that
        # real items may attend to, which carries no item information). A key-padding mask
        # would leave left-padding queries with no key at all, i.e. NaN that then spreads.
        causal = torch.triu(torch.ones(t, t, dtype=torch.bool, device=x.device), 1)
        return self.norm(self.encoder(x, mask=causal)) * real


class SASRec(CausalEncoder):
    """Item ids 1..n_items (0 is padding) -> next-item logits over all items."""

    def __init__(self, n_items: int, config: SASRecConfig, max_history: int) -> None:
        super().__init__(config.d_model, config.heads, config.layers, config.dropout, max_history)
        self.n_items, self.config = n_items, config
        self.item = nn.Embedding(n_items + 1, config.d_model, padding_idx=0)
        nn.init.normal_(self.item.weight, std=0.02)
        # unseen_items: neighbours (derived from the data when the model is built, not saved)
        self.register_buffer("unseen", torch.zeros(n_items, dtype=torch.bool), False)
        self.register_buffer("neighbour_index", torch.zeros(0, 1, dtype=torch.long), False)
        self.register_buffer("neighbour_weight", torch.zeros(0, 1), False)

    def mark_unseen(self, unseen: np.ndarray, embeddings: np.ndarray | None) -> None:
        """Note the items no training sequence held and (`unseen_items: neighbours`, with
        embeddings) each one's nearest seen items by content cosine (`models.unseen`)."""
        self.unseen.copy_(torch.from_numpy(unseen))
        way = self.config.unseen_items == "neighbours" and embeddings is not None
        k = self.config.unseen_neighbours if way else 0  # 0: none, rank by their own rows
        self.neighbour_index, self.neighbour_weight = content_neighbours(unseen, embeddings, k)

    def ranking_table(self) -> torch.Tensor:
        """The item table [n + 1, d] (row 0: padding) that evaluation reads and ranks by: the
        trained one, with unseen items' rows borrowed from their neighbours."""
        weight = self.item.weight
        rows = borrowed(weight[1:], self.unseen, self.neighbour_index, self.neighbour_weight)
        return torch.cat([weight[:1], rows])

    def states(self, history: torch.Tensor, table: torch.Tensor | None = None) -> torch.Tensor:
        """history [B, T] (left-padded with 0) -> hidden states [B, T, d], reading items from
        `table` (default: the trained item table)."""
        items = self.item(history) if table is None else F.embedding(history, table)
        return self.encode(items * self.config.d_model**0.5, history != 0)

    def forward(self, history: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the next item at every non-padding position (logits are computed for
        those positions only: a short window is mostly padding, and the item softmax is most of
        a step's cost)."""
        real = targets > 0
        logits = self.states(history)[real] @ self.item.weight[1:].T
        return F.cross_entropy(logits.float(), targets[real] - 1)

    @torch.no_grad()
    def scores(self, history: torch.Tensor) -> torch.Tensor:
        """Scores of items 1..n for the position after the last history item: [B, n_items]."""
        table = self.ranking_table()
        return self.states(history, table)[:, -1] @ table[1:].T


class SequenceScorer(Recommender):
    """A recommender that reads item histories (ids 1..n, 0 = padding) and scores every item:
    trained on `SequenceWindows` (every position a target) with `module(history, targets)` as
    the loss, ranked exactly by `module.scores(history)`. SASRec and AsymRec are two."""

    ranking = "score"
    max_history: int

    @classmethod
    def build(cls, config, data: RecData, max_history: int) -> SequenceScorer:
        return cls(config, data, max_history)

    def batches(self, data: RecData, train: Examples, batch_size: int, seed: int) -> Batches:
        return SequenceWindows(data.sequences, self.max_history, batch_size, seed)

    def loss(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        inputs, targets = batch
        return self.module(inputs, targets)

    @torch.no_grad()
    def score(self, examples: Examples) -> torch.Tensor:
        self.module.eval()
        history = torch.from_numpy(np.where(examples.history >= 0, examples.history + 1, 0))
        return self.module.scores(history.to(self.device)).float().cpu()


class SASRecRecommender(SequenceScorer):
    """SASRec in the shared harness: item-id sequences in, exact scores of every item out."""

    name = "sasrec"
    config_class = SASRecConfig

    def __init__(self, config: SASRecConfig, data: RecData, max_history: int) -> None:
        self.config, self.max_history = config, max_history
        self.module = SASRec(data.n_items, config, max_history)
        self.module.mark_unseen(unseen_items(data.sequences, data.n_items), data.embeddings)

    def summary(self) -> dict:
        return {"tasks": ["next_item"]}


class SequenceWindows(Batches):
    """Every training position is a target once, as in the generative model's windows: each
    user's training sequence (all but the last two items) is cut into windows of `max_history`
    targets, from the end; an epoch visits the windows in a new random order."""

    def __init__(self, sequences: list[np.ndarray], h: int, batch_size: int, seed: int) -> None:
        self.h, self.batch_size = h, batch_size
        self.rng = np.random.default_rng(seed)
        self.windows = []
        for seq in sequences:
            train = seq[:-2]
            for end in range(len(train), 1, -h):
                self.windows.append(train[max(0, end - h - 1) : end])
        self.trainable = np.array([u for u, s in enumerate(self.windows) if len(s) >= 2])
        self.steps_per_epoch = math.ceil(len(self.trainable) / batch_size)

    def batch(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-item targets (item ids 1..n, 0 = padding)."""
        h = self.h
        inputs = np.zeros((len(rows), h), np.int64)
        targets = np.zeros((len(rows), h), np.int64)
        for k, r in enumerate(rows):
            seq = self.windows[r] + 1
            x, y = seq[:-1][-h:], seq[1:][-h:]
            inputs[k, h - len(x) :] = x
            targets[k, h - len(y) :] = y
        return torch.from_numpy(inputs), torch.from_numpy(targets)

    def epoch(self) -> Iterator[tuple[torch.Tensor, ...]]:
        order = self.rng.permutation(self.trainable)
        for step in range(self.steps_per_epoch):
            yield self.batch(order[step * self.batch_size : (step + 1) * self.batch_size])
