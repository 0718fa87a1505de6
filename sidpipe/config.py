"""The one typed configuration of a sidpipe run.

`PipelineConfig` is loaded from (highest priority first) explicit keyword arguments, `SIDPIPE_*`
environment variables, an optional YAML file, and the defaults below. The same model is the
Prefect flow's parameter, so the Prefect UI renders it as a form.

Environment names: `SIDPIPE_<FIELD>` for top-level fields (`SIDPIPE_STORE`) and
`SIDPIPE_<SECTION>_<FIELD>` for a section's field (`SIDPIPE_CAPTION_URL`,
`SIDPIPE_TOKENIZER_SEED`, `SIDPIPE_TOKENIZER_CODEBOOK_SIZES='[256,256,256]'`).

This module must never import Prefect, torch or any model code: everything imports it.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
# The bundled sample: 1,000 real fashion products (MIT, see data/fashion-sample/SOURCE.md).
SAMPLE_CATALOG = REPO_ROOT / "data" / "fashion-sample" / "catalog.csv"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CatalogConfig(_Section):
    """Where the items come from and how their rows are read."""

    uri: str = Field(
        default=str(SAMPLE_CATALOG),
        description="Catalog file: Parquet, JSONL or CSV; a local path or s3:// URI.",
    )
    name: str = Field(
        default="fashion-sample",
        pattern=r"^[a-z0-9][a-z0-9._-]*$",
        description="Catalog name used in artifact paths (lowercase, digits, . _ -).",
    )
    allow_http_images: bool = Field(
        default=False,
        description="Accept http(s):// image references (off: offline-first).",
    )
    check_images: bool = Field(
        default=True,
        description="Quarantine rows whose image reference does not resolve to a non-empty file.",
    )


class ModelEndpointConfig(_Section):
    """An OpenAI-compatible model server (vLLM). No URL: the stage is skipped."""

    url: str | None = Field(
        default=None,
        description="Base URL, e.g. http://gpu-host:8000/v1; several replicas comma-separated.",
    )
    model: str = Field(default="", description="Served model name the server must report.")
    revision: str = Field(default="main", description="Model revision (part of the cache key).")
    prompt_version: str = Field(default="v1", description="Built-in prompt version (cache key).")
    api_key: SecretStr | None = None
    max_in_flight: int = Field(default=64, ge=1, description="Requests in flight per replica.")
    timeout_seconds: float = Field(default=120.0, gt=0, description="Per request.")
    max_retries: int = Field(default=4, ge=0, description="Retries of 429/5xx/timeouts.")
    temperature: float = Field(default=0.0, ge=0)
    max_tokens: int = Field(default=256, ge=1)

    @property
    def urls(self) -> list[str]:
        return [u.strip().rstrip("/") for u in (self.url or "").split(",") if u.strip()]


class CaptionConfig(ModelEndpointConfig):
    """CMSA: a VLM writes a concise, attribute-rich description of each item image."""

    model: str = "Qwen/Qwen2.5-VL-7B-Instruct"
    max_pixels: int = Field(
        default=1003520, ge=784, description="Pixel budget per image (28x28 px = 1 visual token)."
    )
    max_image_bytes: int = Field(default=20_000_000, ge=1, description="Larger images fail.")
    image_transport: Literal["data_url", "file_url"] = Field(
        default="data_url",
        description="data_url: base64 in the request; file_url: file:// paths for servers "
        "started with --allowed-local-media-path that see the same files.",
    )


class InterestsConfig(ModelEndpointConfig):
    """MDIM: an LLM reasons step by step and returns 2-4 deep-interest tags as JSON."""

    model: str = "Qwen/Qwen2.5-7B-Instruct"
    max_tokens: int = 768
    structured_output: Literal["response_format", "structured_outputs"] = Field(
        default="response_format",
        description="OpenAI-standard response_format json_schema, or vLLM's structured_outputs.",
    )


class EmbedConfig(ModelEndpointConfig):
    """Embedding stage. Without a URL the CPU text embedder shipped in a PyPI package is used."""

    model: str = Field(
        default="",
        description="Served model with a URL (default Alibaba-NLP/gme-Qwen2-VL-2B-Instruct); "
        "ignored without one (all-MiniLM-L6-v2).",
    )
    batch_size: int = Field(default=128, ge=1)
    text_template_version: str = Field(
        default="v1", description="Bump when the way item text is assembled changes."
    )
    instruction: str = Field(
        default="You are a helpful assistant.",
        description="GME system instruction (GME's default).",
    )
    max_pixels: int = Field(default=1003520, ge=784)
    max_image_bytes: int = Field(default=20_000_000, ge=1)


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
        description="suffix: TIGER's extra token; reassign: move colliding new items to the "
        "nearest free code of the last level first (suffix only if none is free).",
    )
    min_level1_utilization: float = Field(
        default=0.5, ge=0, le=1, description="Quality gate: a fit using fewer level-1 codes fails."
    )
    min_distinct_tuple_rate: float = Field(
        default=0.0, ge=0, le=1, description="Quality gate on distinct code tuples per item."
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
    kmeans_iterations: int = Field(default=25, ge=1)
    refine_rounds: int = Field(
        default=3, ge=0, description="RQ-KMeans: coordinate-descent rounds after k-means."
    )
    seed: int = 42

    @field_validator("codebook_sizes")
    @classmethod
    def _positive_sizes(cls, sizes: list[int]) -> list[int]:
        if not sizes or any(s < 2 for s in sizes):
            raise ValueError("codebook_sizes needs at least one level, each with >= 2 codes")
        if len(sizes) > 25:
            raise ValueError("at most 25 levels (one token letter each, plus the suffix)")
        return sizes


class OrchestrationConfig(_Section):
    """How a run is spread over workers, guarded and resumed (none of it changes a result)."""

    shard_size: int = Field(
        default=50_000,
        ge=1,
        description="Items per shard: caption, interests and embed map over shards; a finished "
        "shard is never recomputed when a killed run is resumed.",
    )
    task_runner: Literal["thread", "process", "dask", "ray"] = Field(
        default="thread",
        description="thread/process: one box; dask/ray: a cluster (needs the dask or ray extra).",
    )
    max_workers: int | None = Field(
        default=None, ge=1, description="Shards at once on one box (thread/process runners)."
    )
    cluster_address: str | None = Field(
        default=None,
        description="Dask scheduler (tcp://host:8786) or Ray address; none: a local cluster.",
    )
    concurrency_limits: bool = Field(
        default=False,
        description="Hold a slot of the Prefect global concurrency limit sidpipe-<stage> for each "
        "model-served shard (strict: the limit must exist; `sidpipe bootstrap` creates them).",
    )
    lock_ttl_seconds: float = Field(
        default=300.0,
        gt=0,
        description="Object-store lock lease; renewed while the run lives, taken over after it "
        "lapses (a killed run). Local stores use an OS lock, released on exit.",
    )
    lock_wait_seconds: float = Field(
        default=0.0, ge=0, description="Wait this long for another run of the catalog to finish."
    )
    resume: bool = Field(
        default=True,
        description="Continue an unfinished run of the same catalog, date and settings instead "
        "of starting over (finished shards are kept).",
    )
    timezone: str = Field(
        default="UTC",
        description="Time zone of the schedule: a scheduled run's run_date is its start date there.",
    )


class PipelineConfig(BaseSettings):
    """Everything a tokenization run needs. Defaults run the bundled sample on CPU, offline."""

    model_config = SettingsConfigDict(
        env_prefix="SIDPIPE_",
        env_nested_delimiter="_",
        env_nested_max_split=1,
        extra="forbid",
    )

    store: str = Field(
        default="./artifacts",
        description="Artifact store root: a local folder or s3://bucket/prefix.",
    )
    catalog: CatalogConfig = CatalogConfig()
    caption: CaptionConfig = CaptionConfig()
    interests: InterestsConfig = InterestsConfig()
    embed: EmbedConfig = EmbedConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    orchestration: OrchestrationConfig = OrchestrationConfig()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The YAML file (if any) sits below the environment: env overrides YAML.
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if _yaml_path is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=_yaml_path))
        return tuple(sources)


# Set only for the duration of `load_config` (under the lock); pydantic-settings reads its
# sources at construction time.
_yaml_path: Path | None = None
_yaml_lock = threading.Lock()


class ConfigError(ValueError):
    """A configuration file or value that cannot be used."""


def resolve_config(config: PipelineConfig) -> PipelineConfig:
    """A config as a flow receives it, completed from this process's SIDPIPE_* environment.

    Prefect validates a deployment's (possibly partial) `config` parameter without reading the
    environment, so a worker's SIDPIPE_STORE would be ignored. Fields the caller set, or changed
    from their defaults (also by assignment after construction), win over the environment.
    """
    return load_config(
        **deep_merge(
            config.model_dump(exclude_defaults=True), config.model_dump(exclude_unset=True)
        )
    )


def deep_merge(a: dict, b: dict) -> dict:
    merged = dict(a)
    for key, value in b.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(path: str | Path | None = None, **overrides: Any) -> PipelineConfig:
    """Build the config from defaults < YAML file < SIDPIPE_* env < keyword overrides."""
    global _yaml_path
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
    with _yaml_lock:
        _yaml_path = path
        try:
            return PipelineConfig(**{k: v for k, v in overrides.items() if v is not None})
        except ValueError as exc:  # pydantic ValidationError is a ValueError
            where = f" in {path}" if path else ""
            raise ConfigError(f"invalid sidpipe config{where}:\n{exc}") from exc
        finally:
            _yaml_path = None


# -- training flows ------------------------------------------------------------------------------
BEAUTY_DIR = REPO_ROOT / "data" / "amazon-beauty-2014"


class GenRecTrainConfig(BaseModel):
    """One training run of the generative recommender (or the SASRec baseline) on published SIDs.

    Presets: `TRAIN_PRESETS` (`sidpipe train genrec --config cpu-small`); any field can be
    overridden. Reads only what the tokenization flow published plus the interactions."""

    model_config = ConfigDict(extra="forbid")

    name: str = "custom"
    store: str = Field(default="./artifacts", description="Store with the published SIDs.")
    catalog: str = Field(default="beauty", description="Catalog whose published SIDs to use.")
    run_date: str | None = Field(
        default=None, description="Published run (YYYY-MM-DD); none: the latest."
    )
    interactions: str = Field(
        default=str(BEAUTY_DIR / "interactions.parquet"),
        description="Parquet with user_id, item_id, timestamp (local or s3://).",
    )
    model: Literal["tiger", "sasrec"] = "tiger"
    tasks: list[str] = Field(
        default=["next_sid"],
        description="Generation tasks sampled uniformly (models.genrec.TASKS); 'all' = every "
        "task the published artifacts can feed.",
    )
    max_history: int = Field(default=20, ge=1)
    users_limit: int | None = Field(default=None, ge=1, description="Use the first N users.")
    # model size (TIGER's defaults; SASRec uses d_model, heads, encoder_layers, dropout)
    d_model: int = 128
    heads: int = 6
    head_dim: int = 64
    encoder_layers: int = 4
    decoder_layers: int = 4
    feedforward: int = 1024
    dropout: float = Field(default=0.1, ge=0, lt=1)
    # optimisation
    batch_size: int = 256
    learning_rate: float = 1e-3
    weight_decay: float = 0.035
    warmup_steps: int = 500
    lr_schedule: Literal["cosine", "cosine-budget", "constant"] = Field(
        default="cosine",
        description=(
            "After warm-up: cosine decay to 10% over all epochs; cosine-budget, the same decay"
            " over the time limit's clock; or constant, as the SASRec paper trains."
        ),
    )
    epochs: int = 100
    eval_every: int = Field(default=5, ge=1, description="Epochs between validations.")
    patience: int = Field(default=4, ge=1, description="Validations without improvement.")
    valid_users: int | None = Field(
        default=None, ge=1, description="Validate on this many users (all: None)."
    )
    time_limit_minutes: float | None = Field(
        default=None,
        gt=0,
        description=(
            "Wall-clock budget: training stops (validating there) when another epoch would not"
            " fit; with lr_schedule cosine-budget the learning rate decays with the clock."
        ),
    )
    # decoding and evaluation
    beams: int = Field(default=20, ge=10, description="Beam width (>= the largest K, 10).")
    eval_batch_size: int = 128
    invalid_users: int = Field(
        default=2000, ge=1, description="Users decoded without the trie to measure invalid SIDs."
    )
    exact_check_users: int = Field(
        default=16, ge=0, description="Users whose beam results are checked against exact scores."
    )
    text_max_tokens: int = 24
    history_titles: int = 5
    seed: int = 42
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(default=None, ge=1, description="CPU threads for torch.")


TRAIN_PRESETS: dict[str, dict] = {
    # CI: a slice of Beauty, a small model, minutes on 2 CPU cores.
    "cpu-small": {
        "users_limit": 1500,
        "d_model": 64,
        "heads": 4,
        "head_dim": 16,
        "encoder_layers": 2,
        "decoder_layers": 2,
        "feedforward": 256,
        "batch_size": 128,
        "epochs": 6,
        "eval_every": 3,
        "warmup_steps": 50,
        "invalid_users": 200,
        "exact_check_users": 8,
    },
    # Beauty on CPU: TIGER's full model costs 4.8 s a step on 2 cores (41 min an epoch), so a
    # smaller one (420k parameters, ~5 min an epoch there); validation on 2,000 users.
    "beauty-cpu": {
        "d_model": 64,
        "heads": 4,
        "head_dim": 16,
        "encoder_layers": 2,
        "decoder_layers": 2,
        "feedforward": 256,
        "learning_rate": 2e-3,
        "epochs": 60,
        "eval_every": 3,
        "valid_users": 2000,
        "patience": 3,
    },
    # Beauty on a GPU (bf16 autocast): TIGER's model, full validation.
    "beauty": {"epochs": 200, "eval_every": 5, "batch_size": 256, "device": "cuda"},
    # TriAlignGR's multitask training over every task the artifacts can feed.
    "beauty-multitask": {"tasks": ["all"], "epochs": 200, "eval_every": 5, "device": "cuda"},
    # The SASRec baseline (CE loss) in the same harness.
    "sasrec-beauty": {
        "model": "sasrec",
        "lr_schedule": "constant",
        "d_model": 64,
        "heads": 2,
        "encoder_layers": 2,
        "dropout": 0.3,
        "batch_size": 256,
        "learning_rate": 1e-3,
        "weight_decay": 0.0,
        "epochs": 200,
        "eval_every": 5,
        "patience": 5,
    },
}

# TriAlignGR's multitask mode with beauty-cpu's model: an epoch holds one batch of every task
# for each next-SID batch (5 tasks on Beauty without captions: 5x beauty-cpu's steps, measured
# 11x its time on one CPU thread), so it validates every epoch.
TRAIN_PRESETS["beauty-multitask-cpu"] = TRAIN_PRESETS["beauty-cpu"] | {
    "tasks": ["all"],
    "epochs": 12,
    "eval_every": 1,
}


def train_config(name_or_path: str, **overrides: Any) -> GenRecTrainConfig:
    """A preset by name, or a YAML file, with overrides (None values are ignored).

    A YAML file may start from a preset with `base: <preset>` and change only some fields.
    """
    import yaml

    if name_or_path in TRAIN_PRESETS:
        values = {"name": name_or_path, **TRAIN_PRESETS[name_or_path]}
    elif Path(name_or_path).is_file():
        values = yaml.safe_load(Path(name_or_path).read_text()) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{name_or_path}: a training config is a YAML mapping")
        base = values.pop("base", None)
        if base is not None:
            if base not in TRAIN_PRESETS:
                raise ConfigError(
                    f"{name_or_path}: unknown base preset {base!r} ({', '.join(TRAIN_PRESETS)})"
                )
            values = TRAIN_PRESETS[base] | values
        values.setdefault("name", Path(name_or_path).stem)
    else:
        raise ConfigError(
            f"unknown training config {name_or_path!r}: a preset "
            f"({', '.join(TRAIN_PRESETS)}) or a YAML file"
        )
    try:
        return GenRecTrainConfig(**(values | {k: v for k, v in overrides.items() if v is not None}))
    except ValueError as exc:
        raise ConfigError(f"invalid training config {name_or_path!r}:\n{exc}") from exc
