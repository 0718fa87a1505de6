"""The generative recommender's parts: token space, trie, constrained decoding, metrics, SASRec."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sidpipe.models.genrec import BOS, GenRecConfig, GenRecModel, TokenSpace
from sidpipe.models.sasrec import SASRec, SASRecConfig
from sidpipe.models.sid_decoding import SidTrie, beam_search, score_items
from sidpipe.tasks.training.loop import cosine_with_warmup

SPACE = TokenSpace(codebook_sizes=(4, 4, 4), suffix_size=2, user_buckets=8)
TINY = GenRecConfig(
    d_model=32, heads=2, head_dim=16, encoder_layers=1, decoder_layers=1, feedforward=64, dropout=0
)


def tiny_model() -> GenRecModel:
    return GenRecModel(SPACE, TINY, max_source=256, max_target=64)


def catalog(n: int = 40, seed: int = 0) -> tuple[list[list[int]], list[str]]:
    """n distinct SIDs (codes + suffix) drawn at random: a sparse part of the 4x4x4x2 space."""
    rng = np.random.default_rng(seed)
    picked = rng.choice(4 * 4 * 4 * 2, n, replace=False)
    sids = [[int(x // 32), int(x // 8 % 4), int(x // 2 % 4), int(x % 2)] for x in picked]
    return [SPACE.sid_tokens(s[:3], s[3]) for s in sids], [f"item-{i}" for i in range(n)]


def test_token_space_gives_every_level_its_own_range():
    tokens = SPACE.sid_tokens([3, 0, 2], 1)
    assert tokens == [
        SPACE.sid_start + 3,
        SPACE.sid_start + 4,
        SPACE.sid_start + 10,
        SPACE.sid_start + 13,
    ]
    assert SPACE.sid_end == SPACE.sid_start + 4 + 4 + 4 + 2
    assert (
        SPACE.user("u1") == SPACE.user("u1")
        and SPACE.user_start <= SPACE.user("u9") < SPACE.sid_start
    )


def test_trie_refuses_two_items_with_one_sid():
    seqs, ids = catalog(5)
    with pytest.raises(ValueError, match="share SID"):
        SidTrie(SPACE, [*seqs, seqs[0]], [*ids, "dup"])


def test_constrained_beam_search_returns_only_catalog_items_and_matches_exact_scores():
    torch.manual_seed(0)
    seqs, ids = catalog(40)
    trie = SidTrie(SPACE, seqs, ids)
    model = tiny_model().eval()
    source = torch.randint(SPACE.sid_start, SPACE.sid_end, (3, 9))
    # With as many beams as items, the beam search is exhaustive: it must rank every item
    # exactly as scoring each item's SID does.
    tokens, scores = beam_search(model, source, trie, beams=40)
    exact = score_items(model, source, torch.tensor(seqs))
    for b in range(3):
        found = [trie.item(tuple(t)) for t in tokens[b].tolist()]
        assert None not in found and len(set(found)) == 40
        order = [ids[i] for i in exact[b].argsort(descending=True).tolist()]
        assert found == order
        np.testing.assert_allclose(
            scores[b].numpy(), exact[b].sort(descending=True).values.numpy(), atol=1e-4
        )


def test_more_beams_than_catalog_items_leave_the_rest_empty():
    seqs, ids = catalog(6)
    tokens, scores = beam_search(
        tiny_model().eval(), torch.full((1, 3), BOS), SidTrie(SPACE, seqs, ids), 10
    )
    assert torch.isfinite(scores[0, :6]).all() and torch.isinf(scores[0, 6:]).all()


def test_unconstrained_decoding_can_name_items_that_do_not_exist():
    torch.manual_seed(1)
    seqs, ids = catalog(10)
    trie = SidTrie(SPACE, seqs, ids)
    tokens, _ = beam_search(tiny_model().eval(), torch.full((4, 3), BOS), None, 20)
    invalid = sum(trie.item(tuple(t)) is None for t in tokens.view(-1, 4).tolist())
    assert invalid > 0  # 10 of 128 possible SIDs exist: an untrained model mostly misses them


def test_the_model_learns_a_next_item_rule():
    """Item i is always followed by item i+1: a few hundred steps must make that the top beam."""
    torch.manual_seed(0)
    seqs, ids = catalog(24, seed=3)
    trie = SidTrie(SPACE, seqs, ids)
    model = tiny_model()
    task = SPACE.task("next_sid")
    sources = torch.tensor([[task, SPACE.user("u"), *seqs[i]] for i in range(23)])
    targets = torch.tensor([seqs[i + 1] for i in range(23)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        loss = model(sources, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    tokens, _ = beam_search(model.eval(), sources, trie, 10)
    top1 = [trie.item(tuple(t[0])) for t in tokens.tolist()]
    assert top1 == ids[1:24]


def test_the_learning_rate_decays_with_the_steps_or_the_clock_whichever_is_ahead():
    assert cosine_with_warmup(4, warmup=10, total=100) == pytest.approx(0.5)
    assert cosine_with_warmup(10, warmup=10, total=100) == pytest.approx(1.0)
    assert cosine_with_warmup(100, warmup=10, total=100) == pytest.approx(0.1)  # the floor
    # 10% of the steps but half the time budget gone: decayed as if half-way.
    half = cosine_with_warmup(19, warmup=10, total=100, clock=0.5)
    assert half == pytest.approx(0.55) == cosine_with_warmup(55, warmup=10, total=100)
    assert cosine_with_warmup(19, warmup=10, total=100, clock=1.7) == pytest.approx(0.1)


def test_sasrec_handles_left_padding_and_learns():
    torch.manual_seed(0)
    model = SASRec(30, SASRecConfig(d_model=32, heads=2, layers=1, dropout=0), max_history=6)
    history = torch.tensor([[0, 0, 0, 1, 2, 3], [0, 5, 6, 7, 8, 9]])
    targets = torch.tensor([[0, 0, 0, 2, 3, 4], [0, 6, 7, 8, 9, 10]])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(100):
        loss = model(history, targets)
        assert torch.isfinite(loss)
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < first / 5
    scores = model.eval().scores(history)
    assert scores.argmax(1).tolist() == [3, 9]  # item ids 4 and 10 are at index 3 and 9


def test_a_text_task_needs_one_item_with_every_text_it_reads():
    from sidpipe.models.genrec_recommender import _fed

    # Some item has a caption and some other item a title, but none has both: nothing to train.
    assert not _fed("caption_to_title", {"caption": [[5], []], "title": [[], [7]]})
    assert _fed("caption_to_title", {"caption": [[5], [6]], "title": [[], [7]]})
    assert not _fed("interests_to_sid", {"title": [[1]]})  # no interests column at all


def test_sasrec_ranks_and_reads_an_unseen_item_by_its_content_neighbours():
    from sidpipe.models.recommender import RecData
    from sidpipe.models.sasrec import SASRecRecommender

    rng = np.random.default_rng(5)
    n = 20
    content = rng.standard_normal((n, 8)).astype(np.float32)
    content[3] = content[10] + 0.01  # item 3's content twin is item 10
    sequences = [
        np.array([i, (i + 1) % n, (i + 2) % n, (i + 5) % n, 3]) for i in range(n) if i != 1
    ]
    sequences = [s for s in sequences if 3 not in s[:-2]]  # item 3 is never a training item
    data = RecData(
        item_ids=[f"i{k:02d}" for k in range(n)],
        codes=np.zeros((n, 1), np.int64),
        suffix=np.zeros(n, np.int64),
        codebook_sizes=(1,),
        users=[str(u) for u in range(len(sequences))],
        sequences=sequences,
        embeddings=content,
    )
    config = SASRecConfig(d_model=16, heads=2, layers=1, dropout=0)
    net = SASRecRecommender(config, data, max_history=4).module
    assert net.unseen[3] and not net.unseen[10] and net.neighbour_index[3, 0] == 10
    table = net.ranking_table()
    assert torch.allclose(table[4], net.item.weight[11], atol=1e-3)  # rows are 1-based
    seen = [i + 1 for i in range(n) if not net.unseen[i]]
    assert torch.equal(table[seen], net.item.weight[seen])
    history = torch.tensor([[0, 0, 2, 4]])  # item 3 (id 4) read in a history: as its twin's row
    twin = torch.tensor([[0, 0, 2, 11]])
    assert torch.allclose(net.eval().scores(history), net.scores(twin), atol=1e-3)
    own = SASRecRecommender(config.model_copy(update={"unseen_items": "own"}), data, 4).module
    assert not len(own.neighbour_index) and torch.equal(own.ranking_table(), own.item.weight)
