"""fit and assign: codebook sizing, a deterministic RQ-VAE, stable collision suffixes, quality."""

from datetime import date

import numpy as np
import pytest
import torch

from sidpipe.config import TokenizerConfig
from sidpipe.errors import CatalogTooSmallError
from sidpipe.models.rqvae import fit_rqvae
from sidpipe.models.sid_table import assign_sids
from sidpipe.models.sids import gini, level_stats, sid_quality, sid_string
from sidpipe.models.tokenizer import load_tokenizer_state, save_tokenizer, size_codebooks


def clustered(n=600, dim=24, centers=12, seed=0):
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centers, dim)) * 3
    x = c[rng.integers(0, centers, n)] + rng.standard_normal((n, dim)) * 0.5
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_sizes_are_kept_when_the_catalog_is_large_enough():
    assert size_codebooks(200_000, [4096, 2048, 1024], 39, "shrink") == ([4096, 2048, 1024], None)


def test_small_catalog_shrinks_with_a_message_that_says_so():
    sizes, message = size_codebooks(1000, [4096, 2048, 1024], 39, "shrink")
    assert sizes == [25, 25, 25]
    assert "1,000 items cannot fill codebooks 4096/2048/1024" in message
    assert "shrinking to 25/25/25" in message and "small_catalog=refuse" in message


def test_small_catalog_refused_when_asked():
    with pytest.raises(CatalogTooSmallError, match="needs >= 159,744 items"):
        size_codebooks(1000, [4096, 2048, 1024], 39, "refuse")


def test_tiny_catalog_is_always_refused():
    with pytest.raises(CatalogTooSmallError) as error:
        size_codebooks(50, [256], 39, "shrink")
    assert "at least 78 items" in error.value.hint


def settings(**kw) -> TokenizerConfig:
    """A small RQ-VAE: the same settings object the pipeline's config holds."""
    return TokenizerConfig(hidden_dims=[32], latent_dim=8, batch_size=128, **kw)


def fit(x, seed=1, epochs=8, sizes=(8, 8, 8)):
    return fit_rqvae(x, list(sizes), settings(epochs=epochs, seed=seed))


def test_fit_is_deterministic_for_a_seed():
    x = clustered()
    a, _ = fit(x, seed=5)
    b, _ = fit(x, seed=5)
    c, _ = fit(x, seed=6)
    assert np.array_equal(a.encode(x), b.encode(x))
    assert not np.array_equal(a.encode(x), c.encode(x))


def test_fit_uses_its_codebooks_and_reconstructs_better_with_depth():
    x = clustered()
    model, report = fit(x, epochs=50)
    codes = model.encode(x)
    assert codes.shape == (len(x), 3) and codes.dtype == np.int32
    quality = sid_quality(codes, [8, 8, 8])
    assert all(level["utilization"] >= 0.75 for level in quality["levels"])
    cos = model.reconstruction_cosine_by_depth(x)
    assert cos[0] < cos[-1] and cos[-1] > 0.9
    assert report["kmeans_device"] == "cpu" and report["epochs"] == 50


def test_weights_roundtrip_through_safetensors():
    x = clustered()
    model, _ = fit(x)
    weights, config = save_tokenizer(model)
    assert np.array_equal(load_tokenizer_state(weights, config).encode(x), model.encode(x))


def test_a_tokenizer_saved_before_the_per_level_quantizer_still_loads():
    """Earlier versions named the codebooks `codebooks.<level>` (and EMA statistics
    `ema_count_<level>`): such a model.safetensors loads and encodes the same."""
    from safetensors.numpy import load, save

    x = clustered()
    model, _ = fit_rqvae(x, [8, 8], settings(epochs=3, codebook_update="ema", balanced_codes=False))
    weights, config = save_tokenizer(model)
    old_names = {}
    for name, value in load(weights).items():
        if name.startswith("quantizers."):
            _, level, stat = name.split(".")
            name = f"codebooks.{level}" if stat == "codebook" else f"{stat}_{level}"
        old_names[name] = value
    assert "codebooks.1" in old_names and "ema_sum_0" in old_names
    old = load_tokenizer_state(save(old_names), config)
    assert np.array_equal(old.encode(x), model.encode(x))


