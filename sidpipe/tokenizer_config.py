"""The SID tokenizer's settings (the `tokenizer` section of `sidpipe.config.PipelineConfig`).

Like the rest of the configuration, it must never import Prefect, torch or any model code.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from sidpipe.catalog_config import _Section


class TokenizerConfig(_Section):
    """The SID tokenizer: method, residual levels and their codebook sizes, training knobs,
    lifecycle (refit) and quality gates."""

    method: Literal["rqvae", "rqkmeans"] = Field(
        default="rqvae", description="rqvae (trained) or rqkmeans (residual k-means, no training)."
    )
    refit: bool = Field(
        default=False,
        description="Fit a new tokenizer version and pin it, with a drift report, instead of "
        "encoding with the pinned one.",
    )
    collisions: Literal["suffix", "reassign"] = Field(
        default="suffix",
        description="suffix: TIGER's extra token; reassign: move colliding new items to their "
        "lowest-error free tuple (last two levels re-searched; suffix if none is close enough).",
    )
    reassign_max_loss: float | None = Field(
        default=None,
        ge=0,
        description="reassign: the most a move may add to an item's squared reconstruction "
        "error, as a share of its squared norm (e.g. 0.02); a costlier item keeps a suffix "
        "(none: every item that has a free nearby tuple moves).",
    )
    min_level1_utilization: float = Field(
        default=0.5, ge=0, le=1, description="Quality gate: a fit using fewer level-1 codes fails."
    )
    min_distinct_tuple_rate: float = Field(
        default=0.0, ge=0, le=1, description="Quality gate on distinct code tuples per item."
    )
    warn_distinct_tuple_rate: float = Field(
        default=0.6,
        ge=0,
        le=1,
        description="Warn (run summary, manifest, quality report) while fewer items than this "
        "share have a code tuple of their own before the collision suffix.",
    )
    warn_max_bucket: int = Field(
        default=10,
        ge=1,
        description="Warn while more items than this share one code tuple (the suffix then "
        "carries their identity).",
    )

    codebook_sizes: list[int] = Field(
        default=[4096, 2048, 1024],
        description="Codes per level (TriAlignGR: 4096/2048/1024).",
    )
    small_catalog: Literal["shrink", "refuse"] = Field(
        default="shrink",
        description="When the catalog cannot fill the codebooks: shrink them, or refuse to fit.",
    )
    min_points_per_code: int = Field(
        default=39, ge=1, description="Items per code required at each level (faiss: 39)."
    )
    hidden_dims: list[int] = Field(default=[512, 256])
    latent_dim: int = Field(default=64, ge=2)
    epochs: int = Field(default=60, ge=0, description="RQ-VAE: most epochs (early stopping).")
    batch_size: int = Field(default=1024, ge=1)
    learning_rate: float = Field(default=3e-3, gt=0)
    commitment_weight: float = Field(default=0.25, ge=0)
    codebook_update: Literal["gradient", "ema"] = Field(
        default="gradient",
        description="RQ-VAE codebooks: learned by their loss, or moving averages (EMA).",
    )
    ema_decay: float = Field(default=0.99, gt=0, lt=1)
    validation_share: float = Field(
        default=0.05, ge=0, lt=0.5, description="RQ-VAE: held out for early stopping."
    )
    patience: int = Field(default=10, ge=1, description="RQ-VAE: epochs without improvement.")
    kmeans_iterations: int = Field(default=25, ge=1, description="Per k-means (or dimension step).")
    kmeans_dim_steps: int = Field(
        default=10,
        ge=1,
        description="RQ-KMeans: k-means over the principal axes in this many steps of more "
        "dimensions (as faiss's ResidualQuantizer trains); 1: plain k-means.",
    )
    refine_rounds: int = Field(
        default=3, ge=0, description="RQ-KMeans: coordinate-descent rounds after k-means."
    )
    balanced_codes: bool | None = Field(
        default=None,
        description="Balanced code assignment below the first level (per-code prices fitted so "
        "codes share items evenly; saved with the tokenizer): keeps deep levels from collapsing. "
        "None: on for rqkmeans, off for rqvae (where each measured better on Amazon Beauty).",
    )
    fit_sample_size: int | None = Field(
        default=None,
        ge=1,
        description="Fit on a seeded sample of this many items (none: all); every item is "
        "encoded either way.",
    )
    fit_max_norm_ratio: float | None = Field(
        default=None,
        gt=1,
        description="Rows whose norm is over this many times the median are left out of the "
        "fit (they are still encoded): a few huge vectors would otherwise set an RQ-VAE's "
        "scaling and loss. None: 10 for rqvae, no limit for rqkmeans (where each measured "
        "better); 1000, the screening limit, fits on every row.",
    )
    seed: int = 42

    @property
    def balanced(self) -> bool:
        """Whether this fit balances its codes (`balanced_codes`, or the method's default)."""
        if self.balanced_codes is None:
            return self.method == "rqkmeans"
        return self.balanced_codes

    @property
    def max_norm_ratio(self) -> float | None:
        """The norm ratio above which rows are left out of this fit (`fit_max_norm_ratio`, or
        the method's default; None: none are)."""
        if self.fit_max_norm_ratio is None:
            return 10.0 if self.method == "rqvae" else None
        return self.fit_max_norm_ratio

    @field_validator("codebook_sizes")
    @classmethod
    def _positive_sizes(cls, sizes: list[int]) -> list[int]:
        if not sizes or any(s < 2 for s in sizes):
            raise ValueError("codebook_sizes needs at least one level, each with >= 2 codes")
        if len(sizes) > 25:
            raise ValueError("at most 25 levels (one token letter each, plus the suffix)")
        return sizes
