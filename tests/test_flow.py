"""The nightly flow end to end under Prefect: publish, counts, re-run from cache, S3, failures."""

import os
from datetime import date

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import sample_rows, small_config, write_catalog
from typer.testing import CliRunner

from sidpipe.cli import app
from sidpipe.storage.manifest import read_manifest, run_records
from sidpipe.storage.published import published_runs
from sidpipe.storage.store import ArtifactStore

pytestmark = pytest.mark.usefixtures("prefect_api", "wide_console")
DAY = date(2026, 11, 20)
COSTLY = ("caption", "interests", "embed", "fit")


@pytest.fixture
def wide_console():
    """Rich wraps long ids on an 80-column terminal; tests read whole lines."""
    from sidpipe import cli

    width = cli.console.width
    cli.console.width = 220
    yield
    cli.console.width = width


def run_flow(config, day=DAY):
    from sidpipe.flows.nightly import nightly_tokenization

    return nightly_tokenization(config, run_date=day)


def test_run_publishes_sids_and_rerun_recomputes_nothing_costly(tmp_path, small_catalog):
    config = small_config(str(tmp_path / "store"), str(small_catalog))
    first = run_flow(config)
    assert first["counts"] == {"input": 120, "assigned": 120, "quarantined": 0, "failed": 0}
    assert first["stages"]["embed"]["computed"] == 120
    assert first["stages"]["fit"]["computed"] == 120
    assert first["stages"]["caption"]["skipped"] == 120
    assert first["stages"]["interests"]["skipped"] == 120

    store = ArtifactStore(config.store)
    sids = store.read_parquet("sids", "test-catalog", DAY.isoformat(), "sids.parquet")
    assert sids.column_names[:6] == [
        "item_id",
        "codes",
        "suffix",
        "sid",
        "tokenizer_id",
        "first_assigned",
    ]
    assert sids.num_rows == 120 and len(set(sids["sid"].to_pylist())) == 120
    assert all(len(c) == 3 for c in sids["codes"].to_pylist())
    manifest = read_manifest(store, "test-catalog", DAY)
    assert manifest.models["embed"]["dim"] == 384
    assert manifest.config["tokenizer"]["codebook_sizes"] == [8, 8, 8]
    assert manifest.inputs["catalog_sha256"] and manifest.code_version["sidpipe"]
    tokenizer = store.read_json("tokenizers", manifest.tokenizer_id, "config.json")
    assert tokenizer["codebook_sizes"] == [8, 8, 8]
    quality = store.read_json(manifest.files["quality"].path)
    assert len(quality["levels"]) == 3 and len(quality["reconstruction_cosine_by_depth"]) == 3

    second = run_flow(config)
    assert all(second["stages"][s]["computed"] == 0 for s in COSTLY)
    assert second["stages"]["embed"]["cached"] == 120 and second["stages"]["fit"]["cached"] == 120
    assert second["tokenizer_id"] == first["tokenizer_id"]
    again = store.read_parquet("sids", "test-catalog", DAY.isoformat(), "sids.parquet")
    assert again["sid"].to_pylist() == sids["sid"].to_pylist()  # stable
    assert [r.status for r in run_records(store)] == ["published", "published"]


def test_bad_rows_are_quarantined_and_counts_add_up(tmp_path):
    rows = sample_rows(100) + [
        {"item_id": "", "title": "no id"},
        {"item_id": "ghost", "title": "x", "image": "images/ghost.jpg"},
        {"item_id": "pic-only", "image": "images/" + sample_rows(1)[0]["item_id"] + ".jpg"},
    ]
    catalog = write_catalog(tmp_path / "cat", rows)
    config = small_config(str(tmp_path / "store"), str(catalog))
    result = run_flow(config)
    counts = result["counts"]
    # "pic-only" passes ingest (it has an image) but the text embedder has nothing to read.
    assert counts == {"input": 103, "assigned": 100, "quarantined": 2, "failed": 1}
    assert counts["input"] == counts["assigned"] + counts["quarantined"] + counts["failed"]
    store = ArtifactStore(config.store)
    quarantine = store.read_parquet(result["files"]["quarantine"]["path"]).to_pylist()
    assert {q["reason"].split(":")[0] for q in quarantine} == {"empty item_id", "image not found"}
    errors = store.read_parquet(result["files"]["errors"]["path"]).to_pylist()
    assert [(e["item_id"], e["stage"]) for e in errors] == [("pic-only", "embed")]


