"""Config: defaults < YAML < SIDPIPE_* environment < explicit values."""

from pathlib import Path

import pytest

from sidpipe.config import PipelineConfig, load_config
from sidpipe.data import SAMPLE_CATALOG
from sidpipe.errors import ConfigError


def test_defaults_run_the_bundled_sample_offline():
    config = load_config()
    assert config.store == "./artifacts"
    assert config.catalog.uri == SAMPLE_CATALOG
    assert Path(SAMPLE_CATALOG).is_file()
    assert config.caption.url is None and config.interests.url is None and config.embed.url is None
    assert config.tokenizer.codebook_sizes == [4096, 2048, 1024]


def test_yaml_is_overridden_by_environment(tmp_path, monkeypatch):
    path = tmp_path / "sidpipe.yaml"
    path.write_text(
        "store: /from/yaml\ncaption:\n  url: http://yaml:8000/v1\n"
        "tokenizer:\n  seed: 3\n  codebook_sizes: [16, 16]\n"
    )
    monkeypatch.setenv("SIDPIPE_CAPTION_URL", "http://env:8000/v1")
    monkeypatch.setenv("SIDPIPE_TOKENIZER_SEED", "7")
    config = load_config(path)
    assert config.store == "/from/yaml"
    assert config.caption.url == "http://env:8000/v1"
    assert config.tokenizer.seed == 7
    assert config.tokenizer.codebook_sizes == [16, 16]


def test_environment_names_from_the_issue(monkeypatch):
    monkeypatch.setenv("SIDPIPE_STORE", "s3://bucket/prefix")
    monkeypatch.setenv("SIDPIPE_INTERESTS_URL", "http://llm:8000/v1")
    monkeypatch.setenv("SIDPIPE_EMBED_URL", "http://gme:8000/v1")
    monkeypatch.setenv("SIDPIPE_TOKENIZER_CODEBOOK_SIZES", "[256,256,256]")
    config = load_config()
    assert config.store == "s3://bucket/prefix"
    assert config.interests.url == "http://llm:8000/v1"
    assert config.embed.url == "http://gme:8000/v1"
    assert config.tokenizer.codebook_sizes == [256, 256, 256]


def test_explicit_values_win_over_environment(monkeypatch):
    monkeypatch.setenv("SIDPIPE_STORE", "/from/env")
    assert load_config(store="/explicit").store == "/explicit"


def test_invalid_yaml_value_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("tokenizer:\n  codebook_sizes: [1]\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml[\s\S]*codebook_sizes"):
        load_config(path)


