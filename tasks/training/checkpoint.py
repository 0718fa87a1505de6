"""Checkpoints that carry their own config, so any run can be evaluated again without its preset.

`<store>/training/<flow>/<run_id>/`:
    model.safetensors   the weights
    config.json         the whole training config (data, model with its `kind`, loop, eval),
                        the published run it trained on, what the model recorded about itself
    history.json        the learning curve

`load_checkpoint` reads config.json, loads the same published run and interactions, rebuilds
the model by its `kind` from the registry and loads the weights.
"""

from __future__ import annotations

import uuid

from sidpipe.errors import PublishedRunNotFound
from sidpipe.models.recommender import Recommender
from sidpipe.models.registry import recommender_class
from sidpipe.storage.layout import CHECKPOINT_CONFIG, CHECKPOINT_WEIGHTS, HISTORY_FILE
from sidpipe.storage.manifest import utcnow
from sidpipe.storage.store import ArtifactStore
from sidpipe.tasks.training.config import TrainConfig
from sidpipe.tasks.training.data import TrainingData, load_training_data
from sidpipe.tasks.training.loop import count_parameters


def new_run_id(config: TrainConfig) -> str:
    """Time first, so runs list in order; the random part keeps two runs in one second apart."""
    return f"{utcnow():%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}-{config.name}-{config.model.kind}"


def build(config: TrainConfig, training: TrainingData) -> Recommender:
    """The configured model for this data, with fresh weights."""
    cls = recommender_class(config.model.kind)
    return cls.build(config.model, training.data, config.data.max_history)


def save_checkpoint(
    store: ArtifactStore,
    where: tuple[str, ...],
    config: TrainConfig,
    training: TrainingData,
    rec: Recommender,
    history: list[dict],
) -> None:
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in rec.module.state_dict().items()}
    store.write_bytes(save(state), *where, CHECKPOINT_WEIGHTS)
    store.write_json(history, *where, HISTORY_FILE)
    store.write_json(
        {
            "train": config.model_dump(mode="json"),
            "published": training.published,
            "model_summary": rec.summary(),
            "parameters": count_parameters(rec.module),
        },
        *where,
        CHECKPOINT_CONFIG,
    )


# Checkpoints written before training configs had sections kept every setting in one mapping.
_FLAT = {
    "data": ("catalog", "run_date", "interactions", "max_history", "users_limit"),
    "loop": (
        "batch_size",
        "learning_rate",
        "weight_decay",
        "warmup_steps",
        "lr_schedule",
        "epochs",
        "eval_every",
        "patience",
        "valid_users",
        "time_limit_minutes",
    ),
    "eval": ("beams", "eval_batch_size", "invalid_users", "exact_check_users"),
}
_FLAT_MODEL = {
    "tiger": ("tasks", "d_model", "heads", "head_dim", "encoder_layers", "decoder_layers")
    + ("feedforward", "dropout", "text_max_tokens", "history_titles"),
    "sasrec": ("d_model", "heads", "encoder_layers", "dropout"),
}


def upgrade(train: dict) -> dict:
    """A checkpoint's training config in today's layout (older ones were one flat mapping; an
    AsymRec saved before `item_residual` existed is the paper's form, without one)."""
    if isinstance(train.get("model"), dict):
        model = train["model"]
        if model.get("kind") == "asymrec" and "item_residual" not in model:
            return {**train, "model": {**model, "item_residual": False}}
        return train
    kind = train.get("model", "tiger")
    nested = {k: train[k] for k in ("name", "store", "seed", "device", "threads") if k in train}
    for section, keys in _FLAT.items():
        nested[section] = {k: train[k] for k in keys if k in train}
    if "eval_batch_size" in nested["eval"]:
        nested["eval"]["batch_size"] = nested["eval"].pop("eval_batch_size")
    model = {k: train[k] for k in _FLAT_MODEL[kind] if k in train}
    if kind == "sasrec" and "encoder_layers" in model:
        model["layers"] = model.pop("encoder_layers")
    nested["model"] = {"kind": kind, **model}
    return nested


def load_checkpoint(
    store: ArtifactStore, where: tuple[str, ...], device
) -> tuple[TrainConfig, TrainingData, Recommender]:
    """The config, data (the same published run) and model saved in `where` (a training
    run's folder, `storage.layout.training_dir`), on `device`."""
    from safetensors.torch import load

    try:
        saved = store.read_json(*where, CHECKPOINT_CONFIG)
    except FileNotFoundError:
        raise PublishedRunNotFound(
            f"no checkpoint {store.uri(*where)}",
            hint=f"training runs are folders under {store.uri(*where[:2])}",
        ) from None
    config = TrainConfig.model_validate(upgrade(saved["train"]))
    published = saved["published"]
    data_config = config.data.model_copy(update={"run_date": published["run_date"]})
    training = load_training_data(store, data_config)
    if training.published != published:
        raise PublishedRunNotFound(
            f"checkpoint {'/'.join(where[2:])} was trained on {published}, the store now has "
            f"{training.published} for that date"
        )
    rec = build(config, training)
    rec.module.load_state_dict(load(store.read_bytes(*where, CHECKPOINT_WEIGHTS)))
    rec.module.to(device)
    return config, training, rec
