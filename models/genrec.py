"""A TIGER-style generative recommender: an encoder-decoder transformer over Semantic-ID tokens.

The encoder reads a task token, a user token and the task's input (the last items' SIDs, a title,
a caption, ...); the decoder writes the answer: an item's SID (one token per level plus the
collision suffix) or a title. Next-item recommendation decodes SIDs with a beam search constrained
by a prefix trie of the catalog's SIDs, so it can only return real items.

Here: the token space, the model's hyperparameters (`GenRecConfig`, the `model:` section of a
training config) and the network. Decoding is `models.sid_decoding`; how items, users and tasks
become token batches is `models.genrec_recommender`. It never reads a store or a file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

TASKS = (
    "next_sid",  # history SIDs -> next SID (the recommendation task)
    "title_to_sid",
    "sid_to_title",
    "attributes_to_sid",  # description / attributes -> SID
    "history_titles_to_sid",  # history titles -> next SID
    "interests_to_sid",
    "caption_to_sid",  # TriAlignGR's visual tasks: VisDesc -> SID
    "caption_to_title",  # VisDesc -> title
)
PAD, BOS, EOS = 0, 1, 2


@dataclass(frozen=True)
class TokenSpace:
    """Where each kind of token lives in the one vocabulary the model embeds.

    [pad, bos, eos] [a task token per task] [user buckets] [SID level 1 .. L codes] [suffixes]
    [text word pieces]. SID tokens are `<level offset> + code`; the suffix is one more level.
    """

    codebook_sizes: tuple[int, ...]
    suffix_size: int  # largest collision suffix + 1
    user_buckets: int = 2000  # TIGER hashes users into 2,000 tokens
    text_vocab: int = 0  # word pieces (0: no text tasks)

    @property
    def task_start(self) -> int:
        return 3

    @property
    def user_start(self) -> int:
        return self.task_start + len(TASKS)

    @property
    def sid_start(self) -> int:
        return self.user_start + self.user_buckets

    @property
    def level_sizes(self) -> tuple[int, ...]:
        return (*self.codebook_sizes, self.suffix_size)

    @property
    def sid_end(self) -> int:
        return self.sid_start + sum(self.level_sizes)

    @property
    def text_start(self) -> int:
        return self.sid_end

    @property
    def size(self) -> int:
        return self.text_start + self.text_vocab

    @property
    def sid_length(self) -> int:
        return len(self.level_sizes)

    def task(self, name: str) -> int:
        return self.task_start + TASKS.index(name)

    def user(self, user_id: str) -> int:
        import zlib

        return self.user_start + zlib.crc32(user_id.encode()) % self.user_buckets

    def level_offsets(self) -> list[int]:
        offsets, start = [], self.sid_start
        for size in self.level_sizes:
            offsets.append(start)
            start += size
        return offsets

    def sid_tokens(self, codes: list[int], suffix: int) -> list[int]:
        return [o + c for o, c in zip(self.level_offsets(), [*codes, suffix], strict=True)]

    def text_tokens(self, piece_ids: list[int]) -> list[int]:
        return [self.text_start + p for p in piece_ids]


def wanted_tasks(requested: list[str]) -> list[str]:
    """The configured tasks, `all` expanded; unknown names and a missing next_sid are errors."""
    if requested == ["all"]:
        return list(TASKS)
    unknown = set(requested) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown tasks {sorted(unknown)}; known: {', '.join(TASKS)}")
    if "next_sid" not in requested:
        raise ValueError("tasks must include next_sid (the task that is evaluated)")
    return list(requested)


class GenRecConfig(BaseModel):
    """The generative recommender's hyperparameters. TIGER's size by default: 4+4 layers,
    d_model 128, 6 heads of 64, feed-forward 1024."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["tiger"] = "tiger"
    tasks: list[str] = Field(
        default=["next_sid"],
        description="Generation tasks sampled uniformly (models.genrec.TASKS); 'all' = every "
        "task the published artifacts can feed.",
    )
    d_model: int = 128
    heads: int = 6
    head_dim: int = 64
    encoder_layers: int = 4
    decoder_layers: int = 4
    feedforward: int = 1024
    dropout: float = Field(default=0.1, ge=0, lt=1)
    user_buckets: int = Field(default=2000, ge=1, description="Hashed user tokens (TIGER: 2,000).")
    text_max_tokens: int = Field(default=24, ge=1, description="Word pieces of a text input.")
    history_titles: int = Field(
        default=5, ge=1, description="Titles read by history_titles_to_sid."
    )

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, tasks: list[str]) -> list[str]:
        wanted_tasks(tasks)
        return tasks


