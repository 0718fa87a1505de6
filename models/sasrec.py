"""SASRec (Kang & McAuley, 2018): a causal self-attention encoder over item ids, the baseline
the generative recommender is compared with in the same harness (same splits, same metrics).

Trained with full softmax cross-entropy over all items at every position; peers measured this CE
variant well above the BCE one in TIGER's table (`shared/notes/peers.md` 3.5), so the report names
the loss. Scores every item, so ranking is exact.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class SASRecConfig:
    d_model: int = 64
    heads: int = 2
    layers: int = 2
    dropout: float = 0.3
    max_history: int = 20

    def to_dict(self) -> dict:
        return asdict(self)


class SASRec(nn.Module):
    """Item ids 1..n_items (0 is padding) -> next-item logits over all items."""

    def __init__(self, n_items: int, config: SASRecConfig) -> None:
        super().__init__()
        self.n_items, self.config = n_items, config
        self.item = nn.Embedding(n_items + 1, config.d_model, padding_idx=0)
        self.position = nn.Embedding(config.max_history, config.d_model)
        layer = nn.TransformerEncoderLayer(
            config.d_model,
            config.heads,
            4 * config.d_model,
            config.dropout,
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.d_model)
        self.drop = nn.Dropout(config.dropout)
        nn.init.normal_(self.item.weight, std=0.02)

    def states(self, history: torch.Tensor) -> torch.Tensor:
        """history [B, T] (left-padded with 0) -> hidden states [B, T, d]."""
        t = history.shape[1]
        positions = torch.arange(t, device=history.device)
        real = (history != 0).unsqueeze(-1)
        x = self.item(history) * self.config.d_model**0.5 + self.position(positions)
        x = self.drop(x) * real
        # Causal mask only, padded positions zeroed at the input and output (the original
        # SASRec also re-zeroes them after every block; here they keep a constant state that
        # real items may attend to, which carries no item information). A key-padding mask
        # would leave left-padding queries with no key at all, i.e. NaN that then spreads.
        causal = torch.triu(torch.ones(t, t, dtype=torch.bool, device=history.device), 1)
        return self.norm(self.encoder(x, mask=causal)) * real

    def forward(self, history: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the next item at every non-padding position."""
        logits = self.states(history) @ self.item.weight[1:].T
        return F.cross_entropy(
            logits.reshape(-1, self.n_items).float(), (targets - 1).reshape(-1), ignore_index=-1
        )

    @torch.no_grad()
    def scores(self, history: torch.Tensor) -> torch.Tensor:
        """Scores of items 1..n for the position after the last history item: [B, n_items]."""
        return self.states(history)[:, -1] @ self.item.weight[1:].T
