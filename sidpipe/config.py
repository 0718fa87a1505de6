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

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_serializer
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from sidpipe.catalog_config import CatalogConfig, _Section
from sidpipe.errors import ConfigError
from sidpipe.redact import redact_urls
from sidpipe.tokenizer_config import TokenizerConfig


class ModelEndpointConfig(_Section):
    """An OpenAI-compatible model server (vLLM). No URL: the stage is skipped."""

    url: str | None = Field(
        default=None,
        description="Base URL, e.g. http://gpu-host:8000/v1; several replicas comma-separated. "
        "Credentials in it (http://user:password@host) are shown and recorded as ***.",
    )
    model: str = Field(default="", description="Served model name the server must report.")
    revision: str = Field(default="main", description="Model revision (part of the cache key).")
    prompt_version: str = Field(default="v1", description="Built-in prompt version (cache key).")
    api_key: SecretStr | None = Field(
        default=None,
        description="Bearer token; never shown, logged or recorded (JSON shows **********).",
    )
    max_in_flight: int = Field(default=64, ge=1, description="Requests in flight per replica.")
    timeout_seconds: float = Field(default=120.0, gt=0, description="Per request.")
    max_retries: int = Field(default=4, ge=0, description="Retries of 429/5xx/timeouts.")
    temperature: float = Field(default=0.0, ge=0)
    max_tokens: int = Field(default=256, ge=1)
    extra_body: dict[str, Any] = Field(
        default_factory=dict,
        description="Further request parameters the server understands, sent with every "
        'request, e.g. vLLM\'s {"min_tokens": 8}; part of the cache key.',
    )

    @property
    def urls(self) -> list[str]:
        return [u.strip().rstrip("/") for u in (self.url or "").split(",") if u.strip()]

    @field_serializer("url", when_used="json")
    def _url_without_credentials(self, url: str | None) -> str | None:
        # JSON is what leaves the process (manifests, Prefect parameters, `sidpipe config`):
        # a URL's userinfo is a secret there, as api_key is.
        return redact_urls(url) if url else url


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
        default="Alibaba-NLP/gme-Qwen2-VL-2B-Instruct",
        description="Served model with a URL; without one the CPU embedder runs "
        "(all-MiniLM-L6-v2) and this is ignored.",
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
        # Keyword arguments, then SIDPIPE_* variables; `load_config` puts a YAML file below both.
        return init_settings, env_settings


def documented_defaults() -> PipelineConfig:
    """The documented defaults, without this process's SIDPIPE_* environment: a flow's default
    `config`, so a deployment's parameter form shows these, not the deployer's own settings
    (e.g. its store path). `resolve_config` fills in the worker's environment at run time."""
    return PipelineConfig.model_construct()


def resolve_config(config: PipelineConfig, from_deployment: bool = False) -> PipelineConfig:
    """A config as a flow receives it, completed from this process's SIDPIPE_* environment.

    Prefect validates a deployment's (possibly partial) `config` parameter without reading the
    environment, so a worker's SIDPIPE_STORE would be ignored. Fields changed from their
    defaults (also by assignment after construction) win over the environment; so do fields
    the caller set, except `from_deployment`: the UI's Custom run form sends every field, the
    documented defaults included, and those must not hide the worker's own settings.
    """
    chosen = config.model_dump(exclude_defaults=True)
    if not from_deployment:
        chosen = deep_merge(chosen, config.model_dump(exclude_unset=True))
    return load_config(**chosen)


def deep_merge(a: dict, b: dict) -> dict:
    """`b` over `a`, section by section (nested dicts merge, anything else is replaced)."""
    merged = dict(a)
    for key, value in b.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml(path: str | Path) -> dict:
    """A YAML config file as a mapping; a missing file or another shape is a ConfigError."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: a config file is a YAML mapping of settings")
    return values


def invalid(exc: ValueError, where: str) -> ConfigError:
    """A pydantic validation error as one ConfigError: each problem as `field: what is wrong`."""
    errors = getattr(exc, "errors", None)
    if errors is None:
        return ConfigError(f"invalid {where}: {exc}")
    problems = "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in errors()
    )
    return ConfigError(f"invalid {where}: {problems}")


def chosen_settings(path: str | Path | None = None, **overrides: Any) -> dict:
    """What a caller chose (the YAML file, then options), without this machine's SIDPIPE_*
    environment: settings to send to runs on workers, which take the rest from theirs."""
    chosen = {k: v for k, v in overrides.items() if v is not None}
    return deep_merge(read_yaml(path) if path is not None else {}, chosen)


def _env_not_json() -> ConfigError | None:
    """The SIDPIPE_* variable whose setting is a list or mapping but whose value is not JSON."""
    import json
    import os
    import typing

    for name, value in sorted(os.environ.items()):
        section, _, key = name.removeprefix("SIDPIPE_").lower().partition("_")
        if not name.startswith("SIDPIPE_") or section not in PipelineConfig.model_fields:
            continue
        model = PipelineConfig.model_fields[section].annotation
        field = getattr(model, "model_fields", {}).get(key)
        if field is None or typing.get_origin(field.annotation) not in (list, dict):
            continue
        try:
            json.loads(value)
        except ValueError:
            example = "[256, 256, 256]" if typing.get_origin(field.annotation) is list else "{}"
            return ConfigError(
                f"{name}={value!r} is not JSON",
                hint=f"list and mapping settings are JSON in the environment, e.g. "
                f"{name}='{example}'",
            )
    return None


def load_config(path: str | Path | None = None, **overrides: Any) -> PipelineConfig:
    """Build the config from defaults < YAML file < SIDPIPE_* env < keyword overrides."""
    if (problem := _env_not_json()) is not None:
        raise problem
    try:
        env = EnvSettingsSource(PipelineConfig)()
        layers = deep_merge(read_yaml(path) if path is not None else {}, env)
        chosen = {k: v for k, v in overrides.items() if v is not None}
        return PipelineConfig(**deep_merge(layers, chosen))
    except ConfigError:
        raise
    except ValueError as exc:  # pydantic's ValidationError and the env source's own errors
        raise invalid(exc, f"sidpipe config{f' in {path}' if path else ''}") from None