def test_a_catalog_without_item_id_is_refused_before_the_run_starts(tmp_path):
    catalog = tmp_path / "items.csv"
    catalog.write_text("sku,title\n1,a\n")
    config = small_config(str(tmp_path / "store"), str(catalog))
    from sidpipe.errors import CatalogError

    with pytest.raises(CatalogError, match="no 'item_id' column"):
        run_flow(config)
    assert not os.path.exists(config.store)  # nothing was started, nothing written


def test_a_catalog_that_fails_in_ingest_fails_the_run_and_publishes_nothing(tmp_path):
    catalog = tmp_path / "items.csv"
    rows = "".join(f"{i},title {i},x\n" for i in range(20))
    catalog.write_text("item_id,title,item_hash\n" + rows)  # a column name sidpipe reserves
    config = small_config(str(tmp_path / "store"), str(catalog))
    from sidpipe.errors import CatalogError

    with pytest.raises(CatalogError, match="reserved"):
        run_flow(config)
    store = ArtifactStore(config.store)
    assert published_runs(store) == []
    [record] = run_records(store)
    assert record.status == "failed" and "reserved" in record.error


def test_too_small_catalog_is_refused_with_a_clear_message(tmp_path, small_catalog):
    config = small_config(
        str(tmp_path / "store"),
        str(small_catalog),
        codebook_sizes=[4096, 2048, 1024],
        min_points_per_code=39,
        small_catalog="refuse",
    )
    from sidpipe.errors import CatalogTooSmallError

    # Stopped before any stage (nothing is written), naming the minimum and the setting.
    with pytest.raises(
        CatalogTooSmallError, match="120 rows, but fitting a tokenizer needs at least 159,744"
    ) as error:
        run_flow(config)
    assert "small_catalog=shrink" in error.value.hint
    assert not os.path.exists(config.store)


def test_end_to_end_on_s3(s3, small_catalog):
    store_uri = f"{s3}/artifacts"
    config = small_config(store_uri, str(small_catalog))
    result = run_flow(config)
    assert result["counts"]["assigned"] == 120
    import s3fs

    fs = s3fs.S3FileSystem()
    key = f"{s3}/artifacts/sids/test-catalog/{DAY}/sids.parquet".removeprefix("s3://")
    assert pq.read_table(key, filesystem=fs).num_rows == 120
    assert fs.exists(key.replace("sids.parquet", "_MANIFEST.json"))
    second = run_flow(config)
    assert all(second["stages"][s]["computed"] == 0 for s in COSTLY)

    output = CliRunner().invoke(app, ["inspect", "--store", store_uri])
    assert output.exit_code == 0, output.output
    assert "test-catalog" in output.output and "published" in output.output


def test_cli_run_then_inspect_shows_both_runs(tmp_path, small_catalog, monkeypatch):
    store = str(tmp_path / "store")
    yaml_path = tmp_path / "sidpipe.yaml"
    yaml_path.write_text(
        "tokenizer:\n  codebook_sizes: [8, 8, 8]\n  min_points_per_code: 4\n  epochs: 3\n"
        "  hidden_dims: [64]\n  latent_dim: 16\n"
    )
    runner = CliRunner()
    args = [
        "run",
        "--config",
        str(yaml_path),
        "--store",
        store,
        "--catalog",
        str(small_catalog),
        "--catalog-name",
        "cli-cat",
        "--run-date",
        "2026-11-21",
    ]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "120 in = 120 assigned + 0 quarantined + 0 failed" in first.output
    second = runner.invoke(app, args)
    assert second.exit_code == 0, second.output
    assert "nothing costly recomputed" in second.output

    listing = runner.invoke(app, ["inspect", "--store", store])
    assert listing.exit_code == 0
    assert listing.output.count("published") >= 3  # the title plus both runs in the run log
    shown = runner.invoke(app, ["inspect", "cli-cat/2026-11-21", "--store", store])
    assert shown.exit_code == 0
    assert "<a_" in shown.output and "SID quality" in shown.output
    raw = runner.invoke(app, ["inspect", "cli-cat", "--store", store, "--json"])
    assert '"run_date": "2026-11-21"' in raw.output

    missing = runner.invoke(app, ["inspect", "cli-cat/2026-01-01", "--store", store])
    assert missing.exit_code == 2 and "not published" in missing.output