def test_sid_string_format():
    assert sid_string([12, 7, 901], 0) == "<a_12><b_7><c_901><d_0>"


def test_colliding_items_get_distinct_suffixes():
    codes = np.array([[1, 2, 3], [1, 2, 3], [4, 5, 6], [1, 2, 3]])
    table, _ = assign_sids(["b", "a", "c", "d"], codes, "tok", date(2026, 11, 1))
    rows = {r["item_id"]: r for r in table.to_pylist()}
    assert [rows[i]["suffix"] for i in "abcd"] == [0, 1, 0, 2]  # item_id order within a tuple
    assert rows["a"]["sid"] == "<a_1><b_2><c_3><d_0>"
    assert len(set(table["sid"].to_pylist())) == 4


def test_existing_items_keep_suffix_and_first_assigned_date():
    day1, day2 = date(2026, 11, 1), date(2026, 11, 2)
    first, _ = assign_sids(["b", "c"], np.array([[1, 1], [1, 1]]), "tok", day1)
    # "a" arrives and sorts before b and c, but must not take their suffixes.
    second, _ = assign_sids(
        ["a", "b", "c"], np.array([[1, 1], [1, 1], [1, 1]]), "tok", day2, previous=first
    )
    rows = {r["item_id"]: r for r in second.to_pylist()}
    assert (rows["b"]["suffix"], rows["c"]["suffix"], rows["a"]["suffix"]) == (0, 1, 2)
    assert rows["b"]["first_assigned"] == day1 and rows["a"]["first_assigned"] == day2


def test_newcomers_fill_the_suffixes_that_items_who_left_freed_first():
    day1, day2 = date(2026, 11, 1), date(2026, 11, 2)
    first, _ = assign_sids(["a", "b", "c"], np.array([[1, 1]] * 3), "tok", day1)
    # "a" (suffix 0) left the catalog; "b" and "c" came out with the same codes and keep 1
    # and 2 (no hashes: not kept exactly); "x" and "y" arrive, in item_id order, on 0 and 3.
    second, stats = assign_sids(
        ["y", "c", "x", "b"], np.array([[1, 1]] * 4), "tok", day2, previous=first
    )
    rows = {r["item_id"]: r for r in second.to_pylist()}
    assert [rows[i]["suffix"] for i in "bcxy"] == [1, 2, 0, 3]
    assert rows["b"]["first_assigned"] == day1 and rows["x"]["first_assigned"] == day2
    assert second["item_id"].to_pylist() == ["y", "c", "x", "b"]  # the input's order
    assert second["sid"].to_pylist()[0] == "<a_1><b_1><c_3>"
    assert stats["kept_exactly"] == 0 and stats["encoded"] == 4


def test_a_new_tokenizer_assigns_afresh():
    first, _ = assign_sids(["a"], np.array([[1]]), "tok-1", date(2026, 11, 1))
    second, _ = assign_sids(["a"], np.array([[1]]), "tok-2", date(2026, 11, 2), previous=first)
    assert second["first_assigned"][0].as_py() == date(2026, 11, 2)


def test_quality_metrics():
    assert gini(np.array([5, 5, 5])) == pytest.approx(0.0)
    assert gini(np.array([0, 0, 9])) == pytest.approx(2 / 3)
    uniform = level_stats(np.arange(8).repeat(3), 8)
    assert uniform["perplexity"] == pytest.approx(8) and uniform["utilization"] == 1.0
    half = level_stats(np.array([0, 1, 2, 3]), 8)
    assert half["dead_codes"] == 4 and half["utilization"] == 0.5
    q = sid_quality(np.array([[1, 1], [1, 1], [2, 2]]), [4, 4])
    assert (q["distinct_tuples"], q["max_bucket"]) == (2, 2)
    assert q["unique_item_rate"] == pytest.approx(1 / 3)


