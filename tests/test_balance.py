"""Balanced code assignment: prices that undo a collapsed level, saved with the tokenizer, and an
encoding that stays a per-item function (the same codes in any batch or shard)."""

import numpy as np
import torch

from sidpipe.config import TokenizerConfig
from sidpipe.models.balance import (
    CAPACITY,
    augmented,
    balanced_kmeans,
    calibrate_prices,
    is_balanced,
    priced_nearest,
)
from sidpipe.models.rqkmeans import _nearest, fit_rqkmeans
from sidpipe.models.rqvae import fit_rqvae
from sidpipe.models.sids import sid_quality
from sidpipe.models.tokenizer import load_tokenizer_state, save_tokenizer


def collapsing(n=4000, dim=32, k=64, seed=0):
    """Short, isotropic residuals and codewords of very different norms: nearest-codeword
    assignment sends nearly everyone to the few shortest codewords (a deep level's collapse)."""
    g = torch.Generator().manual_seed(seed)
    x = 0.05 * torch.randn(n, dim, generator=g)
    codebook = torch.randn(k, dim, generator=g) / dim**0.5 * torch.linspace(0.02, 0.5, k)[:, None]
    return x, codebook


def loads(codes: torch.Tensor, k: int) -> torch.Tensor:
    return torch.bincount(codes, minlength=k).float()


def test_zero_prices_are_plain_nearest_codeword():
    x, codebook = collapsing()
    dist = torch.cdist(x, codebook)
    chosen = priced_nearest(x, codebook, torch.zeros(len(codebook)))
    # Each row gets a nearest codeword; cdist and the matrix product round differently, so an
    # exact near-tie may go either way (it did, about one run in five).
    assert torch.allclose(dist.gather(1, chosen[:, None])[:, 0], dist.min(dim=1).values, atol=1e-6)
    assert (chosen == dist.argmin(dim=1)).float().mean() > 0.999


def test_prices_undo_a_collapsed_level():
    x, codebook = collapsing()
    k = len(codebook)
    before = loads(priced_nearest(x, codebook, torch.zeros(k)), k)
    assert (before > 0).float().mean() < 0.7  # a third of the codes unused
    assert before.max() > 4 * len(x) / k  # and one takes 4x its share
    # The default capacity (3x a code's share, priced on a sample): the crowded codes shed load.
    after = loads(priced_nearest(x, codebook, calibrate_prices(x, codebook, seed=1)), k)
    assert after.max() < min(before.max() * 0.8, (CAPACITY + 1) * len(x) / k)
    # At 1x its share, the load is spread over nearly every code.
    even = calibrate_prices(x, codebook, seed=1, capacity=1.0)
    after = loads(priced_nearest(x, codebook, even), k)
    assert (after > 0).float().mean() > 0.85
    assert after.max() < 2 * len(x) / k
    assert (even >= 0).all()  # only codes over their capacity are priced


def test_balancing_is_on_by_default_where_it_measured_better():
    assert TokenizerConfig(method="rqkmeans").balanced
    assert not TokenizerConfig(method="rqvae").balanced
    assert TokenizerConfig(method="rqvae", balanced_codes=True).balanced


def test_calibration_is_deterministic():
    x, codebook = collapsing()
    assert torch.equal(calibrate_prices(x, codebook, seed=3), calibrate_prices(x, codebook, 3))


def test_faiss_with_an_augmented_codebook_finds_the_priced_code():
    x, codebook = collapsing(n=2000)
    prices = calibrate_prices(x, codebook, seed=1)
    by_torch = priced_nearest(x, codebook, prices).numpy()
    by_faiss = _nearest(codebook.numpy(), x.numpy(), prices=prices.numpy())
    assert (by_faiss == by_torch).mean() > 0.999  # float rounding may flip an exact near-tie
    assert augmented(codebook.numpy(), prices.numpy()).shape == (len(codebook), x.shape[1] + 1)