def test_cli_reports_a_bad_catalog_without_a_traceback(tmp_path):
    catalog = tmp_path / "items.tsv"
    catalog.write_text("item_id\ta\n")
    result = CliRunner().invoke(
        app, ["run", "--store", str(tmp_path / "s"), "--catalog", str(catalog)]
    )
    assert result.exit_code == 2
    assert "unknown catalog format" in result.output and "Traceback" not in result.output


def test_a_dead_model_server_fails_the_run_fast_with_the_reason(
    tmp_path, small_catalog, monkeypatch
):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    monkeypatch.setenv("SIDPIPE_CAPTION_URL", dead)
    result = CliRunner().invoke(
        app, ["run", "--store", str(tmp_path / "s"), "--catalog", str(small_catalog)]
    )
    assert result.exit_code == 3, result.output  # unavailable: try again later
    assert f"{dead}: unreachable" in result.output and "Traceback" not in result.output


def test_full_enrichment_against_a_flaky_server_accounts_for_every_item(tmp_path, monkeypatch):
    from vllm_double import VLLMDouble

    from sidpipe.models import openai_client
    from sidpipe.models.prompts import INTEREST_PROMPTS

    monkeypatch.setattr(openai_client, "BACKOFF_BASE_SECONDS", 0.001)
    rows = sample_rows(100)
    for i in (3, 40):
        rows[i] = dict(rows[i], title="ALWAYS-500 " + rows[i]["title"])
    catalog = write_catalog(tmp_path / "cat", rows)
    with (
        VLLMDouble("Qwen/Qwen2.5-VL-7B-Instruct", fail_first_attempts=1) as vlm,
        VLLMDouble("Qwen/Qwen2.5-7B-Instruct", fail_first_attempts=1) as llm,
    ):
        config = small_config(str(tmp_path / "store"), str(catalog))
        config = config.model_copy(
            update={
                "caption": config.caption.model_copy(update={"url": vlm.url, "max_retries": 3}),
                "interests": config.interests.model_copy(update={"url": llm.url, "max_retries": 3}),
            }
        )
        first = run_flow(config)
        counts, stages = first["counts"], first["stages"]
        assert counts == {"input": 100, "assigned": 98, "quarantined": 0, "failed": 2}
        assert stages["caption"]["computed"] == 98 and stages["caption"]["failed"] == 2
        assert stages["interests"]["computed"] == 98 and stages["embed"]["computed"] == 98
        assert first["models"]["caption"]["usage"]["retries"] >= 98
        store = ArtifactStore(config.store)
        errors = store.read_parquet(first["files"]["errors"]["path"]).to_pylist()
        assert {e["stage"] for e in errors} == {"caption"} and len(errors) == 2

        second = run_flow(config)
        assert all(second["stages"][s]["computed"] == 0 for s in COSTLY)
        assert second["stages"]["caption"]["cached"] == 98

        # A new interests prompt: interests, embed and fit recompute; captions stay cached.
        monkeypatch.setitem(
            INTEREST_PROMPTS,
            "v2-test",
            {**INTEREST_PROMPTS["v1"], "system": "You study why shoppers buy. Answer in JSON."},
        )
        config = config.model_copy(
            update={"interests": config.interests.model_copy(update={"prompt_version": "v2-test"})}
        )
        third = run_flow(config)
        s = third["stages"]
        assert (s["caption"]["computed"], s["caption"]["cached"]) == (0, 98)
        assert s["interests"]["computed"] == 98 and s["embed"]["computed"] == 98
        # Published SIDs stay stable: the pinned tokenizer is not retrained, and items whose
        # catalog content did not change keep their SIDs; a refit brings the new embeddings in.
        assert s["fit"]["computed"] == 0
        assert (s["assign"]["computed"], s["assign"]["cached"]) == (0, 98)


