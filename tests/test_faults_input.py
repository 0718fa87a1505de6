"""Fault matrix, part 3: the input misbehaves. A catalog under another catalog's name, values of
the wrong type, a hostile catalog, a catalog too small once its bad rows are out: each ends with
every row accounted for and, where the run cannot go on, one error line before any model stage."""

from __future__ import annotations

import json
import shutil
from datetime import date

import pytest
from conftest import SAMPLE_DIR, sample_rows, small_config, write_catalog
from typer.testing import CliRunner

from sidpipe.cli import app
from sidpipe.config import CatalogConfig, load_config
from sidpipe.errors import CatalogSourceError
from sidpipe.storage.manifest import run_records
from sidpipe.storage.published import published_runs
from sidpipe.storage.store import ArtifactStore

pytestmark = [pytest.mark.faults, pytest.mark.usefixtures("prefect_api")]
DAY = date(2026, 11, 20)


def run_flow(config, day=DAY):
    from sidpipe.flows.nightly import nightly_tokenization

    return nightly_tokenization(config, run_date=day)


def unnamed(store, catalog, same=False):
    """`small_config` without a catalog name: the name comes from the file."""
    config = small_config(store, str(catalog))
    catalog_section = {"uri": str(catalog), "same_catalog": same}
    return config.model_copy(update={"catalog": CatalogConfig(**catalog_section)})


# -- catalog identity ----------------------------------------------------------------------------
def test_a_catalog_without_a_name_is_named_after_its_file():
    assert load_config().catalog.store_name == "fashion-sample"  # data/fashion-sample/catalog.csv
    assert load_config(catalog={"uri": "/x/other.jsonl"}).catalog.store_name == "other"
    named = {"uri": "s3://b/exports/Shop Items 2026.jsonl.gz"}
    assert load_config(catalog=named).catalog.store_name == "shop-items-2026"
    assert load_config(catalog={"uri": "/x/acme/items.parquet"}).catalog.store_name == "acme"


def test_another_file_under_a_taken_name_is_refused_unless_it_is_the_same_catalog(tmp_path):
    store = str(tmp_path / "store")
    rows = sample_rows(60)
    first = write_catalog(tmp_path / "a" / "shop", rows, name="catalog.csv")
    other = write_catalog(tmp_path / "b" / "shop", rows[:50], name="catalog.csv")
    published = run_flow(unnamed(store, first))
    assert published["catalog"] == "shop"

    # A second file that would take the same name: one line, before anything is written.
    result = CliRunner().invoke(app, ["run", "--store", store, "--catalog", str(other)])
    assert result.exit_code == 2, result.output
    assert "catalog name 'shop' is the catalog read from" in result.output
    assert "--same-catalog" in result.output and "Traceback" not in result.output
    with pytest.raises(CatalogSourceError):
        run_flow(unnamed(store, other), date(2026, 11, 21))
    assert len(run_records(ArtifactStore(store))) == 1

    # Said to be the same catalog (a new export of it): published, and the record moves on.
    again = run_flow(unnamed(store, other, same=True), date(2026, 11, 21))
    assert again["counts"]["assigned"] == 50
    source = ArtifactStore(store).read_json("catalogs", "_sources", "shop.json")
    assert source["source"] == str(other) and source["previous"][0]["source"] == str(first)


# -- types and hostile rows ----------------------------------------------------------------------
def hostile_catalog(folder):
    """40 good rows, then every kind of bad one; returns (path, bad rows' expected reasons)."""
    write_catalog(folder, sample_rows(40))  # copies the good rows' images
    (folder / "images" / "broken.jpg").write_bytes(b"this is not a jpeg")
    shutil.copy(next(SAMPLE_DIR.glob("images/*.jpg")), folder / "images" / "ok.jpg")
    good = [json.dumps(r) for r in sample_rows(40)]
    bad = {
        '{"item_id": "", "title": "empty id"}': "empty item_id",
        '{"item_id": "   ", "title": "blank id"}': "empty item_id",
        '{"item_id": {"a": 1}, "title": "object id"}': "bad_type:item_id",
        '{"item_id": [1], "title": "list id"}': "bad_type:item_id",
        '{"item_id": true, "title": "bool id"}': "bad_type:item_id",
        '{"item_id": 1.5, "title": "float id"}': "bad_type:item_id",
        '{"item_id": "t1", "title": {"oops": "object"}}': "bad_type:title",
        '{"item_id": "t2", "title": ["a", "b"]}': "bad_type:title",
        '{"item_id": "t3", "title": 12}': "bad_type:title",
        '{"item_id": "t4", "title": false}': "bad_type:title",
        '{"item_id": "d1", "title": "x", "description": {"x": 1}}': "bad_type:description",
        '{"item_id": "i1", "title": "x", "image": 5}': "bad_type:image",
        '{"item_id": "i2", "title": "x", "image": ["a.jpg"]}': "bad_type:image",
        '{"item_id": "p1", "title": "x", "price": "cheap"}': "bad_type:price",
        json.dumps({"item_id": "huge", "title": "x" * 1_000_000}): "too_long:title",
        '{"item_id": "m1", "title": "x", "image": "images/missing.jpg"}': "image not found",
        '{"item_id": "b1", "title": "x", "image": "images/broken.jpg"}': "not an image file",
        '{"item_id": "dup", "title": "one"}': "duplicate item_id with conflicting rows",
        '{"item_id": "dup", "title": "two"}': "duplicate item_id with conflicting rows",
        "[1, 2, 3]": "a JSONL row must be a JSON object",
    }
    kept = [
        '{"item_id": "ctl", "title": "tab\\tand\\u0000nul\\u0007bell"}',  # cleaned, kept
        '{"item_id": "../../etc/passwd", "title": "a path-like id is just an id"}',
        '{"item_id": "p2", "title": "x", "price": "12.50", "image": "images/ok.jpg"}',
        good[0],  # an identical duplicate: the copy is quarantined, the first kept
    ]
    truncated = '{"item_id": "cut", "title": "the file ends in the mid'
    lines = [*good, *bad, *kept, truncated]
    path = folder / "hostile.jsonl"
    path.write_text("\n".join(lines))  # no final newline: the last line is cut off
    reasons = [*bad.values(), "duplicate item_id (identical", "invalid JSON"]
    return path, reasons


