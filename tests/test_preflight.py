"""Checks before a run: seconds, no Prefect, nothing written; each problem one SidpipeError."""

from datetime import UTC, datetime

import pytest
from conftest import small_config

from sidpipe.errors import CatalogError, CatalogTooSmallError, ConfigError, EndpointUnavailableError
from sidpipe.storage.registry import TokenizerVersion, register
from sidpipe.storage.store import ArtifactStore
from sidpipe.tasks.preflight import preflight

ROWS = "".join(f"i{i},title {i}\n" for i in range(20))


def config_for(tmp_path, text: str, name: str = "items.csv", **settings):
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8"))
    return small_config(str(tmp_path / "store"), str(path), **settings)


def test_a_good_catalog_passes_and_nothing_is_written(tmp_path):
    preflight(config_for(tmp_path, "item_id,title\n" + ROWS))
    assert not (tmp_path / "store").exists()


def test_an_excel_csv_with_a_byte_order_mark_passes(tmp_path):
    preflight(config_for(tmp_path, "\ufeffitem_id,title\n" + ROWS))


def test_a_missing_file_and_a_missing_item_id_column_are_named(tmp_path):
    config = small_config(str(tmp_path / "store"), str(tmp_path / "nope.jsonl"))
    with pytest.raises(CatalogError, match="nope.jsonl: catalog file not found"):
        preflight(config)
    with pytest.raises(CatalogError, match="no 'item_id' column"):
        preflight(config_for(tmp_path, "sku,title\n" + ROWS))


def test_jsonl_rows_are_left_to_ingest_to_judge_one_by_one(tmp_path):
    """A JSONL file declares no columns: a first row without item_id is quarantined by ingest,
    not a reason to refuse the file."""
    rows = ['{"sku": 1}'] + [f'{{"item_id": "i{i}", "title": "t"}}' for i in range(20)]
    preflight(config_for(tmp_path, "\n".join(rows) + "\n", name="items.jsonl"))


def test_too_few_rows_for_a_first_fit_names_the_minimum_and_the_setting(tmp_path):
    config = config_for(tmp_path, "item_id,title\n" + ROWS[:40], min_points_per_code=4)
    with pytest.raises(
        CatalogTooSmallError, match="4 rows, but fitting a tokenizer needs at least 8"
    ):
        preflight(config)


def test_a_small_catalog_is_fine_when_the_pinned_tokenizer_encodes_it(tmp_path):
    config = config_for(tmp_path, "item_id,title\n" + ROWS[:40], min_points_per_code=4)
    version = TokenizerVersion(
        tokenizer_id="t1",
        method="rqvae",
        created_at=datetime.now(UTC),
        embed_key="e",
        items=100,
        codebook_sizes=[8, 8, 8],
    )
    register(ArtifactStore(config.store), config.catalog.store_name, version, pin=True)
    preflight(config)  # no fit: nothing to size
    refit = config.model_copy(
        update={"tokenizer": config.tokenizer.model_copy(update={"refit": True})}
    )
    with pytest.raises(CatalogTooSmallError):
        preflight(refit)


def test_an_unknown_prompt_version_and_a_dead_server_are_caught_first(tmp_path):
    config = config_for(tmp_path, "item_id,title\n" + ROWS)
    caption = config.caption.model_copy(
        update={"url": "http://127.0.0.1:9/v1", "prompt_version": "v9"}
    )
    with pytest.raises(ConfigError, match="caption.prompt_version 'v9' is unknown"):
        preflight(config.model_copy(update={"caption": caption}))
    dead = config.model_copy(
        update={"caption": caption.model_copy(update={"prompt_version": "v1"})}
    )
    preflight(dead)  # the flow's own check: servers are contacted only by stages with work
    with pytest.raises(EndpointUnavailableError, match="127.0.0.1:9/v1: unreachable"):
        preflight(dead, servers=True)  # `sidpipe run`'s check, before it starts
