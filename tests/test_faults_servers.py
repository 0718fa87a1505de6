"""Fault matrix, model servers (README: Reliability): what a run does when a vLLM server, or a
proxy in front of it, misbehaves in the ways a real vLLM cannot be made to show on demand.

Every case runs the nightly flow against `vllm_double` and checks what the user sees (one
readable error line, or one readable reason per item), that the counts add up (input =
assigned + quarantined + failed) and that nothing partial is published.
"""

import time
from datetime import date

import pytest
from conftest import sample_rows, small_config, write_catalog
from vllm_double import VLLMDouble

from sidpipe.errors import EndpointUnavailableError, NoItemsLeftError
from sidpipe.models import openai_client
from sidpipe.storage.manifest import run_records
from sidpipe.storage.published import published_runs
from sidpipe.storage.store import ArtifactStore

pytestmark = [pytest.mark.faults, pytest.mark.usefixtures("prefect_api")]
VLM, LLM = "Qwen/Qwen2.5-VL-7B-Instruct", "Qwen/Qwen2.5-7B-Instruct"
DAY = date(2026, 12, 1)
N = 24  # items: enough for a (shrunk) tokenizer fit, few enough for seconds per run


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch):
    monkeypatch.setattr(openai_client, "BACKOFF_BASE_SECONDS", 0.001)


def catalog_with(tmp_path, marks: dict[int, str]):
    """N sample items; item i's title starts with marks[i] (a fault marker of the double)."""
    rows = sample_rows(N)
    for i, mark in marks.items():
        rows[i] = dict(rows[i], title=f"{mark} {rows[i]['title']}")
    return write_catalog(tmp_path / "catalog", rows), [r["item_id"] for r in rows]


def config_for(tmp_path, catalog, caption=None, interests=None, **endpoint):
    """The small flow settings with these servers; `endpoint` overrides retries and timeouts."""
    config = small_config(str(tmp_path / "store"), str(catalog))
    settings = {"max_retries": 2, "timeout_seconds": 10, **endpoint}
    update = {}
    if caption is not None:
        update["caption"] = config.caption.model_copy(update={"url": caption, **settings})
    if interests is not None:
        update["interests"] = config.interests.model_copy(update={"url": interests, **settings})
    return config.model_copy(update=update)


def run_flow(config):
    from sidpipe.flows.nightly import nightly_tokenization

    return nightly_tokenization(config, run_date=DAY)


def assert_published_all_but(store, result, ids, failed: set[str]) -> dict[str, str]:
    """The run published exactly the items that did not fail; returns each failure's reason."""
    counts = result["counts"]
    assert counts == {
        "input": N,
        "assigned": N - len(failed),
        "quarantined": 0,
        "failed": len(failed),
    }
    sids = store.read_parquet("sids", "test-catalog", DAY.isoformat(), "sids.parquet")
    assert set(sids["item_id"].to_pylist()) == set(ids) - failed  # no failed item, no partial row
    errors = store.read_parquet(result["files"]["errors"]["path"]).to_pylist()
    reasons = {e["item_id"]: e["error"] for e in errors}
    assert set(reasons) == failed
    assert [r.status for r in run_records(store)] == ["published"]
    return reasons


def assert_failed_cleanly(store, error, ids, stage: str) -> dict[str, str]:
    """A run in which every item failed in `stage`: one error line, nothing published, a failed
    run record whose counts add up, every item's reason in runs/<run_id>/errors.parquet."""
    line = error.value.one_line
    assert "\n" not in line and line.startswith("no item is left to tokenize")
    assert f"{N} failed ({N} in {stage})" in line
    assert published_runs(store) == [] and not store.exists("sids", "test-catalog")
    [record] = run_records(store)
    assert record.status == "failed" and record.error == line
    c = record.counts
    assert (c.input, c.assigned, c.quarantined, c.failed) == (N, 0, 0, N)
    assert c.input == c.assigned + c.quarantined + c.failed
    assert record.stages[stage].failed == N
    errors = store.read_parquet("runs", record.run_id, "errors.parquet").to_pylist()
    reasons = {e["item_id"]: e["error"] for e in errors}
    assert set(reasons) == set(ids) and {e["stage"] for e in errors} == {stage}
    return reasons


# 1 --------------------------------------------------------------------------------------------
def test_a_server_reporting_another_model_fails_the_run_naming_both(tmp_path):
    catalog, _ = catalog_with(tmp_path, {})
    with VLLMDouble(VLM, served_model="Qwen/Qwen2-VL-2B-Instruct") as vlm:
        config = config_for(tmp_path, catalog, caption=vlm.url)
        with pytest.raises(EndpointUnavailableError) as error:
            run_flow(config)
    line = error.value.one_line
    assert "\n" not in line
    assert f"serves ['Qwen/Qwen2-VL-2B-Instruct'], not '{VLM}'" in line
    assert vlm.stats.requests["/v1/chat/completions"] == 0  # stopped before any request
    store = ArtifactStore(config.store)
    assert published_runs(store) == [] and not store.exists("sids", "test-catalog")
    [record] = run_records(store)
    assert record.status == "failed" and "Qwen/Qwen2-VL-2B-Instruct" in record.error
    assert record.counts is None or record.counts.assigned == 0


