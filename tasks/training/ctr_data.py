"""CTR samples for every click model, one protocol (DIN's, on review data), drawn once.

A review is a click. Per user, chronological: the last click is the test positive, the one before
it the validation positive, every earlier click after the first a training positive (a click
needs at least one earlier click as history). Each positive is paired with `negatives` items the
user never clicked, drawn uniformly from the catalog with a fixed seed. History = the user's at
most `max_history` clicks before the positive (the same for its negatives).

The rows are drawn once and stored as Parquet under `training/aktrec/samples/<key>/`, the key
hashing the published run, the interactions file, and every protocol setting: every model, seed
and ablation, in this run and later ones, scores exactly the same rows. Pure apart from that
store: nothing here imports Prefect.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from sidpipe.errors import TrainingDataError
from sidpipe.storage.hashing import stable_hash
from sidpipe.storage.layout import EMBEDDINGS_FILE, training_dir
from sidpipe.storage.published import read_published_table
from sidpipe.storage.store import ArtifactStore
from sidpipe.tasks.training.data import TrainingData

log = logging.getLogger(__name__)
SAMPLES_FILE = "samples.parquet"
SPLITS = ("train", "valid", "test")


@dataclass
class CTRRows:
    """One split's rows: who, at which click of theirs, which item, clicked or not."""

    user: np.ndarray  # [N] user index
    position: np.ndarray  # [N] index of the positive in the user's sequence (its history ends)
    item: np.ndarray  # [N] item index
    label: np.ndarray  # [N] 1 click, 0 sampled non-click

    def __len__(self) -> int:
        return len(self.item)

    def take(self, rows: np.ndarray) -> CTRRows:
        return CTRRows(self.user[rows], self.position[rows], self.item[rows], self.label[rows])


@dataclass
class CTRData:
    """Everything a click model trains and is scored on."""

    training: TrainingData  # the published items (SIDs) and the users' sequences
    splits: dict[str, CTRRows]
    item_clicks: np.ndarray  # [items] training clicks per item (head/tail, activity)
    user_clicks: np.ndarray  # [users] training clicks per user (activity)
    content: np.ndarray | None  # [items, D] published embeddings (None: not published)
    max_history: int
    samples_key: str
    _histories: dict = field(default_factory=dict, repr=False)

    def split_history(self, split: str) -> np.ndarray:
        """`history` of a whole split, built once (every model and seed reads the same)."""
        if split not in self._histories:
            self._histories[split] = self.history(self.splits[split])
        return self._histories[split]

    def history(self, rows: CTRRows) -> np.ndarray:
        """[N, max_history] item indices before each row's click, oldest first, left-padded
        with -1."""
        sequences = self.training.data.sequences
        # A click and its negatives share a history: build each (user, position) once.
        pairs, inverse = np.unique(
            np.stack([rows.user, rows.position], 1), axis=0, return_inverse=True
        )
        out = np.full((len(pairs), self.max_history), -1, np.int64)
        for r, (u, p) in enumerate(pairs.tolist()):
            hist = sequences[u][max(0, p - self.max_history) : p]
            if len(hist):
                out[r, self.max_history - len(hist) :] = hist
        return out[inverse.reshape(-1)]


def draw_samples(
    sequences: list[np.ndarray], n_items: int, negatives: int, seed: int
) -> dict[str, CTRRows]:
    """The protocol's rows: per user and positive, `negatives` never-clicked items."""
    rng = np.random.default_rng(seed)
    cols = {s: ([], [], [], []) for s in SPLITS}
    for u, seq in enumerate(sequences):
        n = len(seq)
        clicked = set(seq.tolist())
        if n_items - len(clicked) < negatives:
            continue  # a user who clicked (almost) everything has no negatives to draw
        for p in range(1, n):
            split = "test" if p == n - 1 else "valid" if p == n - 2 else "train"
            users, positions, items, labels = cols[split]
            drawn: list[int] = []
            while len(drawn) < negatives:
                for candidate in rng.integers(0, n_items, size=2 * negatives).tolist():
                    if candidate not in clicked and candidate not in drawn:
                        drawn.append(candidate)
                        if len(drawn) == negatives:
                            break
            for item, label in ((seq[p], 1), *((d, 0) for d in drawn)):
                users.append(u)
                positions.append(p)
                items.append(int(item))
                labels.append(label)
    return {
        s: CTRRows(*(np.asarray(c, np.int64) for c in cols[s][:3]), np.asarray(cols[s][3], np.int8))
        for s in SPLITS
    }


def load_ctr_data(
    store: ArtifactStore, training: TrainingData, max_history: int, negatives: int, seed: int
) -> CTRData:
    """The samples for this published run and interactions (drawn and stored on first use)."""
    data = training.data
    key = stable_hash(
        {
            "published": training.published,
            "users": data.users,
            "sequences": [s.tolist() for s in data.sequences],
            "negatives": negatives,
            "seed": seed,
        },
        16,
    )
    where = (*training_dir("aktrec", "samples"), key)
    if store.exists(*where, SAMPLES_FILE):
        table = store.read_parquet(*where, SAMPLES_FILE)
        splits = {
            s: CTRRows(
                *(np.asarray(part[c].to_numpy(), np.int64) for c in ("user", "position", "item")),
                np.asarray(part["label"].to_numpy(), np.int8),
            )
            for s in SPLITS
            for part in [table.filter(pa.compute.equal(table["split"], s))]
        }
    else:
        splits = draw_samples(data.sequences, data.n_items, negatives, seed)
        table = pa.concat_tables(
            pa.table(
                {
                    "split": pa.array([s] * len(rows), pa.string()),
                    "user": rows.user,
                    "position": rows.position,
                    "item": rows.item,
                    "label": rows.label,
                }
            )
            for s, rows in splits.items()
        )
        store.write_parquet(table, *where, SAMPLES_FILE)
    if not len(splits["train"]):
        raise TrainingDataError("no training clicks: every user needs 3 or more interactions")
    train = splits["train"]
    clicked = train.label == 1
    item_clicks = np.bincount(train.item[clicked], minlength=data.n_items)
    user_clicks = np.bincount(train.user[clicked], minlength=len(data.users))
    log.info(
        "CTR samples %s: %s",
        key,
        ", ".join(f"{s} {len(rows):,} rows" for s, rows in splits.items()),
    )
    return CTRData(
        training,
        splits,
        item_clicks,
        user_clicks,
        published_embeddings(store, training, data.item_ids),
        max_history,
        key,
    )


def published_embeddings(
    store: ArtifactStore, training: TrainingData, item_ids: list[str]
) -> np.ndarray | None:
    """The published embedding of every item, in item order (None: the run published none)."""
    from sidpipe.storage.published import resolve_run

    manifest = resolve_run(store, training.published["catalog"], training.published["run_date"])
    if "embeddings" not in manifest.files:
        log.warning(
            "%s/%s has no %s (published before sidpipe published embeddings): no content view",
            manifest.catalog,
            manifest.run_date,
            EMBEDDINGS_FILE,
        )
        return None
    table = read_published_table(store, manifest, "embeddings")
    dim = table.schema.field("embedding").type.list_size
    matrix = np.asarray(table["embedding"].combine_chunks().values, np.float32).reshape(-1, dim)
    position = {item: i for i, item in enumerate(table["item_id"].to_pylist())}
    missing = [i for i in item_ids if i not in position]
    if missing:
        raise TrainingDataError(f"{EMBEDDINGS_FILE} lacks {len(missing)} items, e.g. {missing[:3]}")
    return matrix[[position[i] for i in item_ids]]