def test_unchanged_items_keep_their_row_byte_for_byte_even_if_encoding_differs():
    first, _ = assign_sids(
        ["a", "b"], np.array([[1, 2], [3, 4]]), "tok", date(2026, 11, 1), ["ha", "hb"]
    )
    # Same tokenizer, same content, but pretend the encoder now says otherwise: kept anyway.
    second, stats = assign_sids(
        ["a", "b", "c"],
        np.array([[9, 9], [3, 4], [1, 2]]),
        "tok",
        date(2026, 11, 2),
        ["ha", "hb2", "hc"],
        previous=first,
    )
    rows = {r["item_id"]: r for r in second.to_pylist()}
    assert rows["a"]["codes"] == [1, 2] and rows["a"]["first_assigned"] == date(2026, 11, 1)
    assert rows["b"]["first_assigned"] == date(2026, 11, 1)  # changed content, same codes
    assert rows["c"]["codes"] == [1, 2] and rows["c"]["suffix"] == 1  # "a" holds suffix 0
    assert stats["kept_exactly"] == 1


def nearby_table(options: dict[str, list[tuple[tuple[int, ...], float]]], ids: list[str]):
    """A tokenizer's `nearby_tuples` over fixed per-item (tuple, error) lists (rows index ids)."""

    def nearby(rows, count):
        tuples = np.array([[t for t, _ in options[ids[r]][:count]] for r in rows], np.int32)
        return tuples, np.array([[e for _, e in options[ids[r]][:count]] for r in rows], np.float32)

    return nearby


def test_reassign_keeps_the_item_that_loses_most_and_moves_the_rest_to_free_tuples():
    ids = ["a", "b", "c", "d"]
    codes = np.array([[1, 0], [1, 0], [1, 0], [2, 3]])
    options = {  # "a" loses little by moving, "b" the most; "c" may leave the prefix
        "a": [((1, 0), 1.0), ((1, 1), 2.0), ((2, 3), 2.5)],
        "b": [((1, 0), 0.0), ((1, 1), 9.0), ((1, 2), 9.5)],
        "c": [((1, 0), 0.5), ((2, 3), 0.7), ((1, 1), 4.0)],
        "d": [((2, 3), 0.0), ((2, 2), 1.0), ((1, 0), 3.0)],
    }
    table, stats = assign_sids(
        ids, codes, "tok", date(2026, 11, 1), nearby=nearby_table(options, ids)
    )
    rows = {r["item_id"]: r for r in table.to_pylist()}
    # "b" stays; "a" takes (1, 1); "c"'s other tuples are taken (by "d" and "a"), so it keeps
    # its own with a suffix.
    assert [rows[i]["codes"] for i in "abd"] == [[1, 1], [1, 0], [2, 3]]
    assert rows["b"]["suffix"] == 0 and rows["c"]["codes"] == [1, 0] and rows["c"]["suffix"] == 1
    assert stats["reassigned"] == 1


def test_reassign_never_takes_a_kept_items_tuple():
    first, _ = assign_sids(["z"], np.array([[1, 1]]), "tok", date(2026, 11, 1), item_hashes=["h"])
    ids = ["z", "a", "b"]
    options = {i: [((1, 1), 0.0), ((1, 2), 1.0), ((3, 0), 2.0)] for i in ids}
    table, stats = assign_sids(
        ids,
        np.array([[1, 1], [1, 1], [1, 2]]),
        "tok",
        date(2026, 11, 2),
        item_hashes=["h", "ha", "hb"],
        previous=first,
        nearby=nearby_table(options, ids),
    )
    rows = {r["item_id"]: r for r in table.to_pylist()}
    assert rows["z"]["codes"] == [1, 1] and rows["z"]["suffix"] == 0  # kept exactly
    # "a" must leave (1, 1); (1, 2) is "b"'s, so it takes (3, 0).
    assert rows["a"]["codes"] == [3, 0] and rows["b"]["codes"] == [1, 2]
    assert all(rows[i]["suffix"] == 0 for i in ids) and stats["reassigned"] == 1