def test_a_hostile_catalog_finishes_with_every_row_accounted_for(tmp_path):
    catalog, reasons = hostile_catalog(tmp_path / "cat")
    config = small_config(str(tmp_path / "store"), str(catalog))
    config.catalog.column_types = {"price": "number"}
    manifest = run_flow(config)

    counts = manifest["counts"]
    assert counts["input"] == 40 + 20 + 4 + 1
    assert counts["input"] == counts["assigned"] + counts["quarantined"] + counts["failed"]
    assert counts["quarantined"] == len(reasons) and counts["failed"] == 0
    store = ArtifactStore(config.store)
    quarantine = store.read_parquet(manifest["files"]["quarantine"]["path"]).to_pylist()
    got = sorted(q["reason"] for q in quarantine)
    for reason in reasons:
        match = next((g for g in got if g.startswith(reason)), None)
        assert match is not None, f"no row quarantined for {reason!r}: {got}"
        got.remove(match)
    assert all(len(q["raw"]) < 20_000 for q in quarantine)  # the 1 MB title is not copied whole
    items_table = store.read_parquet(manifest["files"]["items"]["path"])
    items = {r["item_id"]: r for r in items_table.to_pylist()}
    assert items["ctl"]["title"] == "tab and nul bell"
    assert items["p2"]["price"] == 12.5
    assert "../../etc/passwd" in items
    assert manifest["files"]["sids"]["rows"] == counts["assigned"] == 40 + 3


# -- too small, nothing left ---------------------------------------------------------------------
def test_a_catalog_too_small_once_bad_rows_are_out_stops_before_any_model_stage(tmp_path):
    rows = sample_rows(30) + [{"item_id": f"x{i}", "image": "images/gone.jpg"} for i in range(60)]
    catalog = write_catalog(tmp_path / "cat", rows)
    store = str(tmp_path / "store")
    result = CliRunner().invoke(app, ["run", "--store", store, "--catalog", str(catalog)])

    assert result.exit_code == 2, result.output
    error = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert error and "30 items are left to tokenize" in error[0] and "at least 78" in error[0]
    assert "min_points_per_code" in result.output and "Traceback" not in result.output
    s = ArtifactStore(store)
    assert not s.exists("cache", "embed") and published_runs(s) == []
    (record,) = run_records(s)
    assert record.status == "failed"
    assert record.counts.model_dump() == {
        "input": 90,
        "assigned": 0,
        "quarantined": 60,
        "failed": 30,
    }
    errors = s.read_parquet("runs", record.run_id, "errors.parquet")
    assert errors.num_rows == 30 and set(errors["stage"].to_pylist()) == {"tokenize"}


def test_a_run_whose_items_all_fail_ends_cleanly_with_counts(tmp_path):
    # Image-only items: the text embedder has nothing to read, so every item fails in embed.
    image = next(SAMPLE_DIR.glob("images/*.jpg")).name
    rows = [{"item_id": f"pic{i}", "image": f"images/{image}"} for i in range(12)]
    catalog = write_catalog(tmp_path / "cat", rows)
    config = small_config(str(tmp_path / "store"), str(catalog))
    from sidpipe.errors import NoItemsLeftError

    with pytest.raises(NoItemsLeftError, match="12 failed \\(12 in embed\\)"):
        run_flow(config)
    store = ArtifactStore(config.store)
    (record,) = run_records(store)
    assert record.status == "failed" and record.counts.failed == 12
    assert record.stages["embed"].failed == 12 and published_runs(store) == []
