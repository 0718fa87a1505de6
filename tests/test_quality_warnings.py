"""Poor SIDs are said out loud, every run until a refit fixes them; a no-op refit says so."""

from datetime import date

import pytest
from conftest import small_config
from typer.testing import CliRunner

from sidpipe.models.sids import quality_warnings
from sidpipe.storage.store import ArtifactStore

pytestmark = pytest.mark.usefixtures("prefect_api")


def quality(distinct: float, bucket: int, collisions: bool = True) -> dict:
    before = {"distinct_tuple_rate": distinct, "max_bucket": bucket}
    q = {"levels": [{"codebook_size": 5}] * 3, "distinct_tuple_rate": 1.0, "max_bucket": 1}
    return q | ({"collisions": {"before": before}} if collisions else before)


def test_warnings_judge_the_codes_before_the_suffix_and_say_what_to_change():
    assert quality_warnings(quality(0.73, 8), 0.6, 10) == []
    warned = quality_warnings(quality(0.22, 22), 0.6, 10)
    assert "only 22% of items have a code tuple of their own" in warned[0]
    assert "22 items share one code tuple" in warned[1]
    assert "codebooks 5/5/5" in warned[2] and "--refit" in warned[2]
    assert len(quality_warnings(quality(0.5, 3, collisions=False), 0.6, 10)) == 2


def test_a_poor_catalog_is_warned_every_run_and_a_no_op_refit_says_so(tmp_path, small_catalog):
    from sidpipe.cli import app
    from sidpipe.flows.nightly import nightly_tokenization

    store_uri = str(tmp_path / "store")
    # 120 items cannot fill 64 codes a level at 39 per code: the codebooks shrink, and with
    # a demanding threshold the SIDs count as poor.
    config = small_config(
        store_uri, str(small_catalog), codebook_sizes=[64, 64, 64], warn_distinct_tuple_rate=0.99
    )
    store = ArtifactStore(store_uri)
    runs = [nightly_tokenization(config, run_date=date(2026, 11, d)) for d in (1, 2)]
    for run in runs:  # the first run fits, the second encodes with the pinned tokenizer
        assert run["warnings"] and "tokenizer.warn_distinct_tuple_rate" in run["warnings"][0]
        report = store.read_json(run["files"]["quality"]["path"])
        assert report["warnings"] == run["warnings"]
        assert "shrinking to" in report["sizing_message"]  # still said while it is pinned
    assert runs[1]["stages"]["fit"]["computed"] == 0

    refit = config.model_copy(
        update={"tokenizer": config.tokenizer.model_copy(update={"refit": True})}
    )
    third = nightly_tokenization(refit, run_date=date(2026, 11, 3))
    assert third["tokenizer_id"] == runs[0]["tokenizer_id"]
    assert "refit: settings and embeddings are unchanged" in third["notes"][0]
    drift = store.read_json(third["files"]["quality"]["path"])["drift"]
    assert drift["sid_changed"] == 0.0 and drift["items_compared"] == 120

    shown = CliRunner().invoke(app, ["inspect", "test-catalog", "--store", store_uri])
    assert shown.exit_code == 0
    assert "note: refit" in shown.output and "warning: only" in shown.output