class _Attention(nn.Module):
    """Multi-head attention whose inner width (heads x head_dim) may differ from d_model, as in
    T5/TIGER; uses PyTorch's fused scaled-dot-product attention."""

    def __init__(self, d_model: int, heads: int, head_dim: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.head_dim, self.dropout = heads, head_dim, dropout
        self.q = nn.Linear(d_model, heads * head_dim, bias=False)
        self.kv = nn.Linear(d_model, 2 * heads * head_dim, bias=False)
        self.out = nn.Linear(heads * head_dim, d_model, bias=False)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.heads, self.head_dim).transpose(1, 2)

    def project_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(self._split(t) for t in self.kv(memory).chunk(2, dim=-1))

    def forward(
        self,
        x,
        memory,
        key_padding: torch.Tensor | None = None,
        causal: bool = False,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        q = self._split(self.q(x))
        k, v = kv if kv is not None else self.project_kv(memory)
        mask = None
        if key_padding is not None:  # True where the key is padding
            mask = ~key_padding[:, None, None, :]
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=causal and mask is None,
        )
        b, _, n, _ = y.shape
        return self.out(y.transpose(1, 2).reshape(b, n, self.heads * self.head_dim))


class _Block(nn.Module):
    """Pre-norm transformer block: self-attention, optional cross-attention, feed-forward."""

    def __init__(self, c: GenRecConfig, cross: bool) -> None:
        super().__init__()
        self.self_norm = nn.LayerNorm(c.d_model)
        self.self_attn = _Attention(c.d_model, c.heads, c.head_dim, c.dropout)
        self.cross_norm = nn.LayerNorm(c.d_model) if cross else None
        self.cross_attn = _Attention(c.d_model, c.heads, c.head_dim, c.dropout) if cross else None
        self.ff_norm = nn.LayerNorm(c.d_model)
        self.ff = nn.Sequential(
            nn.Linear(c.d_model, c.feedforward),
            nn.GELU(),
            nn.Dropout(c.dropout),
            nn.Linear(c.feedforward, c.d_model),
        )
        self.drop = nn.Dropout(c.dropout)

    def forward(
        self, x, padding=None, memory=None, memory_padding=None, causal=False, cross_kv=None
    ):
        h = self.self_norm(x)
        x = x + self.drop(self.self_attn(h, h, None if causal else padding, causal=causal))
        if self.cross_attn is not None:
            x = x + self.drop(
                self.cross_attn(self.cross_norm(x), memory, memory_padding, kv=cross_kv)
            )
        return x + self.drop(self.ff(self.ff_norm(x)))


class GenRecModel(nn.Module):
    """Encoder-decoder over one shared vocabulary (input and output embeddings tied)."""

    def __init__(
        self, space: TokenSpace, config: GenRecConfig, max_source: int, max_target: int
    ) -> None:
        super().__init__()
        self.space, self.config = space, config
        self.embed = nn.Embedding(space.size, config.d_model, padding_idx=PAD)
        self.source_position = nn.Embedding(max_source, config.d_model)
        self.target_position = nn.Embedding(max_target, config.d_model)
        self.encoder = nn.ModuleList(_Block(config, False) for _ in range(config.encoder_layers))
        self.decoder = nn.ModuleList(_Block(config, True) for _ in range(config.decoder_layers))
        self.encoder_norm = nn.LayerNorm(config.d_model)
        self.decoder_norm = nn.LayerNorm(config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def encode(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """source [B, S] token ids (PAD-padded) -> (memory [B, S, d], padding mask [B, S])."""
        padding = source == PAD
        positions = torch.arange(source.shape[1], device=source.device)
        x = self.drop(self.embed(source) + self.source_position(positions))
        for block in self.encoder:
            x = block(x, padding)
        return self.encoder_norm(x), padding

    def cross_kv(self, memory: torch.Tensor, repeat: int = 1) -> list:
        """Each decoder layer's keys and values of the encoder memory, projected once (and
        repeated `repeat` times per row, for beams): decoding steps reuse them."""
        return [
            tuple(t.repeat_interleave(repeat, 0) for t in block.cross_attn.project_kv(memory))
            for block in self.decoder
        ]

    def decode(
        self,
        target_in: torch.Tensor,
        memory: torch.Tensor | None,
        memory_padding: torch.Tensor,
        cross_kv: list | None = None,
        columns: slice = slice(None),
        last_only: bool = False,
    ):
        """Decoder states for target_in [B, T] (starting with BOS) -> logits [B, T, vocab].

        Decoding asks for the SID `columns` of the `last_only` position: with text tasks the
        vocabulary is ~30x the SID tokens, and every earlier position is already decided."""
        positions = torch.arange(target_in.shape[1], device=target_in.device)
        x = self.drop(self.embed(target_in) + self.target_position(positions))
        for i, block in enumerate(self.decoder):
            x = block(
                x,
                memory=memory,
                memory_padding=memory_padding,
                causal=True,
                cross_kv=cross_kv[i] if cross_kv is not None else None,
            )
        # Tied output embedding, scaled as in T5 with tied weights; in float32 even under bf16
        # autocast, so near-ties between items are not decided by rounding.
        if last_only:
            x = x[:, -1:]
        with torch.autocast(device_type=x.device.type, enabled=False):
            h = self.decoder_norm(x).float()
            return h @ self.embed.weight[columns].float().T * (self.config.d_model**-0.5)

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Teacher-forced cross-entropy of `target` [B, T] (ending in EOS, PAD-padded)."""
        memory, padding = self.encode(source)
        target_in = F.pad(target[:, :-1], (1, 0), value=BOS)
        logits = self.decode(target_in, memory, padding)
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1), ignore_index=PAD
        )
