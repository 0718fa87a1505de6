"""Config: defaults < YAML < SIDPIPE_* environment < explicit values."""

import pytest

from sidpipe.config import SAMPLE_CATALOG, ConfigError, PipelineConfig, load_config


def test_defaults_run_the_bundled_sample_offline():
    config = load_config()
    assert config.store == "./artifacts"
    assert config.catalog.uri == str(SAMPLE_CATALOG)
    assert SAMPLE_CATALOG.is_file()
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
    from sidpipe.config import TRAIN_PRESETS, train_config

    path = tmp_path / "toys-cpu.yaml"
    path.write_text("base: beauty-cpu\ncatalog: toys\nthreads: 1\n")
    config = train_config(str(path), epochs=9)
    assert config.name == "toys-cpu" and config.catalog == "toys" and config.threads == 1
    assert config.epochs == 9  # the command line still wins
    assert config.d_model == TRAIN_PRESETS["beauty-cpu"]["d_model"] != 128
    assert train_config("beauty-multitask-cpu").tasks == ["all"]

    path.write_text("base: no-such-preset\n")
    with pytest.raises(ConfigError, match="unknown base preset 'no-such-preset'"):
        train_config(str(path))
