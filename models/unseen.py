"""Items no training sequence held ("unseen": the held-out cold items, and items only ever met
among a sequence's last two, the validation and test targets): an item table has a row for them that no training target trained as theirs, so a
model ranks them by a softmax-weighted mix of their nearest seen items' rows instead, nearest by
cosine of the published content embeddings. One way for every item-table model (SASRec, AsymRec).

Pure torch; knows arrays and tensors only.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

TEMPERATURE = 0.05  # softmax over the cosines of an unseen item's nearest seen items


def unseen_items(sequences: list[np.ndarray], n_items: int) -> np.ndarray:
    """[n_items] bool: the items no training part of any sequence holds (all but its last two
    items, the validation and test targets)."""
    seen = np.zeros(n_items, bool)
    for seq in sequences:
        seen[seq[:-2]] = True
    return ~seen


def content_neighbours(
    unseen: np.ndarray, embeddings: np.ndarray | None, k: int, rows: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each unseen item's `k` nearest seen items by content cosine and their softmax weights:
    (index [n, k] int64, weight [n, k]); rows of seen items are 0. Empty ([0, 1]) when no item
    is unseen, none is seen or k is 0 (then `embeddings` may be None)."""
    k = min(k, int((~unseen).sum()))
    if not unseen.any() or k == 0:
        return torch.zeros(0, 1, dtype=torch.long), torch.zeros(0, 1)
    x = F.normalize(torch.from_numpy(np.asarray(embeddings, np.float32)), dim=1)
    seen, cold = torch.from_numpy(np.flatnonzero(~unseen)), np.flatnonzero(unseen)
    index, weight = torch.zeros(len(unseen), k, dtype=torch.long), torch.zeros(len(unseen), k)
    for start in range(0, len(cold), rows):
        at = torch.from_numpy(cold[start : start + rows])
        top = (x[at] @ x[seen].T).topk(k, dim=1)
        index[at] = seen[top.indices]
        weight[at] = torch.softmax(top.values / TEMPERATURE, dim=1)
    return index, weight


def borrowed(
    table: torch.Tensor, unseen: torch.Tensor, index: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """`table` [n, d] with each unseen item's row replaced by its neighbours' weighted rows
    (`content_neighbours`); `table` itself when there are none."""
    if not len(index):
        return table
    mixed = (weight.unsqueeze(-1) * table[index]).sum(1)
    return torch.where(unseen[:, None], mixed, table)
