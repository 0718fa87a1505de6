"""The one interface every recommender of the training flows implements, and the data it gets.

A training flow never asks which model it trains. It builds a `Recommender` by name from the
registry (`models.registry`), asks it for training batches, its loss on a batch, and either the
score of every item (`ranking = "score"`: exact full ranking) or its top items by generation
(`ranking = "generate"`: e.g. constrained beam search over SIDs). Everything model-specific (how
inputs become tensors, which tasks exist, how decoding works) stays behind these methods.

`RecData` is what the flows load from published artifacts: the catalog's items by index (SIDs,
texts) and the users' chronological sequences. `Examples` are "history -> next item" rows.
Pure data and an abstract class: no store, no Prefect.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import numpy as np
import torch
from pydantic import BaseModel

TEXT_FIELDS = ("title", "attributes", "caption", "interests")


@dataclass
class RecData:
    """The items (index 0..n-1, in item_id order) and the users, as published and observed."""

    item_ids: list[str]
    codes: np.ndarray  # [items, levels] the published SID codes
    suffix: np.ndarray  # [items] collision suffixes
    codebook_sizes: tuple[int, ...]
    users: list[str]
    sequences: list[np.ndarray]  # per user: item indices, oldest first
    text: dict[str, list[str | None]] = field(default_factory=dict)  # TEXT_FIELDS -> per item
    embeddings: np.ndarray | None = None  # [items, dim] the published content embeddings
    cold: np.ndarray | None = None  # [items] bool: held out of every training sequence

    @property
    def n_items(self) -> int:
        return len(self.item_ids)


@dataclass
class Examples:
    """One history -> next item example per row (history left-padded with -1)."""

    user: np.ndarray  # [N] user index into RecData.users
    history: np.ndarray  # [N, max_history] item indices, -1 = none
    target: np.ndarray  # [N] item index

    def __len__(self) -> int:
        return len(self.target)

    def rows(self, rows: np.ndarray) -> Examples:
        return Examples(self.user[rows], self.history[rows], self.target[rows])


class Batches(ABC):
    """Training batches of one recommender: `steps_per_epoch` batches per `epoch()`."""

    steps_per_epoch: int

    @abstractmethod
    def epoch(self) -> Iterator[tuple[torch.Tensor, ...]]: ...


class Recommender(ABC):
    """A trainable recommender: its weights (`module`), its own config, and the four calls the
    shared training loop and evaluator make."""

    name: ClassVar[str]  # the registry key; the model config's `kind`
    config_class: ClassVar[type[BaseModel]]
    ranking: ClassVar[Literal["score", "generate"]]

    module: torch.nn.Module  # what is optimized and saved in the checkpoint
    config: BaseModel

    @classmethod
    @abstractmethod
    def build(cls, config: BaseModel, data: RecData, max_history: int) -> Recommender:
        """A fresh model for this data (seed torch before calling: weights start random)."""

    @abstractmethod
    def batches(self, data: RecData, train: Examples, batch_size: int, seed: int) -> Batches:
        """The training batches, drawn with a generator seeded by `seed`."""

    @abstractmethod
    def loss(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The training loss of one batch (already on the module's device)."""

    def score(self, examples: Examples) -> torch.Tensor:
        """`ranking = "score"`: a score for every item [len(examples), n_items] (on the CPU)."""
        raise NotImplementedError

    def generate(
        self, examples: Examples, beams: int, constrained: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """`ranking = "generate"`: the `beams` best items per row, best first ([N, beams] item
        indices, -1 where the output names no item) and their scores."""
        raise NotImplementedError

    def score_exactly(self, examples: Examples) -> torch.Tensor:
        """`ranking = "generate"`: the generation score of every item [N, n_items], to check
        what decoding missed (costly: a check, never the way to rank)."""
        raise NotImplementedError

    def summary(self) -> dict:
        """What a run records about the model beyond its config (tasks, vocabulary, ...)."""
        return {}

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device


def autocast(device: torch.device):
    """bf16 autocast on CUDA; nothing on the CPU (float32 there: reproducible)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)
