"""Model-served stages against a vLLM test double: captions, interests, GME embeddings, and the
client's retries, bounds, timeouts and health checks."""

import asyncio
import io
import socket
from datetime import date

import numpy as np
import pyarrow as pa
import pytest
from conftest import SAMPLE_DIR, sample_rows
from PIL import Image
from vllm_double import VLLMDouble

from sidpipe.config import CaptionConfig, EmbedConfig, InterestsConfig, ModelEndpointConfig
from sidpipe.errors import EndpointUnavailableError
from sidpipe.models import openai_client
from sidpipe.models.embedders import EmbedInput
from sidpipe.models.images import ImageError, decode_image, fit_pixel_budget, image_url_for
from sidpipe.models.openai_client import OpenAICompatClient, RequestFailedError
from sidpipe.models.prompts import INTEREST_PROMPTS, MalformedOutputError, parse_interests
from sidpipe.storage.manifest import utcnow
from sidpipe.storage.store import ArtifactStore
from sidpipe.tasks.caption import caption_stage
from sidpipe.tasks.embed import embed_stage, make_embedder
from sidpipe.tasks.interests import interests_stage
from sidpipe.tasks.stage import RunInfo, stage_matrix, stage_values

VLM, LLM, GME = "Qwen/Qwen2.5-VL-7B-Instruct", "Qwen/Qwen2.5-7B-Instruct", "gme-test"


def run_info(run_id="r1"):
    return RunInfo(run_id=run_id, run_date=date(2026, 11, 1), catalog="c", started_at=utcnow())


def items_table(n=12, titles=None):
    rows = []
    for i, row in enumerate(sample_rows(n)):
        rows.append(
            {
                "item_id": row["item_id"],
                "title": (titles or {}).get(i, row["title"]),
                "description": None,
                "image": str(SAMPLE_DIR / row["image"]),
                "image_fingerprint": f"fp-{row['item_id']}",
                "articleType": row["articleType"],
            }
        )
    return pa.Table.from_pylist(rows)


def errors_of(store, outcome):
    if outcome.errors is None:
        return {}
    table = store.read_parquet("runs", "r1", outcome.errors)
    return dict(zip(table["item_id"].to_pylist(), table["error"].to_pylist(), strict=True))


@pytest.fixture
def vlm():
    with VLLMDouble(VLM, capacity=16) as server:
        yield server


@pytest.fixture
def llm():
    with VLLMDouble(LLM, capacity=16) as server:
        yield server


def fast(config_cls, url, **kw):
    """Quick retries so failure tests take milliseconds."""
    return config_cls(
        url=url,
        max_retries=kw.pop("max_retries", 3),
        timeout_seconds=kw.pop("timeout_seconds", 10),
        **kw,
    )


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch):
    monkeypatch.setattr(openai_client, "BACKOFF_BASE_SECONDS", 0.001)


# -- captions ------------------------------------------------------------------------------------
def test_captions_every_image_then_serves_the_rerun_from_cache(tmp_path, vlm):
    store = ArtifactStore(str(tmp_path))
    table = items_table(12)
    first = caption_stage(store, run_info(), table, fast(CaptionConfig, vlm.url))
    assert (first.stats.computed, first.stats.cached, first.stats.failed) == (12, 0, 0)
    captions = stage_values(store, run_info(), first, "caption")
    assert len(captions) == 12 and all("product photographed" in c for c in captions.values())
    assert first.model["usage"]["prompt_tokens"] > 0

    before = sum(vlm.stats.requests.values())
    again = caption_stage(store, run_info("r2"), table, fast(CaptionConfig, vlm.url))
    assert (again.stats.computed, again.stats.cached) == (0, 12)
    assert sum(vlm.stats.requests.values()) == before  # not even a health check


def test_items_without_image_are_skipped_not_failed(tmp_path, vlm):
    table = items_table(3).to_pylist()
    table[0]["image"] = None
    outcome = caption_stage(
        ArtifactStore(str(tmp_path)),
        run_info(),
        pa.Table.from_pylist(table),
        fast(CaptionConfig, vlm.url),
    )
    assert (outcome.stats.computed, outcome.stats.skipped, outcome.stats.failed) == (2, 1, 0)


def test_failures_are_retried_then_recorded_per_item(tmp_path, vlm):
    table = items_table(
        6, titles={0: "ALWAYS-500 shirt", 1: "FLAKY-500 shirt", 2: "RATE-429 shirt"}
    )
    store = ArtifactStore(str(tmp_path))
    outcome = caption_stage(store, run_info(), table, fast(CaptionConfig, vlm.url))
    errors = errors_of(store, outcome)
    first_id = table["item_id"][0].as_py()
    assert list(errors) == [first_id]
    assert "HTTP 500" in errors[first_id] and "after 3 retries" in errors[first_id]
    assert (outcome.stats.computed, outcome.stats.failed) == (5, 1)
    assert outcome.model["usage"]["retries"] >= 3 + 2 + 1


