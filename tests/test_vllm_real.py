"""The model-served stages against real vLLM servers (vLLM's CPU build, a tiny local model).

`python -m pytest -m vllm` (not part of the default run: the first run builds a 3.4 GB venv).
Random weights write nonsense, so these check the protocol and the accounting: the request
shapes this vLLM accepts (chat template, structured output, the embeddings task and its
`messages` body, the served model name), every item either enriched or failed with a reason,
and the counts adding up.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from datetime import date

import httpx
import numpy as np
import pytest
from conftest import sample_items
from real_servers import REPO
from real_vllm import PROCESSES, tiny_model, vllm_server

from sidpipe.config import CaptionConfig, EmbedConfig, InterestsConfig
from sidpipe.errors import EndpointUnavailableError
from sidpipe.models import openai_client
from sidpipe.storage.manifest import utcnow
from sidpipe.storage.store import ArtifactStore
from sidpipe.tasks.caption import caption_stage
from sidpipe.tasks.embed import embed_stage, make_embedder
from sidpipe.tasks.interests import interests_stage
from sidpipe.tasks.stage import RunInfo, stage_matrix, stage_values

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
RUN = RunInfo(run_id="vllm", run_date=date(2026, 11, 1), catalog="c", started_at=utcnow())
N = 40
STRUCTURED = '{"backend":"xgrammar","disable_any_whitespace":true}'  # no whitespace padding
# Room for a full answer: the reasoning (at most 1,000 characters) and 2-4 tags, after the prompt.
CHAT = ("--structured-outputs-config", STRUCTURED, "--max-model-len", "1024")
MAX_TOKENS = 600


def items(n: int = N):
    """Sample items, text only (the tiny text model has no vision tower)."""
    return sample_items(n, images=False)


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    log = tmp_path_factory.mktemp("vllm") / "chat.log"
    with vllm_server(tiny_model(), "tiny-qwen2", *CHAT, cpu="0", log=log) as url:
        yield url


@pytest.mark.parametrize("constraint", ["response_format", "structured_outputs"])
def test_interests_against_a_real_vllm_server(chat, tmp_path, constraint):
    store = ArtifactStore(str(tmp_path))
    config = InterestsConfig(
        url=chat, model="tiny-qwen2", structured_output=constraint, max_tokens=MAX_TOKENS
    )
    started = time.monotonic()
    outcome = interests_stage(store, RUN, items(), ["articleType"], config)
    seconds = time.monotonic() - started
    print(f"interests ({constraint}): {outcome.stats} in {seconds:.1f} s")
    # The bounded reasoning lets the grammar close every answer within max_tokens, so even
    # random weights (greedy: deterministic nonsense) give every item its 2-4 tags.
    failed = store.read_parquet("runs", RUN.run_id, outcome.errors) if outcome.errors else None
    reasons = failed.column("error").to_pylist() if failed is not None else []
    assert outcome.stats.computed == N and outcome.stats.failed == 0, (outcome.stats, reasons[:3])
    tags = stage_values(store, RUN, outcome, "interests")
    assert len(tags) == N and all(2 <= len(t) <= 4 for t in tags.values()), tags
    print("tags of 3 items:", list(tags.items())[:3])


def test_a_served_model_name_mismatch_is_one_clear_error(chat, tmp_path):
    store = ArtifactStore(str(tmp_path))
    config = InterestsConfig(url=chat, model="Qwen/Qwen2.5-7B-Instruct")
    with pytest.raises(EndpointUnavailableError) as error:
        interests_stage(store, RUN, items(4), ["articleType"], config)
    assert "tiny-qwen2" in str(error.value) and "Qwen/Qwen2.5-7B-Instruct" in str(error.value)


def test_a_server_killed_mid_stage_fails_the_rest_per_item_and_a_rerun_resumes(
    tmp_path_factory, tmp_path, monkeypatch
):
    """SIGKILL the server once it has answered some items: the items it had not answered fail
    with a connection reason (after retries), the stage ends with the counts adding up, and a
    rerun against a restarted server asks it only for those."""
    monkeypatch.setattr(openai_client, "BACKOFF_BASE_SECONDS", 0.01)
    n, answered_before_kill = 200, 30
    folder = tmp_path_factory.mktemp("vllm")
    store, catalog = ArtifactStore(str(tmp_path)), items(n)

    def answered(log) -> int:
        return log.read_text(errors="replace").count('"POST /v1/chat/completions HTTP/1.1" 200')

    def config(url):
        return InterestsConfig(url=url, model="tiny-qwen2", max_tokens=MAX_TOKENS, max_retries=1)

    first_log = folder / "killed.log"
    with vllm_server(tiny_model(), "tiny-qwen2", *CHAT, cpu="0", log=first_log) as url:
        pid, killed = PROCESSES[url].pid, threading.Event()

        def kill_when_busy() -> None:
            deadline = time.monotonic() + 120
            while answered(first_log) < answered_before_kill and time.monotonic() < deadline:
                time.sleep(0.02)
            os.killpg(pid, signal.SIGKILL)
            killed.set()

        threading.Thread(target=kill_when_busy, daemon=True).start()
        first = interests_stage(store, RUN, catalog, ["articleType"], config(url))
    assert killed.is_set()
    stats = first.stats
    print(f"killed after {answered(first_log)} answers: {stats}")
    assert stats.computed + stats.failed == n and stats.failed > 0, stats
    assert stats.computed >= answered_before_kill - 5, stats  # answers already in hand are kept
    reasons = store.read_parquet("runs", RUN.run_id, first.errors).column("error").to_pylist()
    assert len(reasons) == stats.failed
    assert all("(after 1 retries)" in r and "HTTP" not in r for r in reasons), reasons[:3]

    second_log = folder / "restarted.log"
    with vllm_server(tiny_model(), "tiny-qwen2", *CHAT, cpu="0", log=second_log) as url:
        second = interests_stage(store, RUN, catalog, ["articleType"], config(url))
        asked = finished_requests(url)
    print(f"rerun: {second.stats}, {asked} requests")
    assert second.stats.cached + second.stats.resumed == stats.computed, second.stats
    # Only the items the killed server never answered (items with identical inputs share one
    # request, hence a few less); re-asking the 30-odd answered ones would go over.
    assert stats.failed - 5 <= asked <= stats.failed, asked
    assert second.stats.computed + second.stats.failed == stats.failed


def finished_requests(url: str) -> int:
    """Requests the server has finished, from its Prometheus metrics (its access log is
    written after the answer, so the last lines can miss a server stopped right after)."""
    text = httpx.get(url.removesuffix("/v1") + "/metrics", timeout=10).text
    return round(
        sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("vllm:request_success_total")
        )
    )


def test_gme_style_embeddings_against_a_real_pooling_server(tmp_path_factory, tmp_path):
    log = tmp_path_factory.mktemp("vllm") / "embed.log"
    template = str(REPO / "serving" / "gme_chat_template.jinja")
    args = ("--runner", "pooling", "--convert", "embed", "--chat-template", template)
    with vllm_server(tiny_model(), "tiny-gme", *args, cpu="1", log=log) as url:
        config = EmbedConfig(url=url, model="tiny-gme")
        store = ArtifactStore(str(tmp_path))
        started = time.monotonic()
        outcome = embed_stage(store, RUN, items(), ["articleType"], make_embedder(config), config)
        seconds = time.monotonic() - started
    print(f"embed: {outcome.stats} in {seconds:.1f} s ({N / seconds:.1f} items/s)")
    assert outcome.stats.computed == N and outcome.stats.failed == 0, outcome.stats
    assert outcome.model["dim"] == 128  # the tiny model's hidden size
    _, _, x = stage_matrix(store, RUN, outcome, "embedding")
    assert x.shape == (N, 128) and np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-4)
    assert len({json.dumps(np.round(v, 4).tolist()) for v in x}) > N // 2  # not one vector


@pytest.mark.vision
def test_captions_of_item_images_against_a_real_vision_server(tmp_path_factory, tmp_path):
    """A Qwen2-VL-style model with a vision tower; images go as base64 data URLs. Greedy
    decoding of random weights writes only newlines (an empty caption, a per-item error), so
    the test samples (temperature 1, vLLM's `min_tokens` through `extra_body`)."""
    log = tmp_path_factory.mktemp("vllm") / "vision.log"
    # A per-request `seed` kills vLLM 0.32's CPU engine when requests share a batch ("CPU
    # Generator does not use offset"): the server's own seed instead.
    args = ("--limit-mm-per-prompt", '{"image":1,"video":0}', "--seed", "0")
    with_images = sample_items(N)
    model = tiny_model(vision=True)
    with vllm_server(model, "tiny-vl", *args, cpu="1", log=log, vision=True) as url:
        config = CaptionConfig(
            url=url,
            model="tiny-vl",
            max_tokens=48,
            temperature=1.0,
            extra_body={"min_tokens": 8},
        )
        store = ArtifactStore(str(tmp_path))
        started = time.monotonic()
        outcome = caption_stage(store, RUN, with_images, config)
        seconds = time.monotonic() - started
    print(f"caption: {outcome.stats} in {seconds:.1f} s ({N / seconds:.1f} items/s)")
    assert outcome.stats.computed + outcome.stats.failed == N, outcome.stats
    errors = store.read_parquet("runs", RUN.run_id, outcome.errors) if outcome.errors else None
    reasons = errors.column("error").to_pylist() if errors is not None else []
    assert outcome.stats.computed >= N // 2, (outcome.stats, reasons[:3])
    captions = stage_values(store, RUN, outcome, "caption")
    assert len(captions) == outcome.stats.computed and all(captions.values())
