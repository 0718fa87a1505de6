"""A few items far longer than the rest must not set what the tokenizer learns."""

import numpy as np
import pytest

from sidpipe.config import TokenizerConfig
from sidpipe.models.tokenizer import fit_tokenizer, reconstruction_cosine, typical_rows


def catalog_with_outliers(n=1000, dim=24, outliers=10, seed=0):
    """Clustered unit vectors; `outliers` rows scaled by 50-500x (items, not broken vectors)."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((12, dim)) * 3
    x = centers[rng.integers(0, 12, n)] + rng.standard_normal((n, dim)) * 0.5
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    far = rng.choice(n, outliers, replace=False)
    x[far] *= rng.uniform(50, 500, (outliers, 1))
    return x.astype(np.float32), far


@pytest.mark.parametrize("method", ["rqvae", "rqkmeans"])
def test_huge_rows_are_left_out_of_the_fit_but_encoded(method):
    x, far = catalog_with_outliers()
    normal = np.setdiff1d(np.arange(len(x)), far)
    quality = {}
    for ratio in (10.0, 1000.0):  # 1000: the screening limit, so every row is fitted
        config = TokenizerConfig(
            method=method,
            hidden_dims=[32],
            latent_dim=8,
            batch_size=128,
            epochs=15,
            min_points_per_code=1,
            fit_max_norm_ratio=ratio,
        )
        tokenizer, report = fit_tokenizer(x, [8, 8, 8], config)
        assert report["left_out_of_fit"] == (len(far) if ratio == 10 else 0)
        codes = tokenizer.encode(x)
        assert codes.shape == (len(x), 3)  # the outliers are encoded too
        quality[ratio] = reconstruction_cosine(tokenizer, x[normal], codes[normal])
    # Ten rows in a thousand must not cost everyone else their reconstruction (measured:
    # RQ-VAE 0.42 -> 0.90, RQ-KMeans, whose 8 codes the outliers took, 0.83 -> 0.99).
    assert quality[10.0] > quality[1000.0] + 0.1, quality


def test_only_the_rqvae_leaves_huge_rows_out_by_default():
    # Measured at 65,536 x 256 with 4,096 first-level codes: the RQ-VAE's cosine fell from 0.87
    # to 0.43 with 0.1% of rows at 50-500x the norm; RQ-KMeans gave those rows codes of their
    # own and lost nothing, so it fits on every row unless told otherwise.
    assert TokenizerConfig(method="rqvae").max_norm_ratio == 10
    assert TokenizerConfig(method="rqkmeans").max_norm_ratio is None
    assert TokenizerConfig(method="rqkmeans", fit_max_norm_ratio=5).max_norm_ratio == 5


def test_typical_rows_keeps_everything_when_too_few_would_be_left():
    x = np.ones((10, 3), np.float32)
    x[:6] *= 100  # most rows are "huge": the median moves with them
    assert len(typical_rows(x, 10.0, at_least=1)) == 10
    x[:2] *= 100
    assert typical_rows(x, 10.0, at_least=1).tolist() == list(range(2, 10))
    assert len(typical_rows(x, 10.0, at_least=9)) == 10
    assert len(typical_rows(x, None, at_least=1)) == 10