def test_a_corrupt_image_is_one_items_error(tmp_path, vlm):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    rows = items_table(3).to_pylist()
    rows[1]["image"] = str(broken)
    store = ArtifactStore(str(tmp_path / "store"))
    outcome = caption_stage(
        store, run_info(), pa.Table.from_pylist(rows), fast(CaptionConfig, vlm.url)
    )
    errors = errors_of(store, outcome)
    assert list(errors) == [rows[1]["item_id"]] and "cannot decode" in errors[rows[1]["item_id"]]


def test_timeouts_become_per_item_errors(tmp_path):
    with VLLMDouble(VLM, slow_seconds=3) as server:
        store = ArtifactStore(str(tmp_path))
        table = items_table(3, titles={1: "SLOW shirt"})
        outcome = caption_stage(
            store,
            run_info(),
            table,
            fast(CaptionConfig, server.url, timeout_seconds=0.3, max_retries=1),
        )
    errors = errors_of(store, outcome)
    assert list(errors) == [table["item_id"][1].as_py()]
    assert "timeout after 0.3s" in next(iter(errors.values()))


def test_a_dead_server_fails_the_stage_at_once_with_the_reason(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    with pytest.raises(EndpointUnavailableError, match="unreachable"):
        caption_stage(
            ArtifactStore(str(tmp_path)), run_info(), items_table(2), fast(CaptionConfig, dead)
        )


def test_a_server_with_another_model_is_refused(tmp_path, llm):
    with pytest.raises(EndpointUnavailableError, match="not 'Qwen/Qwen2.5-VL-7B-Instruct'"):
        caption_stage(
            ArtifactStore(str(tmp_path)), run_info(), items_table(2), fast(CaptionConfig, llm.url)
        )


def test_requests_in_flight_never_exceed_the_bound_and_replicas_share_load():
    async def go(urls):
        settings = ModelEndpointConfig(url=",".join(urls), model=LLM, max_in_flight=4)
        async with OpenAICompatClient(settings) as client:
            await asyncio.gather(
                *(client.chat([{"role": "user", "content": f"q{i}"}]) for i in range(60))
            )
            return client.usage

    with (
        VLLMDouble(LLM, capacity=100, latency=0.02) as a,
        VLLMDouble(LLM, capacity=100, latency=0.02) as b,
    ):
        usage = asyncio.run(go([a.url, b.url]))
        assert a.stats.max_in_flight == 4 and b.stats.max_in_flight == 4
        assert (
            a.stats.requests["/v1/chat/completions"] + b.stats.requests["/v1/chat/completions"]
            == 60
        )
        assert (
            min(a.stats.requests["/v1/chat/completions"], b.stats.requests["/v1/chat/completions"])
            >= 20
        )
        assert usage.requests == 60 and usage.failures == 0


def test_client_errors_other_than_429_are_not_retried():
    async def go(url):
        async with OpenAICompatClient(ModelEndpointConfig(url=url, model="other")) as client:
            await client.chat([{"role": "user", "content": "x"}])

    with VLLMDouble(LLM) as server, pytest.raises(RequestFailedError, match="HTTP 404"):
        asyncio.run(go(server.url))
    assert server.stats.requests["/v1/chat/completions"] == 1


# -- interests -----------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["response_format", "structured_outputs"])
def test_interests_are_schema_constrained_and_normalized(tmp_path, llm, mode):
    store = ArtifactStore(str(tmp_path))
    outcome = interests_stage(
        store,
        run_info(),
        items_table(5),
        ["articleType"],
        fast(InterestsConfig, llm.url, structured_output=mode),
    )
    assert outcome.stats.computed == 5
    values = stage_values(store, run_info(), outcome, "interests")
    for tags in values.values():
        assert 2 <= len(tags) <= 4 and all(t == t.lower().strip() for t in tags)


def test_malformed_answers_get_one_retry_then_an_error(tmp_path, llm):
    table = items_table(
        4, titles={0: "BAD-JSON shirt", 1: "BAD-JSON-ONCE shirt", 2: "TRUNCATE shirt"}
    )
    store = ArtifactStore(str(tmp_path))
    outcome = interests_stage(store, run_info(), table, [], fast(InterestsConfig, llm.url))
    errors = errors_of(store, outcome)
    ids = table["item_id"].to_pylist()
    assert set(errors) == {ids[0], ids[2]}
    assert "malformed output twice" in errors[ids[0]] and "truncated" in errors[ids[2]]
    assert (outcome.stats.computed, outcome.stats.failed) == (2, 2)


def test_tag_normalization():
    tags, reasoning = parse_interests(
        '{"reasoning": "r", "interests": ["  Outdoor  Lifestyle!", "outdoor lifestyle", '
        '"Budget-Conscious Parent", "x", "fourth tag", "fifth"]}',
        "stop",
    )
    assert tags == ["outdoor lifestyle", "budget-conscious parent", "x", "fourth tag"]
    with pytest.raises(MalformedOutputError, match="2-4 distinct"):
        parse_interests('{"reasoning": "r", "interests": ["Same", "same!"]}', "stop")
    with pytest.raises(MalformedOutputError, match="truncated"):
        parse_interests('{"reasoning": "r", "interests": ["a", "b"]}', "length")


def test_the_prompt_version_is_part_of_the_cache_key(tmp_path, llm, monkeypatch):
    monkeypatch.setitem(INTEREST_PROMPTS, "v2-test", INTEREST_PROMPTS["v1"])
    store = ArtifactStore(str(tmp_path))
    table = items_table(3)
    interests_stage(store, run_info(), table, [], fast(InterestsConfig, llm.url))
    v2 = interests_stage(
        store, run_info(), table, [], fast(InterestsConfig, llm.url, prompt_version="v2-test")
    )
    assert v2.stats.computed == 3


# -- GME embeddings ------------------------------------------------------------------------------
def test_gme_embeddings_over_the_server(tmp_path):
    with VLLMDouble(GME, embed_dim=24) as server:
        store = ArtifactStore(str(tmp_path))
        config = EmbedConfig(url=server.url, model=GME, max_retries=1)
        embedder = make_embedder(config)
        rows = items_table(4).to_pylist()
        broken = tmp_path / "broken.jpg"
        broken.write_bytes(b"garbage")
        rows[3]["image"] = str(broken)
        outcome = embed_stage(
            store, run_info(), pa.Table.from_pylist(rows), ["articleType"], embedder, config
        )
        assert outcome.model["dim"] == 24
        assert (outcome.stats.computed, outcome.stats.failed) == (3, 1)
        ids, _, x = stage_matrix(store, run_info(), outcome, "embedding")
        assert len(ids) == 3 and np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
        # The image is part of what GME reads: another image, another cache entry.
        key = embedder.input_key(EmbedInput("t", "/a.jpg", "fp-1"))
        assert key["image"] == "fp-1" and key["instruction"]
        again = embed_stage(
            store,
            run_info("r2"),
            pa.Table.from_pylist(rows[:3]),
            ["articleType"],
            make_embedder(config),
            config,
        )
        assert (again.stats.computed, again.stats.cached) == (0, 3)
        # The broken image failed before any request; the re-run sent nothing.
        assert server.stats.requests["/v1/embeddings"] == 3


# -- images --------------------------------------------------------------------------------------
def test_large_images_are_scaled_to_the_pixel_budget_in_28px_patches():
    image = Image.new("RGB", (3000, 2000), "red")
    small = fit_pixel_budget(image, 1003520)
    assert small.size[0] * small.size[1] <= 1003520
    assert small.size[0] % 28 == 0 and small.size[1] % 28 == 0
    assert abs(small.size[0] / small.size[1] - 1.5) < 0.05
    tiny = Image.new("RGB", (60, 80))
    assert fit_pixel_budget(tiny, 1003520) is tiny  # the server's min_pixels applies


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (60, 80), "blue")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    assert decode_image(buffer.getvalue()).size == (80, 60)