def test_reassign_leaves_an_item_on_a_suffix_when_every_free_tuple_costs_too_much():
    ids = ["a", "b", "c"]
    codes = np.array([[1, 0], [1, 0], [1, 0]])
    options = {  # "a" stays (it loses most); "b"'s free tuple is close, "c"'s far
        "a": [((1, 0), 0.1), ((5, 5), 0.9), ((6, 6), 1.0)],
        "b": [((1, 0), 0.2), ((1, 1), 0.21), ((2, 2), 0.3)],
        "c": [((1, 0), 0.1), ((1, 1), 0.12), ((3, 3), 0.15)],
    }
    table, stats = assign_sids(
        ids, codes, "tok", date(2026, 11, 1), nearby=nearby_table(options, ids), max_loss=0.02
    )
    rows = {r["item_id"]: r for r in table.to_pylist()}
    # "b" takes (1, 1) (+0.01); then "c"'s nearest free tuple, (3, 3), would cost +0.05.
    assert [rows[i]["codes"] for i in "abc"] == [[1, 0], [1, 1], [1, 0]]
    assert [rows[i]["suffix"] for i in "abc"] == [0, 0, 1]
    assert (stats["reassigned"], stats["reassign_declined"]) == (1, 1)
    unlimited, stats = assign_sids(
        ids, codes, "tok", date(2026, 11, 1), nearby=nearby_table(options, ids), max_loss=None
    )
    assert unlimited.to_pylist()[2]["codes"] == [3, 3] and stats["reassign_declined"] == 0


def test_nearby_tuples_are_the_lowest_error_completions():
    from sidpipe.models.quantizer import nearby_tuples

    rng = np.random.default_rng(0)
    first, last = rng.standard_normal((12, 6)), rng.standard_normal((10, 6))
    residual, head = rng.standard_normal((4, 6)), np.array([[7], [7], [8], [9]])
    tuples, errors = nearby_tuples(head, residual, [first, last], count=5, beam=12)
    brute = ((residual[:, None, None] - first[None, :, None] - last[None, None]) ** 2).sum(-1)
    assert tuples.shape == (4, 5, 3) and (tuples[:, :, 0] == head).all()
    assert np.allclose(errors, np.sort(brute.reshape(4, -1), axis=1)[:, :5], atol=1e-4)
    picked = brute[np.arange(4)[:, None], tuples[:, :, 1], tuples[:, :, 2]]
    assert np.allclose(picked, errors, atol=1e-4)
    narrow, _ = nearby_tuples(head, residual, [first, last], count=5, beam=1)
    assert (narrow[:, :, 1] == narrow[:, :1, 1]).all()  # beam 1: the second level is fixed


def test_drift_report_counts_changed_sids_per_level():
    from sidpipe.models.sid_table import drift_report

    old, _ = assign_sids(
        ["a", "b", "c", "d"], np.array([[1, 1], [1, 2], [2, 1], [2, 2]]), "t1", date(2026, 11, 1)
    )
    new, _ = assign_sids(
        ["a", "b", "c", "d"], np.array([[1, 1], [1, 3], [3, 1], [2, 2]]), "t2", date(2026, 11, 2)
    )
    drift = drift_report(old, new)
    assert drift["sid_changed"] == 0.5 and drift["code_changed_per_level"] == [0.25, 0.25]
    assert (drift["from_tokenizer"], drift["to_tokenizer"]) == ("t1", "t2")


def test_rqkmeans_fits_encodes_and_roundtrips():
    from sidpipe.models.rqkmeans import fit_rqkmeans

    x = clustered()
    model, report = fit_rqkmeans(x, [8, 8, 8], TokenizerConfig(kmeans_iterations=10, seed=3))
    codes = model.encode(x)
    assert codes.shape == (len(x), 3) and report["method"] == "rqkmeans"
    cos = model.reconstruction_cosine_by_depth(x)
    assert cos[0] < cos[-1]
    weights, config = save_tokenizer(model)
    assert np.array_equal(load_tokenizer_state(weights, config).encode(x), codes)
    tuples, errors = model.nearby_tuples(x[:5])
    rebuilt = model.decode(tuples.reshape(-1, 3)).reshape(5, tuples.shape[1], -1)
    assert tuples.shape == (5, 32, 3) and (tuples[:, :, 0] == codes[:5, None, 0]).all()
    share = ((x[:5, None] - rebuilt) ** 2).sum(-1) / ((x[:5] - model.mean) ** 2).sum(-1)[:, None]
    assert np.allclose(errors, share, rtol=1e-3, atol=1e-5)  # a share of the centred norm
    assert report["kmeans_dim_steps"] == 10  # progressive-dimension k-means, the default


