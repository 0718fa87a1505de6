"""The evaluator's metrics, checked against values worked out by hand."""

import numpy as np
import pytest

from sidpipe.tasks.training.metrics import (
    auc,
    by_bucket,
    ctr_metrics,
    gauc,
    logloss,
    popularity_buckets,
    ranking_metrics,
)


def test_recall_and_ndcg_count_hits_within_k_and_discount_by_rank():
    m = ranking_metrics(np.array([0, 4, 5, 9, -1]))
    assert m["recall@5"] == pytest.approx(2 / 5) and m["recall@10"] == pytest.approx(4 / 5)
    assert m["ndcg@5"] == pytest.approx((1 + 1 / np.log2(6)) / 5)


def test_auc_is_the_share_of_positive_negative_pairs_ordered_right_ties_half():
    assert auc(np.array([1, 0, 1, 0]), np.array([0.9, 0.1, 0.8, 0.2])) == 1.0
    assert auc(np.array([1, 0, 1, 0]), np.array([0.1, 0.9, 0.2, 0.8])) == 0.0
    # pairs (p, n): (0.8, 0.5) right, (0.8, 0.8) tie, (0.3, 0.5) wrong, (0.3, 0.8) wrong
    assert auc(np.array([1, 0, 1, 0]), np.array([0.8, 0.5, 0.3, 0.8])) == pytest.approx(1.5 / 4)
    assert np.isnan(auc(np.array([1, 1]), np.array([0.2, 0.3])))


def test_gauc_weights_users_by_impressions_and_skips_one_class_users():
    users = np.array(["a", "a", "a", "a", "b", "b", "c", "c"])
    labels = np.array([1, 0, 0, 0, 1, 0, 1, 1])
    scores = np.array([0.9, 0.1, 0.2, 0.3, 0.2, 0.7, 0.5, 0.6])
    # a: AUC 1 over 4 impressions; b: AUC 0 over 2; c: only clicks, skipped
    result = gauc(users, labels, scores)
    assert result["gauc"] == pytest.approx((1 * 4 + 0 * 2) / 6)
    assert result["gauc_users_skipped"] == 1


def test_logloss_and_the_ctr_bundle():
    labels, p = np.array([1, 0]), np.array([0.8, 0.4])
    assert logloss(labels, p) == pytest.approx(-(np.log(0.8) + np.log(0.6)) / 2)
    assert set(ctr_metrics(np.array(["u", "u"]), labels, p)) == {
        "auc",
        "gauc",
        "gauc_users_skipped",
        "logloss",
    }


def test_metrics_split_by_item_popularity():
    buckets = popularity_buckets(np.arange(10)[::-1])
    assert buckets.tolist() == [0, 0, 1, 1, 1, 2, 2, 2, 2, 2]
    ranks = np.array([0, -1, 3, -1, -1, -1, -1, -1, -1, 12])
    split = by_bucket(ranking_metrics, buckets, ranks, count="users")
    assert split["head"]["users"] == 2 and split["head"]["recall@5"] == 0.5
    assert split["torso"]["recall@5"] == pytest.approx(1 / 3) and split["tail"]["recall@10"] == 0.0
