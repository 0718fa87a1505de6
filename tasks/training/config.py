"""The typed config of a training run, shared by every training flow, and its presets.

    name, store, seed, device, threads
    data:  which published run and interactions, the protocol's history length, a user slice
    model: `kind` (a registered recommender) and that model's own hyperparameters
    loop:  optimiser, schedule, epochs, validation, early stopping, time budget
    eval:  decoding and evaluation knobs

Presets are YAML files shipped in the package (`flows/presets/<flow>/<name>.yaml`); a preset or a
user's file may start from another with `base: <preset>` and name only what it changes (sections
merge key by key). Command-line options win over both.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from sidpipe.config import deep_merge, invalid, read_yaml
from sidpipe.data import BEAUTY_INTERACTIONS
from sidpipe.errors import ConfigError
from sidpipe.models.ctr import CTR_MODELS, CTRConfig, CTRModelName
from sidpipe.models.registry import RECOMMENDERS, ModelConfig


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Section):
    """What to train on: a published run of a catalog plus interactions, cut by the protocol."""

    catalog: str = Field(default="beauty", description="Catalog whose published SIDs to use.")
    run_date: str | None = Field(
        default=None, description="Published run (YYYY-MM-DD); none: the latest."
    )
    interactions: str = Field(
        default=BEAUTY_INTERACTIONS,
        description="Parquet with user_id, item_id, timestamp (local or s3://).",
    )
    max_history: int = Field(default=20, ge=1, description="Most history items per example.")
    users_limit: int | None = Field(default=None, ge=1, description="Use the first N users.")
    cold_item_share: float = Field(
        default=0.0,
        ge=0,
        lt=0.5,
        description=(
            "Share of items (seeded) held out of every training sequence, to measure recall on"
            " cold items: they stay validation and test targets."
        ),
    )
    cold_item_seed: int = Field(default=42, description="Seed of the cold items' draw.")


class LoopConfig(_Section):
    """The training loop: AdamW, warm-up then a schedule, validation and early stopping."""

    batch_size: int = Field(default=256, ge=1)
    learning_rate: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.035, ge=0)
    warmup_steps: int = Field(default=500, ge=1)
    grad_clip: float = Field(default=1.0, gt=0, description="Largest gradient norm.")
    lr_schedule: Literal["cosine", "cosine-budget", "constant"] = Field(
        default="cosine",
        description=(
            "After warm-up: cosine decay to 10% over all epochs; cosine-budget, the same decay"
            " over the time limit's clock; or constant, as the SASRec paper trains."
        ),
    )
    epochs: int = Field(default=100, ge=1, description="Most epochs (early stopping ends sooner).")
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
            " fit, and an epoch longer than the whole budget is cut where it ends."
        ),
    )


class EvalConfig(_Section):
    """Evaluation: full ranking of the test users, and the checks of generative decoding."""

    batch_size: int = Field(default=128, ge=1, description="Users ranked at once.")
    beams: int = Field(default=20, ge=10, description="Beam width (>= the largest K, 10).")
    invalid_users: int = Field(
        default=2000, ge=1, description="Users decoded without the trie to measure invalid SIDs."
    )
    exact_check_users: int = Field(
        default=16, ge=0, description="Users whose beam results are checked against exact scores."
    )


class TrainConfig(_Section):
    """One training run: data, model, loop, evaluation, and where it runs."""

    name: str = "custom"
    store: str = Field(default="./artifacts", description="Store with the published SIDs.")
    data: DataConfig = DataConfig()
    model: ModelConfig = Field(default_factory=lambda: RECOMMENDERS["tiger"].config_class())
    loop: LoopConfig = LoopConfig()
    eval: EvalConfig = EvalConfig()
    seed: int = 42
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(default=None, ge=1, description="CPU threads for torch.")


class CTRDataConfig(DataConfig):
    """A CTR flow's data: DIN's protocol (see `tasks/training/ctr_data.py`)."""

    max_history: int = Field(default=50, ge=1, description="Most clicks of history.")
    negatives: int = Field(default=4, ge=1, description="Sampled non-clicks per click.")
    sample_seed: int = Field(default=42, description="Seed of the negatives (drawn once).")


class CTRLoopConfig(LoopConfig):
    """The loop for click models: bigger batches, a short warm-up, a constant rate, validation
    (AUC) every epoch, stop at the first epoch without improvement."""

    batch_size: int = Field(default=1024, ge=1)
    learning_rate: float = Field(default=2e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_steps: int = Field(default=50, ge=1)
    lr_schedule: Literal["cosine", "cosine-budget", "constant"] = "constant"
    epochs: int = Field(default=3, ge=1, description="Most epochs (early stopping ends sooner).")
    eval_every: int = Field(default=1, ge=1, description="Epochs between validations.")
    patience: int = Field(default=1, ge=1, description="Validations without improvement.")


class AKTRecTrainConfig(_Section):
    """An AKT-Rec comparison: every listed click model, each seed, the same rows and budget."""

    name: str = "custom"
    store: str = Field(default="./artifacts", description="Store with the published SIDs.")
    data: CTRDataConfig = CTRDataConfig()
    model: CTRConfig = CTRConfig()
    loop: CTRLoopConfig = CTRLoopConfig()
    models: list[CTRModelName] = Field(default=list(CTR_MODELS), min_length=1)
    seeds: list[int] = Field(default=[42, 43, 44], min_length=1)
    low_activity_share: float = Field(
        default=0.2, gt=0, lt=1, description="Low-activity users: this share, fewest clicks."
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(default=None, ge=1, description="CPU threads for torch.")


class ComparisonDataConfig(DataConfig):
    """A comparison's data: 5% of the items held out as cold items unless said otherwise."""

    cold_item_share: float = Field(
        default=0.05, ge=0, lt=0.5, description="Share of items held out as cold items."
    )


