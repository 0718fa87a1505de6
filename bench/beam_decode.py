"""Constrained beam search: projecting only the SID columns of the last position vs. the whole
vocabulary at every position (what decoding did before, and what a naive decoder does).

The model is `beauty-cpu`'s size with random weights (speed does not depend on training), over
a Beauty-sized catalog: 12,101 items with random 3 x 256 codes and collision suffixes. With
text tasks (`--text-vocab 30522`, the WordPiece vocabulary multitask training embeds) the
vocabulary is ~30x the SID tokens. Both ways must return the same beams; prints the wall time
of each, the ratio and the machine.

    python bench/beam_decode.py [--users 512] [--text-vocab 30522] [--threads 2]
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

from sidpipe.models.genrec import GenRecModel, TokenSpace
from sidpipe.models.sid_decoding import SidTrie, beam_search
from sidpipe.tasks.training.config import load_train_config


class WholeVocabularyDecoder(GenRecModel):
    """The baseline: logits for every token at every position, sliced afterwards."""

    def decode(self, *args, columns=slice(None), last_only=False, **kwargs):
        return super().decode(*args, **kwargs)[:, :, columns]


def catalog(items: int, rng: np.random.Generator) -> tuple[list[list[int]], list[int]]:
    """Random 3 x 256 codes; items that share them get suffixes 0, 1, ... as in publishing."""
    codes = rng.integers(0, 256, size=(items, 3)).tolist()
    seen: dict[tuple, int] = {}
    suffixes = []
    for row in codes:
        suffixes.append(seen.get(tuple(row), 0))
        seen[tuple(row)] = suffixes[-1] + 1
    return codes, suffixes


def timed(model, sources, trie, beams) -> tuple[float, list[torch.Tensor]]:
    started, out = time.perf_counter(), []
    for source in sources:
        out.append(beam_search(model, source, trie, beams)[0])
    return time.perf_counter() - started, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=512)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--items", type=int, default=12_101)
    parser.add_argument("--text-vocab", type=int, default=30_522)
    parser.add_argument("--beams", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)

    codes, suffixes = catalog(args.items, rng)
    space = TokenSpace((256, 256, 256), suffix_size=max(suffixes) + 1, text_vocab=args.text_vocab)
    sequences = [space.sid_tokens(c, s) for c, s in zip(codes, suffixes, strict=True)]
    trie = SidTrie(space, sequences, [str(i) for i in range(args.items)])
    config = load_train_config("beauty-cpu").model  # its model section: the model's own config
    sizes = {"max_source": 256, "max_target": 64}
    fast = GenRecModel(space, config, **sizes).eval()
    slow = WholeVocabularyDecoder(space, config, **sizes).eval()
    slow.load_state_dict(fast.state_dict())

    items = np.asarray(sequences)
    sources = []
    for start in range(0, args.users, args.batch):
        n = min(args.batch, args.users - start)
        history = items[rng.integers(0, args.items, size=(n, 20))].reshape(n, -1)
        head = np.column_stack([np.full(n, space.task("next_sid")), np.full(n, space.user("u"))])
        sources.append(torch.from_numpy(np.column_stack([head, history])))

    timed(fast, sources[:1], trie, args.beams)  # warm-up
    t_slow, out_slow = timed(slow, sources, trie, args.beams)
    t_fast, out_fast = timed(fast, sources, trie, args.beams)
    same = all(torch.equal(a, b) for a, b in zip(out_slow, out_fast, strict=True))
    vocab = space.text_start + space.text_vocab
    print(
        f"{args.users} users, {args.beams} beams, {args.items:,} items, vocabulary {vocab:,} "
        f"({space.sid_end - space.sid_start:,} SID tokens)"
    )
    print(f"  whole vocabulary, every position: {t_slow:7.2f} s")
    print(f"  SID columns, last position:       {t_fast:7.2f} s   {t_slow / t_fast:.1f}x faster")
    print(f"  same beams: {same}")
    print(
        f"machine: {platform.machine()} CPU, {torch.get_num_threads()} threads, {platform.node()}"
    )


if __name__ == "__main__":
    main()