def test_sid_lifecycle_nightly_keeps_sids_and_refit_reports_drift(tmp_path):
    import hashlib

    rows = sample_rows(160)
    day1, day2, day3 = date(2026, 11, 1), date(2026, 11, 2), date(2026, 11, 3)
    store_uri = str(tmp_path / "store")
    first_catalog = write_catalog(tmp_path / "c1", rows[:120])
    first = run_flow(small_config(store_uri, str(first_catalog)), day1)
    store = ArtifactStore(store_uri)
    sids1 = {
        r["item_id"]: r for r in store.read_parquet(first["files"]["sids"]["path"]).to_pylist()
    }

    # Day 2: 40 new items, 5 changed titles; the pinned tokenizer is reused, nothing retrained.
    changed = [
        dict(r, title=r["title"] + " (2026 edition)") if i < 5 else r
        for i, r in enumerate(rows[:120])
    ]
    second_catalog = write_catalog(tmp_path / "c2", changed + rows[120:])
    day2_config = small_config(store_uri, str(second_catalog))
    day2_config.catalog.same_catalog = True  # today's export of the same catalog, a new file
    second = run_flow(day2_config, day2)
    assert second["tokenizer_id"] == first["tokenizer_id"]
    assert second["stages"]["fit"]["computed"] == 0
    assert second["stages"]["assign"]["cached"] == 115  # unchanged items, copied
    assert second["stages"]["assign"]["computed"] == 45
    sids2 = {
        r["item_id"]: r for r in store.read_parquet(second["files"]["sids"]["path"]).to_pylist()
    }
    changed_ids = {r["item_id"] for r in changed[:5]}
    for item_id, row in sids1.items():
        if item_id not in changed_ids:
            assert sids2[item_id] == row  # byte-identical SID rows
    assert len({r["sid"] for r in sids2.values()}) == 160

    # Day 3: a refit with another seed: a new pinned version, a drift report; nothing published
    # before is touched.
    before = {
        k: hashlib.sha256(open(tmp_path / "store" / f["path"], "rb").read()).hexdigest()
        for k, f in second["files"].items()
    }
    refit = small_config(store_uri, str(second_catalog), seed=7)
    refit = refit.model_copy(
        update={"tokenizer": refit.tokenizer.model_copy(update={"refit": True})}
    )
    third = run_flow(refit, day3)
    assert third["tokenizer_id"] != second["tokenizer_id"]
    assert third["models"]["fit"]["parent"] == second["tokenizer_id"]
    quality = store.read_json(third["files"]["quality"]["path"])
    assert quality["drift"]["items_compared"] == 160 and quality["drift"]["sid_changed"] > 0.2
    assert len(quality["drift"]["code_changed_per_level"]) == 3
    for key, digest in before.items():
        assert (
            hashlib.sha256(
                open(tmp_path / "store" / second["files"][key]["path"], "rb").read()
            ).hexdigest()
            == digest
        )
    from sidpipe.storage.registry import read_registry

    registry = read_registry(store, "test-catalog")
    assert registry.pinned == third["tokenizer_id"] and len(registry.versions) == 2

    listing = CliRunner().invoke(app, ["tokenizers", "test-catalog", "--store", store_uri])
    assert listing.exit_code == 0 and third["tokenizer_id"] in listing.output


def test_a_pinned_tokenizer_is_never_used_on_another_embedding_space(tmp_path, small_catalog):
    from sidpipe.errors import TokenizerMismatchError

    config = small_config(str(tmp_path / "store"), str(small_catalog))
    run_flow(config)
    other = config.model_copy(
        update={"embed": config.embed.model_copy(update={"text_template_version": "v2"})}
    )
    with pytest.raises(TokenizerMismatchError, match="text template changed") as error:
        run_flow(other)
    assert "--refit" in error.value.hint