def test_unknown_key_is_an_error_not_ignored(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("tokeniser:\n  seed: 1\n")
    with pytest.raises(ConfigError, match="tokeniser"):
        load_config(path)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("/no/such/sidpipe.yaml")


def test_config_is_a_prefect_form_friendly_schema():
    schema = PipelineConfig.model_json_schema()
    assert {"store", "catalog", "caption", "interests", "embed", "tokenizer"} <= set(
        schema["properties"]
    )


def test_a_training_yaml_starts_from_a_preset_and_changes_only_what_it_names(tmp_path):
    from sidpipe.tasks.training.config import load_train_config

    path = tmp_path / "toys-cpu.yaml"
    path.write_text("base: beauty-cpu\ndata: {catalog: toys}\nthreads: 1\n")
    config = load_train_config(str(path), loop={"epochs": 9})
    assert config.name == "toys-cpu" and config.data.catalog == "toys" and config.threads == 1
    assert config.loop.epochs == 9  # the command line still wins
    assert config.loop.valid_users == 2000  # the rest of beauty-cpu's loop section is kept
    assert config.model.d_model == 64 != type(config.model)().d_model
    assert load_train_config("beauty-multitask-cpu").model.tasks == ["all"]

    path.write_text("base: no-such-preset\n")
    with pytest.raises(ConfigError, match="unknown or circular base preset 'no-such-preset'"):
        load_train_config(str(path))


def test_every_training_preset_is_a_valid_config():
    from sidpipe.tasks.training.config import load_train_config, presets

    names = presets("genrec")
    assert {"cpu-small", "beauty-cpu", "beauty", "sasrec-beauty"} <= set(names)
    for name in names:
        assert load_train_config(name).name == name
    for flow in ("aktrec", "asymrec"):
        for name in presets(flow):
            assert load_train_config(name, flow).name == name
    comparison = load_train_config("asymrec-beauty-cpu", "asymrec")
    assert comparison.data.cold_item_share == 0.05  # the comparison's default
    assert set(comparison.models) == {
        "tiger",
        "asymrec",
        "asymrec-no-msp",
        "asymrec-no-mhq",
        "sasrec",
    }
    sasrec = comparison.model_run("sasrec")
    assert sasrec.loop.lr_schedule == "constant"  # its own optimiser settings
    assert sasrec.loop.time_limit_minutes == comparison.loop.time_limit_minutes  # shared budget


def test_another_model_on_the_command_line_starts_from_its_own_defaults():
    from sidpipe.tasks.training.config import load_train_config

    config = load_train_config("cpu-small", model={"kind": "sasrec"})
    assert config.model.kind == "sasrec" and config.model == type(config.model)()
    assert config.loop.epochs == 6  # the preset's other sections stay


def test_a_wrong_training_value_names_the_field(tmp_path):
    from sidpipe.tasks.training.config import load_train_config

    with pytest.raises(ConfigError, match=r"loop\.epochs"):
        load_train_config("cpu-small", loop={"epochs": 0})
    with pytest.raises(ConfigError, match="unknown tasks"):
        load_train_config("cpu-small", model={"tasks": ["next_sid", "haiku"]})


def test_the_yaml_file_is_read_per_call_not_through_shared_state(tmp_path):
    """Two configs loaded at once from different files do not see each other's values."""
    from concurrent.futures import ThreadPoolExecutor

    files = []
    for i in range(8):
        path = tmp_path / f"c{i}.yaml"
        path.write_text(f"store: /stores/{i}\n")
        files.append(path)
    with ThreadPoolExecutor(8) as pool:
        stores = list(pool.map(lambda f: load_config(f).store, files * 4))
    assert stores == [f"/stores/{i}" for i in range(8)] * 4


def test_a_checkpoint_saved_before_config_sections_still_loads_its_config():
    """config.json of a run trained before training configs had sections (a flat mapping):
    evaluating it again rebuilds the same model and protocol."""
    from sidpipe.tasks.training.checkpoint import upgrade
    from sidpipe.tasks.training.config import TrainConfig

    flat = {
        "name": "slice-sasrec",
        "store": "/s",
        "catalog": "beauty-slice",
        "run_date": None,
        "interactions": "/i.parquet",
        "model": "sasrec",
        "tasks": ["next_sid"],
        "max_history": 20,
        "users_limit": None,
        "d_model": 64,
        "heads": 2,
        "head_dim": 64,
        "encoder_layers": 2,
        "decoder_layers": 4,
        "feedforward": 1024,
        "dropout": 0.3,
        "batch_size": 256,
        "learning_rate": 0.001,
        "weight_decay": 0.0,
        "warmup_steps": 500,
        "lr_schedule": "constant",
        "epochs": 3,
        "eval_every": 1,
        "patience": 5,
        "valid_users": None,
        "time_limit_minutes": None,
        "beams": 20,
        "eval_batch_size": 64,
        "invalid_users": 2000,
        "exact_check_users": 16,
        "text_max_tokens": 24,
        "history_titles": 5,
        "seed": 42,
        "device": "auto",
        "threads": None,
    }
    config = TrainConfig.model_validate(upgrade(flat))
    assert config.model.kind == "sasrec" and (config.model.layers, config.model.heads) == (2, 2)
    assert config.data.catalog == "beauty-slice" and config.loop.eval_every == 1
    assert config.eval.batch_size == 64 and config.loop.lr_schedule == "constant"
    tiger = TrainConfig.model_validate(upgrade(flat | {"model": "tiger", "tasks": ["all"]}))
    assert tiger.model.tasks == ["all"] and tiger.model.decoder_layers == 4
    assert upgrade(config.model_dump()) == config.model_dump()  # today's layout passes as is
    asym = config.model_dump() | {"model": {"kind": "asymrec", "experts": 4}}
    assert upgrade(asym)["model"]["item_residual"] is False  # saved before the residual
    asym = TrainConfig.model_validate(asym).model_dump()
    assert asym["model"]["item_residual"] is True and upgrade(asym) == asym


def test_a_deployments_form_defaults_yield_to_the_workers_environment(monkeypatch):
    """The UI's Custom run sends every field of `config`, defaults included."""
    from sidpipe.config import documented_defaults, resolve_config

    monkeypatch.setenv("SIDPIPE_STORE", "/worker/store")
    form = documented_defaults().model_dump(mode="json")
    sent = PipelineConfig.model_validate(form)  # every field set, as Prefect validates it
    assert resolve_config(sent, from_deployment=True).store == "/worker/store"
    assert resolve_config(sent).store == "./artifacts"  # a caller's explicit value wins
    changed = PipelineConfig.model_validate(form | {"store": "/chosen"})
    assert resolve_config(changed, from_deployment=True).store == "/chosen"