class ModelLoop(_Section):
    """A compared model's own optimiser settings (unset: the comparison's `loop`). The budget
    (epochs, eval_every, patience, time_limit_minutes, valid_users) is the comparison's."""

    batch_size: int | None = Field(default=None, ge=1)
    learning_rate: float | None = Field(default=None, gt=0)
    weight_decay: float | None = Field(default=None, ge=0)
    warmup_steps: int | None = Field(default=None, ge=1)
    grad_clip: float | None = Field(default=None, gt=0)
    lr_schedule: Literal["cosine", "cosine-budget", "constant"] | None = None


class ComparedModel(_Section):
    model: ModelConfig
    loop: ModelLoop = ModelLoop()


def _asymrec_models() -> dict[str, ComparedModel]:
    asym = RECOMMENDERS["asymrec"].config_class
    return {
        "tiger": ComparedModel(model=RECOMMENDERS["tiger"].config_class()),
        "asymrec": ComparedModel(model=asym()),
        "asymrec-no-msp": ComparedModel(model=asym(experts=1)),
        "asymrec-no-mhq": ComparedModel(model=asym(targets="published")),
        "sasrec": ComparedModel(model=RECOMMENDERS["sasrec"].config_class()),
    }


class AsymRecTrainConfig(_Section):
    """A next-item comparison (the AsymRec flow): every model in `models` on the same data,
    protocol (leave-one-out, full ranking, 5% cold items by default) and budget (`loop`)."""

    name: str = "custom"
    store: str = Field(default="./artifacts", description="Store with the published SIDs.")
    data: ComparisonDataConfig = ComparisonDataConfig()
    loop: LoopConfig = LoopConfig()
    eval: EvalConfig = EvalConfig()
    models: dict[str, ComparedModel] = Field(default_factory=_asymrec_models, min_length=1)
    seed: int = 42
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(default=None, ge=1, description="CPU threads for torch.")

    def model_run(self, label: str) -> TrainConfig:
        """The training config of one compared model: the shared data, budget and evaluation,
        its own model and optimiser settings."""
        compared = self.models[label]
        own = {k: v for k, v in compared.loop.model_dump().items() if v is not None}
        return TrainConfig(
            name=label,
            store=self.store,
            data=self.data,
            model=compared.model,
            loop=self.loop.model_copy(update=own),
            eval=self.eval,
            seed=self.seed,
            device=self.device,
            threads=self.threads,
        )


CONFIGS: dict[str, type[BaseModel]] = {
    "genrec": TrainConfig,
    "aktrec": AKTRecTrainConfig,
    "asymrec": AsymRecTrainConfig,
}


def preset_dir(flow: str) -> Path:
    return Path(str(files("sidpipe.flows").joinpath("presets", flow)))


def presets(flow: str) -> list[str]:
    return sorted(p.stem for p in preset_dir(flow).glob("*.yaml"))


def _layer(under: dict, over: dict) -> dict:
    """`over` merged onto `under`; a `model.kind` other than the one below replaces the whole
    model section (another model starts from its own defaults, not the other one's sizes)."""
    kind = over.get("model", {}).get("kind")
    if kind and kind != under.get("model", {}).get("kind", "tiger"):
        under = {**under, "model": {}}
    return deep_merge(under, over)


def _resolve(values: dict, flow: str, where: str, seen: tuple[str, ...] = ()) -> dict:
    """Values with their `base:` preset chain merged underneath."""
    base = values.pop("base", None)
    if base is None:
        return values
    if base not in presets(flow) or base in seen:
        known = ", ".join(presets(flow))
        raise ConfigError(f"{where}: unknown or circular base preset {base!r} (presets: {known})")
    parent = yaml.safe_load((preset_dir(flow) / f"{base}.yaml").read_text()) or {}
    return _layer(_resolve(parent, flow, base, (*seen, base)), values)


def load_train_config(name_or_path: str, flow: str = "genrec", **overrides: Any):
    """A preset by name, or a YAML file, with overrides: a nested mapping like the file's
    (None values are ignored). A layer naming another `model.kind` than the one below replaces
    the model section."""
    if name_or_path in presets(flow):
        values = yaml.safe_load((preset_dir(flow) / f"{name_or_path}.yaml").read_text()) or {}
        values.setdefault("name", name_or_path)
    elif Path(name_or_path).is_file():
        values = read_yaml(name_or_path)
        values.setdefault("name", Path(name_or_path).stem)
    else:
        raise ConfigError(
            f"unknown training config {name_or_path!r}",
            hint=f"a preset ({', '.join(presets(flow))}) or a YAML file",
        )
    values = _layer(_resolve(values, flow, name_or_path), _without_none(overrides))
    try:
        return CONFIGS[flow](**values)
    except ValueError as exc:
        raise invalid(exc, f"training config {name_or_path!r}") from None


def _without_none(values: dict) -> dict:
    cleaned = {}
    for key, value in values.items():
        if isinstance(value, dict):
            value = _without_none(value)
            if not value:
                continue
        if value is not None:
            cleaned[key] = value
    return cleaned