def test_image_limits_and_transports(tmp_path):
    path = SAMPLE_DIR / "images" / f"{sample_rows(1)[0]['item_id']}.jpg"
    assert image_url_for(str(path), "data_url", 10**6, 10**6, False).startswith(
        "data:image/jpeg;base64,"
    )
    assert image_url_for(str(path), "file_url", 10**6, 10**6, False) == f"file://{path}"
    with pytest.raises(ImageError, match="larger than 100 bytes"):
        image_url_for(str(path), "data_url", 100, 10**6, False)
    with pytest.raises(ImageError, match="disabled"):
        image_url_for("https://example.com/a.jpg", "data_url", 10**6, 10**6, False)
    with pytest.raises(ImageError, match="not found"):
        image_url_for(str(tmp_path / "none.jpg"), "data_url", 10**6, 10**6, False)


def test_images_load_from_s3(s3):
    import s3fs

    path = SAMPLE_DIR / "images" / f"{sample_rows(1)[0]['item_id']}.jpg"
    key = f"{s3}/imgs/a.jpg"
    s3fs.S3FileSystem().put(str(path), key.removeprefix("s3://"))
    url = image_url_for(key, "data_url", 10**6, 10**6, False)
    assert url.startswith("data:image/jpeg;base64,")
    with pytest.raises(ImageError, match="not found"):
        image_url_for(f"{s3}/imgs/missing.jpg", "data_url", 10**6, 10**6, False)


def test_interests_with_raw_control_characters_in_json_strings_are_read():
    """A constrained decoder's grammar lets raw control characters into JSON strings (seen with
    vLLM 0.32 and xgrammar); Python's strict parser would reject the whole answer."""
    from sidpipe.models.prompts import parse_interests

    content = '{"reasoning": "line one\nline\ttwo\x01", "interests": ["home\x07 decor", "gifts"]}'
    tags, reasoning = parse_interests(content, "stop")
    assert tags == ["home decor", "gifts"]
    assert reasoning.startswith("line one")


def test_extra_body_is_in_the_cache_key_only_when_set():
    """Old caches stay valid; a changed extra parameter (e.g. min_tokens) recomputes."""
    from sidpipe.config import CaptionConfig
    from sidpipe.tasks.model_served import model_key

    assert "extra_body" not in model_key(CaptionConfig())
    assert model_key(CaptionConfig(extra_body={"min_tokens": 8}))["extra_body"] == {"min_tokens": 8}