def test_rqkmeans_through_the_flow(tmp_path, small_catalog):
    result = run_flow(small_config(str(tmp_path / "store"), str(small_catalog), method="rqkmeans"))
    assert result["tokenizer_id"].startswith("rqkmeans-")
    assert result["counts"]["assigned"] == 120


def test_reassign_through_the_flow_keeps_published_sids_and_spreads_new_items(tmp_path):
    rows = sample_rows(200)
    store_uri, store = str(tmp_path / "store"), ArtifactStore(str(tmp_path / "store"))
    first = run_flow(
        small_config(
            store_uri,
            str(write_catalog(tmp_path / "c1", rows[:120])),
            method="rqkmeans",
            codebook_sizes=[16, 4, 4],
            collisions="reassign",
        ),
        date(2026, 11, 1),
    )
    quality = store.read_json(first["files"]["quality"]["path"])
    assert quality["collisions"]["reassigned"] > 0
    assert quality["distinct_tuple_rate"] > quality["collisions"]["before"]["distinct_tuple_rate"]
    day2 = small_config(
        store_uri,
        str(write_catalog(tmp_path / "c2", rows)),
        method="rqkmeans",
        codebook_sizes=[16, 4, 4],
        collisions="reassign",
    )
    day2.catalog.same_catalog = True
    second = run_flow(day2, date(2026, 11, 2))
    old = store.read_parquet(first["files"]["sids"]["path"]).to_pylist()
    new = {r["item_id"]: r for r in store.read_parquet(second["files"]["sids"]["path"]).to_pylist()}
    assert all(new[r["item_id"]] == r for r in old)  # published SIDs never move
    sids = [r["sid"] for r in new.values()]
    assert len(set(sids)) == 200  # and the 80 new items took free tuples or suffixes
    tuples = [tuple(r["codes"]) for r in new.values()]
    assert len(set(tuples)) > len({tuple(r["codes"]) for r in old})


def test_items_whose_embedding_the_tokenizer_rejects_count_as_failed(
    tmp_path, small_catalog, monkeypatch
):
    """A broken vector (here: an embedder returning NaN for one item) is set aside at fit with a
    reason, and the run still publishes with counts that add up."""
    from sidpipe.models import embedders

    real = embedders.SentenceTransformerEmbedder.embed

    def embed_with_one_nan(self, inputs, progress=None):
        vectors, errors = real(self, inputs, progress)
        vectors[0] = np.nan
        return vectors, errors

    monkeypatch.setattr(embedders.SentenceTransformerEmbedder, "embed", embed_with_one_nan)
    result = run_flow(small_config(str(tmp_path / "store"), str(small_catalog)))
    assert result["counts"] == {"input": 120, "assigned": 119, "quarantined": 0, "failed": 1}
    store = ArtifactStore(str(tmp_path / "store"))
    [error] = store.read_parquet(result["files"]["errors"]["path"]).to_pylist()
    assert error["stage"] == "fit" and "NaN" in error["error"]


def test_a_publish_retried_after_it_completed_returns_the_published_manifest(
    tmp_path, small_catalog
):
    from sidpipe.storage.manifest import read_manifest
    from sidpipe.tasks.publish import already_published
    from sidpipe.tasks.stage import RunInfo

    config = small_config(str(tmp_path / "store"), str(small_catalog))
    result = run_flow(config)
    store = ArtifactStore(config.store)
    manifest = read_manifest(store, "test-catalog", DAY)
    run = RunInfo(
        run_id=manifest.run_id, run_date=DAY, catalog="test-catalog", started_at=manifest.started_at
    )
    assert already_published(store, run).files == manifest.files  # staging is gone by now
    assert result["run_id"] == manifest.run_id
    other = run.model_copy(update={"run_id": "another-run"})
    assert already_published(store, other) is None