# 2 --------------------------------------------------------------------------------------------
def test_empty_bodies_are_retried_as_transient_then_recorded_per_item(tmp_path):
    catalog, ids = catalog_with(tmp_path, {0: "EMPTY-BODY", 1: "EMPTY-BODY", 2: "EMPTY-BODY-ONCE"})
    with VLLMDouble(VLM) as vlm:
        config = config_for(tmp_path, catalog, caption=vlm.url)
        result = run_flow(config)
    reasons = assert_published_all_but(ArtifactStore(config.store), result, ids, {ids[0], ids[1]})
    for item in ids[:2]:
        assert "empty response body (HTTP 200, 0 bytes)" in reasons[item]
        assert reasons[item].endswith("(after 2 retries)")
    caption = result["stages"]["caption"]
    assert (caption["computed"], caption["failed"]) == (N - 2, 2)
    # Two items tried 3 times each, one item twice (its retry succeeded).
    assert result["models"]["caption"]["usage"]["retries"] == 2 * 2 + 1
    assert vlm.stats.requests["/v1/chat/completions"] == N + 2 * 2 + 1


# 3 --------------------------------------------------------------------------------------------
def test_an_error_body_sent_with_http_200_is_an_error_with_the_servers_message(tmp_path):
    catalog, ids = catalog_with(tmp_path, {0: "ERROR-200", 1: "ERROR-OBJ-200"})
    with VLLMDouble(VLM) as vlm:
        config = config_for(tmp_path, catalog, caption=vlm.url)
        result = run_flow(config)
    reasons = assert_published_all_but(ArtifactStore(config.store), result, ids, {ids[0], ids[1]})
    assert (
        "maximum context length is 32768 tokens (injected) (BadRequestError, 400)"
        in (reasons[ids[0]])
    )
    assert "upstream rejected the request (injected) (400)" in reasons[ids[1]]
    for item in ids[:2]:
        assert reasons[item].startswith("caption: RequestFailedError: HTTP 200 with an error body")
        assert "choices" not in reasons[item]  # not mistaken for an answer without choices
    # A 400 is the request's own fault: not retried.
    assert result["models"]["caption"]["usage"]["retries"] == 0
    assert vlm.stats.requests["/v1/chat/completions"] == N


# 4 --------------------------------------------------------------------------------------------
def test_a_server_that_never_answers_times_out_per_item_in_bounded_time(tmp_path):
    catalog, ids = catalog_with(tmp_path, {0: "NO-ANSWER", 5: "NO-ANSWER"})
    with VLLMDouble(VLM) as vlm:
        config = config_for(tmp_path, catalog, caption=vlm.url, timeout_seconds=0.5, max_retries=1)
        result = run_flow(config)
    reasons = assert_published_all_but(ArtifactStore(config.store), result, ids, {ids[0], ids[5]})
    for item in (ids[0], ids[5]):
        assert "timeout after 0.5s from" in reasons[item]
        assert reasons[item].endswith("(after 1 retries)")
    # Two attempts of 0.5 s each, in parallel for both items, plus small backoffs.
    assert 1.0 <= result["stages"]["caption"]["seconds"] < 8
    assert result["models"]["caption"]["usage"]["retries"] == 2


# 5 --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fault", ["EMPTY-CONTENT", "ALWAYS-500"])
def test_every_item_failing_caption_ends_the_run_cleanly_and_a_rerun_retries_them(tmp_path, fault):
    catalog, ids = catalog_with(tmp_path, {})
    with VLLMDouble(VLM, faults=[fault]) as broken:
        config = config_for(tmp_path, catalog, caption=broken.url)
        with pytest.raises(NoItemsLeftError) as error:
            run_flow(config)
    store = ArtifactStore(config.store)
    reasons = assert_failed_cleanly(store, error, ids, "caption")
    expected = "MalformedOutputError: empty caption" if fault == "EMPTY-CONTENT" else "HTTP 500"
    assert all(expected in reason for reason in reasons.values())
    assert expected in error.value.one_line  # the most common reason, in the one line

    # The server is fixed: the next run asks it for every item again and publishes them all.
    with VLLMDouble(VLM) as healthy:
        config = config.model_copy(
            update={"caption": config.caption.model_copy(update={"url": healthy.url})}
        )
        result = run_flow(config)
    assert healthy.stats.requests["/v1/chat/completions"] == N  # failures were not cached
    assert result["counts"] == {"input": N, "assigned": N, "quarantined": 0, "failed": 0}
    assert result["stages"]["caption"]["computed"] == N
    assert run_records(store)[-1].status == "published"
    sids = store.read_parquet("sids", "test-catalog", DAY.isoformat(), "sids.parquet")
    assert set(sids["item_id"].to_pylist()) == set(ids)


# 6 --------------------------------------------------------------------------------------------
def test_interests_answering_only_duplicate_tags_ends_the_run_cleanly(tmp_path):
    catalog, ids = catalog_with(tmp_path, {})
    with VLLMDouble(LLM, faults=["DUP-TAGS"]) as llm:
        config = config_for(tmp_path, catalog, interests=llm.url)
        start = time.perf_counter()
        with pytest.raises(NoItemsLeftError) as error:
            run_flow(config)
        assert time.perf_counter() - start < 60
    store = ArtifactStore(config.store)
    reasons = assert_failed_cleanly(store, error, ids, "interests")
    assert all("malformed output twice" in r and "2-4 distinct" in r for r in reasons.values())
    assert llm.stats.requests["/v1/chat/completions"] == 2 * N  # one retry each, no more

    with VLLMDouble(LLM) as healthy:
        config = config.model_copy(
            update={"interests": config.interests.model_copy(update={"url": healthy.url})}
        )
        result = run_flow(config)
    assert healthy.stats.requests["/v1/chat/completions"] == N
    assert result["counts"] == {"input": N, "assigned": N, "quarantined": 0, "failed": 0}
    assert result["stages"]["embed"]["computed"] == N
