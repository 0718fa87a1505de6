"""The same stages against real vLLM servers and a real GPU, where they exist.

Skipped unless pointed at live servers (on a GPU host, after `docker compose --profile gpu up`):
    SIDPIPE_TEST_CAPTION_URL=http://localhost:8001/v1 \\
    SIDPIPE_TEST_INTERESTS_URL=http://localhost:8002/v1 \\
    SIDPIPE_TEST_EMBED_URL=http://localhost:8003/v1 python -m pytest tests/test_live_servers.py
"""

import os
from datetime import date

import numpy as np
import pytest
from conftest import sample_items

from sidpipe.config import CaptionConfig, EmbedConfig, InterestsConfig
from sidpipe.storage.manifest import utcnow
from sidpipe.storage.store import ArtifactStore
from sidpipe.tasks.caption import caption_stage
from sidpipe.tasks.embed import embed_stage, make_embedder
from sidpipe.tasks.interests import interests_stage
from sidpipe.tasks.stage import RunInfo, stage_matrix, stage_values


def live(name: str) -> str:
    url = os.environ.get(f"SIDPIPE_TEST_{name}_URL")
    if not url:
        pytest.skip(f"no live server (set SIDPIPE_TEST_{name}_URL)")
    return url


def sample(n=8):
    return sample_items(n)


RUN = RunInfo(run_id="live", run_date=date(2026, 11, 1), catalog="c", started_at=utcnow())


def test_live_caption_and_interests(tmp_path):
    store = ArtifactStore(str(tmp_path))
    caption = caption_stage(store, RUN, sample(), CaptionConfig(url=live("CAPTION")))
    assert caption.stats.computed == 8, caption.stats
    captions = stage_values(store, RUN, caption, "caption")
    assert all(len(c.split()) >= 5 for c in captions.values())
    interests = interests_stage(
        store,
        RUN,
        sample(),
        ["articleType"],
        InterestsConfig(url=live("INTERESTS")),
        captions=captions,
    )
    assert interests.stats.computed == 8, interests.stats


def test_live_gme_embeddings(tmp_path):
    config = EmbedConfig(url=live("EMBED"))
    store = ArtifactStore(str(tmp_path))
    outcome = embed_stage(store, RUN, sample(), ["articleType"], make_embedder(config), config)
    assert outcome.stats.computed == 8 and outcome.model["dim"] in (1536, 3584)
    _, _, x = stage_matrix(store, RUN, outcome, "embedding")
    assert np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-4)


@pytest.mark.gpu
def test_faiss_kmeans_runs_on_the_gpu_when_there_is_one():
    faiss = pytest.importorskip("faiss")
    if not hasattr(faiss, "get_num_gpus") or faiss.get_num_gpus() == 0:
        pytest.skip("no GPU faiss (faiss-cpu silently ignores gpu=True)")
    from sidpipe.models.quantizer import kmeans

    x = np.random.default_rng(0).standard_normal((20_000, 64)).astype(np.float32)
    centroids, device = kmeans(x, 256, 10, seed=1)
    assert device == "gpu" and centroids.shape == (256, 64)