def long_tailed(n, dim, seed):
    """Zipf-sized clusters of log-normal spreads: where full-dimension k-means gets stuck."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, 201) ** 1.1
    centers = rng.standard_normal((200, dim))
    spread = np.exp(rng.normal(-1.0, 0.5, 200))
    member = rng.choice(200, n, p=weights / weights.sum())
    x = centers[member] + spread[member, None] * rng.standard_normal((n, dim))
    return x.astype(np.float32)


def test_progressive_dimension_kmeans_finds_better_codebooks_on_a_long_tail():
    """The reason `kmeans_dim_steps` defaults to 10: on long-tailed data, k-means grown from the
    principal axes ends with lower error and more codes in use than k-means on all dimensions."""
    from sidpipe.models.quantizer import kmeans

    def error_and_perplexity(x, centroids):
        dist = ((x[:, None, :] - centroids[None]) ** 2).sum(-1)
        share = np.bincount(dist.argmin(1), minlength=len(centroids)) / len(x)
        share = share[share > 0]
        return dist.min(1).mean(), np.exp(-(share * np.log(share)).sum())

    errors = {1: [], 10: []}
    for seed in range(3):
        x = long_tailed(4000, 32, seed)
        plain, progressive = (
            error_and_perplexity(x, kmeans(x, 64, 10, seed, s)[0]) for s in (1, 10)
        )
        assert progressive[1] > plain[1]  # more codes in use
        errors[1].append(plain[0])
        errors[10].append(progressive[0])
    assert np.mean(errors[10]) < 0.98 * np.mean(errors[1])
    # Fewer rows than dimensions (faiss's PCA cannot) fall back to plain k-means.
    few = long_tailed(100, 384, 0)
    assert np.array_equal(kmeans(few, 8, 10, 0, 10)[0], kmeans(few, 8, 10, 0, 1)[0])


def test_bad_vectors_are_screened_with_reasons():
    from sidpipe.models.tokenizer import screen_embeddings

    x = np.ones((6, 4), np.float32)
    x[1, 2] = np.nan
    x[2] = 0
    x[3] = 1e6
    x[4, 0] = np.inf
    keep, rejects = screen_embeddings(list("abcdef"), x)
    assert keep == [0, 5]
    reasons = dict(rejects)
    assert "NaN" in reasons["b"] and "zero vector" in reasons["c"]
    assert "median" in reasons["d"] and "infinite" in reasons["e"]


def test_mixed_dimensions_are_a_clear_error():
    from sidpipe.errors import EmbeddingInputError
    from sidpipe.models.tokenizer import stack_embeddings

    with pytest.raises(
        EmbeddingInputError,
        match=r"different dimensions: 2 \(1 rows, e.g. b\), "
        r"3 \(2 rows, e.g. a\)",
    ):
        stack_embeddings([[1, 2, 3], [1, 2], [4, 5, 6]], ["a", "b", "c"])


def test_rqvae_stops_early_on_the_held_out_split_and_keeps_the_best_epoch():
    x = clustered(800)
    model, report = fit_rqvae(x, [8, 8, 8], settings(epochs=400, patience=3, seed=1))
    assert report["epochs"] < 400
    assert 0 <= report["best_epoch"] == report["epochs"] - 1 - 3
    assert "validation" in report["final_losses"]


def test_rqkmeans_refinement_lowers_the_reconstruction_error():
    from sidpipe.models.rqkmeans import fit_rqkmeans

    x = clustered(600, centers=30)
    model, report = fit_rqkmeans(
        x, [8, 8, 8], TokenizerConfig(kmeans_iterations=5, refine_rounds=4)
    )
    errors = report["mse_by_round"]
    assert len(errors) == 5 and min(errors) < errors[0]
    kept = float(np.mean(np.sum((x - model.decode(model.encode(x))) ** 2, axis=1)))
    assert kept == pytest.approx(min(errors), rel=1e-5)  # the best round's codebooks are kept


def test_rqvae_codes_are_identical_across_processes():
    """Two processes, same data and seed, same codes (in-process repeats hid a threading
    nondeterminism once)."""
    import subprocess
    import sys

    script = (
        "import hashlib, numpy as np\n"
        "from test_tokenizer import clustered\n"
        "from sidpipe.config import TokenizerConfig\n"
        "from sidpipe.models.rqvae import fit_rqvae\n"
        "x = clustered(3000, dim=48, centers=60)\n"
        "s = TokenizerConfig(hidden_dims=[128], latent_dim=16, epochs=6, batch_size=256, seed=5)\n"
        "m, _ = fit_rqvae(x, [16, 16, 16], s)\n"
        "print(hashlib.sha256(m.encode(x).tobytes()).hexdigest())\n"
    )
    here = str(__import__("pathlib").Path(__file__).parent)
    runs = {
        subprocess.run(
            [sys.executable, "-c", script], cwd=here, capture_output=True, text=True, check=True
        ).stdout.strip()
        for _ in range(2)
    }
    assert len(runs) == 1


def test_ema_codebooks_learn_without_gradients_and_survive_a_roundtrip():
    x = clustered()
    model, report = fit_rqvae(x, [8, 8, 8], settings(epochs=30, seed=2, codebook_update="ema"))
    assert not any(q.codebook.requires_grad for q in model.quantizers)
    assert model.quantizers[0].ema_count.sum() > 0  # moving statistics were kept
    cos = model.reconstruction_cosine_by_depth(x)
    assert cos[-1] > 0.8
    weights, saved = save_tokenizer(model)
    assert np.array_equal(load_tokenizer_state(weights, saved).encode(x), model.encode(x))
    # Restarted codes take a fresh count, not the dead code's history.
    level = model.quantizers[1]
    level.ema_count[:] = 0.0
    level.reset_ema(torch.tensor([2, 3]))
    assert level.ema_count[2] == 1.0 and torch.equal(level.ema_sum[3], level.codebook.data[3])


def test_the_fit_stage_reads_embeddings_a_block_at_a_time_and_fits_the_same(
    tmp_path, hash_embedder, monkeypatch
):
    """The fit stage never loads the whole embedding matrix: it spills the stage cache to a
    local file a part at a time and reads it back in blocks (here of 64 rows) for screening,
    the fit's sample and the quality report; the tokenizer and its report are the ones the
    whole matrix gives."""
    from conftest import sample_items

    from sidpipe.config import EmbedConfig
    from sidpipe.models.tokenizer import screen_embeddings
    from sidpipe.storage import spill
    from sidpipe.storage.hashing import hash_strings
    from sidpipe.storage.manifest import utcnow
    from sidpipe.storage.store import ArtifactStore
    from sidpipe.tasks import stage as stage_module
    from sidpipe.tasks.embed import embed_stage
    from sidpipe.tasks.fit import fit_stage
    from sidpipe.tasks.fitting import fit_and_store
    from sidpipe.tasks.stage import RunInfo, stage_matrix

    store = ArtifactStore(str(tmp_path / "store"))
    run = RunInfo(run_id="r", run_date=date(2026, 11, 1), catalog="c", started_at=utcnow())
    embed = embed_stage(store, run, sample_items(300), [], hash_embedder, EmbedConfig())
    config = TokenizerConfig(
        method="rqkmeans", codebook_sizes=[8, 8, 8], min_points_per_code=4, fit_sample_size=150
    )
    ids, hashes, x = stage_matrix(store, run, embed, "embedding")
    keep, _ = screen_embeddings(ids, x)
    whole_store = ArtifactStore(str(tmp_path / "whole"))
    whole = fit_and_store(
        whole_store,
        x[keep],
        config,
        embed=embed.model | {"key": embed.key},
        data_hash=hash_strings([hashes[i] for i in keep]),
        trained_on={"run_id": run.run_id, "catalog": run.catalog},
    )

    def whole_matrix(*args):
        raise AssertionError("the fit stage read the whole matrix")

    monkeypatch.setattr(stage_module, "stage_matrix", whole_matrix)
    monkeypatch.setattr(spill, "BLOCK_ROWS", 64)
    outcome = fit_stage(store, run, embed, config)
    assert outcome.tokenizer_id == whole.tokenizer_id
    reports = [
        s.read_json("tokenizers", outcome.tokenizer_id, "fit_report.json")
        for s in (store, whole_store)
    ]
    assert reports[0]["quality"] == reports[1]["quality"]


def test_the_fit_stage_quarantines_broken_vectors_under_their_own_item_ids(tmp_path, hash_embedder):
    """Screening holds row numbers, not ids: a rejected row must still be reported as its item,
    and the tokenizer must be the one fitted on the rest."""
    from conftest import sample_items

    from sidpipe.config import EmbedConfig
    from sidpipe.storage.hashing import hash_strings
    from sidpipe.storage.manifest import utcnow
    from sidpipe.storage.store import ArtifactStore
    from sidpipe.tasks.embed import embed_stage
    from sidpipe.tasks.fit import fit_stage
    from sidpipe.tasks.fitting import fit_and_store
    from sidpipe.tasks.stage import RunInfo, stage_matrix, staging_dir

    items = sample_items(200, images=False)
    rows = items.to_pylist()
    broken = {rows[7]["item_id"]: np.nan, rows[50]["item_id"]: 0.0, rows[123]["item_id"]: 1e5}
    by_title = {row["title"]: broken[row["item_id"]] for row in rows if row["item_id"] in broken}
    embed_good = hash_embedder.embed

    def embed(inputs, progress=None):
        out, info = embed_good(inputs, progress)
        hit = [(row, v) for row, i in enumerate(inputs) for t, v in by_title.items() if t in i.text]
        assert len(hit) == len(broken)  # the titles pick out exactly the three items
        for row, value in hit:
            out[row] = value
        return out, info

    hash_embedder.embed = embed
    store = ArtifactStore(str(tmp_path / "store"))
    run = RunInfo(run_id="r", run_date=date(2026, 11, 1), catalog="c", started_at=utcnow())
    embed_outcome = embed_stage(store, run, items, [], hash_embedder, EmbedConfig())
    config = TokenizerConfig(method="rqkmeans", codebook_sizes=[8, 8], min_points_per_code=4)
    outcome = fit_stage(store, run, embed_outcome, config)

    errors = store.read_parquet(*staging_dir(run.run_id), outcome.errors).to_pylist()
    reasons = {row["item_id"]: row["error"] for row in errors}
    assert set(reasons) == set(broken) and outcome.stats.failed == 3
    assert "NaN" in reasons[rows[7]["item_id"]] and "zero" in reasons[rows[50]["item_id"]]
    assert "median" in reasons[rows[123]["item_id"]]
    ids, hashes, x = stage_matrix(store, run, embed_outcome, "embedding")
    good = [row for row, item_id in enumerate(ids) if item_id not in broken]
    alone = fit_and_store(
        ArtifactStore(str(tmp_path / "alone")),
        x[good],
        config,
        embed=embed_outcome.model | {"key": embed_outcome.key},
        data_hash=hash_strings([hashes[row] for row in good]),
        trained_on={"run_id": run.run_id, "catalog": run.catalog},
    )
    assert outcome.tokenizer_id == alone.tokenizer_id


def test_the_fit_stage_reads_kept_rows_across_chunks_in_order():
    import pyarrow as pa

    from sidpipe.tasks.fit import _rows

    column = pa.chunked_array([["a", "b", "c"], [], ["d", "e"], ["f"]])
    assert list(_rows(column, np.array([0, 2, 3, 4, 5]), block=2)) == ["a", "c", "d", "e", "f"]
    assert list(_rows(column, np.array([1, 5]), block=1)) == ["b", "f"]
    assert list(_rows(column, np.array([], np.int64))) == []
