"""Decoding SIDs: the catalog's SIDs as a prefix trie, constrained beam search, exact scoring.

Works with any encoder-decoder that offers `encode(source)`, `cross_kv(memory, repeat)`,
`decode(...)` and a `space` (`models.genrec.TokenSpace`): the beam search can only return SIDs
of real items when given the trie, and `score_items` ranks every item exactly, to check it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sidpipe.models.genrec import BOS, GenRecModel, TokenSpace


class SidTrie:
    """Valid SID token sequences (every level and the suffix) and the item each one names."""

    def __init__(self, space: TokenSpace, sequences: list[list[int]], item_ids: list[str]):
        self.space = space
        self.length = space.sid_length
        self.items: dict[tuple[int, ...], str] = {}
        children: dict[tuple[int, ...], set[int]] = {}
        for seq, item in zip(sequences, item_ids, strict=True):
            key = tuple(seq)
            if len(key) != self.length:
                raise ValueError(f"item {item}: SID has {len(key)} tokens, expected {self.length}")
            if key in self.items:
                raise ValueError(f"items {self.items[key]} and {item} share SID tokens {key}")
            self.items[key] = item
            for depth in range(self.length):
                children.setdefault(key[:depth], set()).add(key[depth])
        # Allowed next tokens, relative to sid_start, as tensors for masking.
        self._allowed = {
            prefix: torch.tensor(sorted(t - space.sid_start for t in tokens))
            for prefix, tokens in children.items()
        }

    def allowed(self, prefix: tuple[int, ...]) -> torch.Tensor:
        return self._allowed.get(prefix, torch.empty(0, dtype=torch.long))

    def item(self, sequence: tuple[int, ...]) -> str | None:
        return self.items.get(sequence)


@torch.no_grad()
def beam_search(
    model: GenRecModel,
    source: torch.Tensor,
    trie: SidTrie | None,
    beams: int = 20,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The `beams` most likely SIDs for each source row: (tokens [B, beams, L], log-probs
    [B, beams]), best first. With a trie only catalog SIDs can come out (beams that cannot be
    filled get -inf); without one, any token of the right level can (to measure invalid SIDs).

    Scores are sums of log-softmax over all SID tokens of each level (no renormalisation over
    the allowed ones), as Hugging Face's constrained generation does."""
    space = model.space
    device = source.device
    memory, padding = model.encode(source)
    batch = source.shape[0]
    vocab_sid = space.sid_end - space.sid_start
    level_bounds = []
    for offset, size in zip(space.level_offsets(), space.level_sizes, strict=True):
        level_bounds.append((offset - space.sid_start, offset - space.sid_start + size))

    cross_kv = model.cross_kv(memory, repeat=beams)  # projected once, not at every step
    padding = padding.repeat_interleave(beams, 0)
    tokens = torch.full((batch * beams, 1), BOS, dtype=torch.long, device=device)
    scores = torch.full((batch, beams), float("-inf"), device=device)
    scores[:, 0] = 0.0  # one live beam per row at the start
    sid_columns = slice(space.sid_start, space.sid_end)
    for depth in range(space.sid_length):
        logits = model.decode(tokens, None, padding, cross_kv, columns=sid_columns, last_only=True)[
            :, -1
        ]
        logp = F.log_softmax(logits.float(), dim=-1)
        if trie is None:
            mask = torch.full_like(logp, float("-inf"))
            lo, hi = level_bounds[depth]
            mask[:, lo:hi] = 0.0
        else:
            # Built on the CPU in one indexing op and moved once: a transfer per beam row
            # would dominate decoding on a GPU.
            allowed = [trie.allowed(tuple(prefix)) for prefix in tokens[:, 1:].tolist()]
            rows_of = torch.repeat_interleave(
                torch.arange(len(allowed)), torch.tensor([len(a) for a in allowed])
            )
            mask = torch.full(logp.shape, float("-inf"))
            mask[rows_of, torch.cat(allowed)] = 0.0
            mask = mask.to(device)
        candidates = (scores.view(-1, 1) + logp + mask).view(batch, beams * vocab_sid)
        scores, flat = candidates.topk(beams, dim=-1)
        parent = flat // vocab_sid
        token = flat % vocab_sid + space.sid_start
        rows = (torch.arange(batch, device=device)[:, None] * beams + parent).view(-1)
        tokens = torch.cat([tokens[rows], token.view(-1, 1)], dim=1)
    return tokens[:, 1:].view(batch, beams, -1), scores


@torch.no_grad()
def score_items(
    model: GenRecModel, source: torch.Tensor, item_tokens: torch.Tensor, chunk: int = 4096
) -> torch.Tensor:
    """Exact log-probability of every item for each source row: [B, n_items]. The same scores
    as beam_search's (log-softmax over all SID tokens per level): ranking all items by them is
    what a perfect beam search would return. O(B x items): a check, not the way to serve."""
    space = model.space
    memory, padding = model.encode(source)
    batch, n_items = source.shape[0], item_tokens.shape[0]
    out = torch.empty(batch, n_items, device=source.device)
    for start in range(0, n_items, chunk):
        items = item_tokens[start : start + chunk]  # [C, L]
        c = items.shape[0]
        target_in = F.pad(items[:, :-1], (1, 0), value=BOS)
        for b in range(batch):
            logits = model.decode(
                target_in,
                memory[b : b + 1].expand(c, -1, -1),
                padding[b : b + 1].expand(c, -1),
                columns=slice(space.sid_start, space.sid_end),
            )
            logp = F.log_softmax(logits.float(), dim=-1)
            picked = logp.gather(-1, (items - space.sid_start).unsqueeze(-1)).squeeze(-1)
            out[b, start : start + c] = picked.sum(-1)
    return out