def test_balanced_kmeans_keeps_every_code_in_use():
    x, codebook = collapsing()
    book, prices, codes = balanced_kmeans(x, codebook, rounds=2, seed=0)
    assert book.shape == codebook.shape and prices.shape == (len(codebook),)
    assert torch.equal(codes, priced_nearest(x, book, prices))
    assert (loads(codes, len(book)) > 0).float().mean() > 0.95  # moved codewords: all in use


def long_tailed(n=3000, dim=16, seed=0):
    """A few huge tight clusters and many small ones: deep levels collapse without balancing."""
    rng = np.random.default_rng(seed)
    sizes = (n * (1.0 / np.arange(1, 61) ** 1.2) / (1.0 / np.arange(1, 61) ** 1.2).sum()).astype(
        int
    )
    parts = [
        rng.standard_normal(dim) + np.exp(rng.normal(-2, 1)) * rng.standard_normal((s, dim))
        for s in sizes
        if s
    ]
    x = np.concatenate(parts).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_balanced_rqkmeans_spreads_deep_levels_and_roundtrips():
    x = long_tailed()
    sizes = [16, 16, 16]
    plain, _ = fit_rqkmeans(x, sizes, TokenizerConfig(balanced_codes=False, seed=2))
    balanced, report = fit_rqkmeans(x, sizes, TokenizerConfig(balanced_codes=True, seed=2))
    assert report["balanced"]
    q_plain, q_bal = sid_quality(plain.encode(x), sizes), sid_quality(balanced.encode(x), sizes)
    for level in (1, 2):
        assert q_bal["levels"][level]["perplexity"] > q_plain["levels"][level]["perplexity"]
    assert q_bal["distinct_tuple_rate"] > q_plain["distinct_tuple_rate"]
    weights, config = save_tokenizer(balanced)
    loaded = load_tokenizer_state(weights, config)
    assert np.array_equal(loaded.encode(x), balanced.encode(x))
    # The first level is plain k-means; the others carry prices.
    assert [p is None for p in loaded.prices] == [not is_balanced(i) for i in range(3)]


def test_codes_do_not_depend_on_the_batch_an_item_is_encoded_in():
    """Shards encode independently and must agree with one pass over everything."""
    x = long_tailed()
    sizes = [16, 16, 16]
    for fit in (fit_rqkmeans, fit_rqvae):
        settings = TokenizerConfig(hidden_dims=[32], latent_dim=8, epochs=3, balanced_codes=True)
        model, _ = fit(x, sizes, settings)
        whole = model.encode(x)
        shards = np.concatenate([model.encode(x[i : i + 700]) for i in range(0, len(x), 700)])
        assert np.array_equal(whole, shards)


def test_rqkmeans_encodes_in_blocks_what_a_level_by_level_search_finds():
    """encode reuses one buffer block after block (priced levels one column wider); each level's
    codes are still the priced nearest codewords of what the levels before left."""
    x = long_tailed()
    model, _ = fit_rqkmeans(x, [16, 16, 16], TokenizerConfig(balanced_codes=True, seed=2))
    codes = model.encode(x.astype(np.float16), batch_size=333)
    residual = x.astype(np.float16).astype(np.float32) - model.mean
    for level, book in enumerate(model.codebooks):
        assert np.array_equal(codes[:, level], _nearest(book, residual, prices=model.prices[level]))
        residual = residual - book[codes[:, level]]
    assert model.encode(x[:0]).shape == (0, 3)


def test_balanced_rqvae_saves_prices_for_deep_levels_and_roundtrips():
    x = long_tailed()
    settings = TokenizerConfig(
        hidden_dims=[32], latent_dim=8, epochs=4, batch_size=256, balanced_codes=True
    )
    model, _ = fit_rqvae(x, [16, 16, 16], settings)
    weights, config = save_tokenizer(model)
    assert config["balanced"]
    prices = [name for name in model.state_dict() if name.endswith("prices")]
    assert prices == ["quantizers.1.prices", "quantizers.2.prices"]
    assert np.array_equal(load_tokenizer_state(weights, config).encode(x), model.encode(x))
