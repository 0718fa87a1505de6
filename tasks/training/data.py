"""Training data from published artifacts only (never a model stage), and the protocol's splits.

Reads the catalog's published run (`_MANIFEST.json` -> `sids.parquet`, `items.parquet`,
`enrichment.parquet` when captions or interests were published; each checked against its
sha256) and an interactions table (`user_id`, `item_id`, `timestamp`). Interactions with items
the SID table does not know are dropped and counted.

Cold items (`cold_item_share` > 0): a seeded share of the items is removed from every user's
training part (all but the last two items), so no model sees them in training, as input or as
target; they stay validation and test targets (and the validation item stays in the test
history). Users left with fewer than 3 interactions are dropped and counted.

The protocol (leave-one-out): per user, chronological order; the last item is the test target,
the one before it the validation target, the rest is training (every prefix predicts its next
item); at most `max_history` items of history; users with fewer than 3 interactions are left
out. Pure: reads the store, returns arrays; nothing here imports Prefect.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sidpipe.errors import TrainingDataError
from sidpipe.models.item_text import description_text
from sidpipe.models.recommender import TEXT_FIELDS, Examples, RecData
from sidpipe.models.sid_table import code_matrix
from sidpipe.storage.layout import TOKENIZER_CONFIG, tokenizer_dir
from sidpipe.storage.published import read_published_table, resolve_run, run_ref
from sidpipe.storage.store import ArtifactStore, open_filesystem
from sidpipe.tasks.training.config import DataConfig

log = logging.getLogger(__name__)


@dataclass
class TrainingData:
    data: RecData
    published: dict  # catalog, run_date, run_id, tokenizer_id of the SIDs used
    dropped_interactions: int
    cold_dropped_users: int = 0  # users left with < 3 interactions once cold items went

    def popularity(self) -> np.ndarray:
        """Training interactions per item (validation and test items excluded)."""
        counts = np.zeros(self.data.n_items, np.int64)
        for seq in self.data.sequences:
            np.add.at(counts, seq[:-2], 1)
        return counts


def read_interactions(uri: str) -> pa.Table:
    fs, path = open_filesystem(uri)
    try:
        with fs.open(path, "rb") as handle:
            table = pq.read_table(io.BytesIO(handle.read()))
    except FileNotFoundError:
        raise TrainingDataError(f"{uri}: interactions file not found") from None
    except Exception as exc:  # noqa: BLE001 - any reader error: one clear message
        raise TrainingDataError(f"{uri}: not a readable Parquet file: {exc}") from None
    missing = {"user_id", "item_id", "timestamp"} - set(table.column_names)
    if missing:
        raise TrainingDataError(f"{uri}: interactions need columns {sorted(missing)}")
    return table.select(["user_id", "item_id", "timestamp"]).cast(
        pa.schema([("user_id", pa.string()), ("item_id", pa.string()), ("timestamp", pa.int64())]),
        safe=False,
    )


def _item_texts(store: ArtifactStore, manifest, item_ids: list[str]) -> dict[str, list]:
    """Per item: title, attributes (description and attribute columns), caption, interests."""
    by_id = {
        row["item_id"]: row for row in read_published_table(store, manifest, "items").to_pylist()
    }
    attributes = manifest.inputs.get("attribute_columns", [])
    enrichment = {}
    if "enrichment" in manifest.files:
        table = read_published_table(store, manifest, "enrichment")
        enrichment = {row["item_id"]: row for row in table.to_pylist()}
    texts: dict[str, list] = {f: [] for f in TEXT_FIELDS}
    for item_id in item_ids:
        row = by_id.get(item_id, {})
        extra = enrichment.get(item_id, {})
        texts["title"].append(row.get("title"))
        texts["attributes"].append(description_text(row, attributes))
        texts["caption"].append(extra.get("caption"))
        interests = extra.get("interests")
        texts["interests"].append(", ".join(interests) if interests else None)
    return texts


def _user_sort_key(user: str):
    """Numeric ids in numeric order (Beauty's users are 1..22363), others as text."""
    return (0, int(user), "") if user.isdigit() else (1, 0, user)


def check_inputs(store: ArtifactStore, config: DataConfig) -> None:
    """Seconds, before Prefect starts: the published run resolves, the interactions file exists
    and has the columns and types the protocol needs (its schema only is read)."""
    resolve_run(store, config.catalog, config.run_date)
    fs, path = open_filesystem(config.interactions)
    try:
        found = fs.exists(path)
    except Exception as exc:  # noqa: BLE001 - no credentials, no bucket: one clear message
        raise TrainingDataError(f"{config.interactions}: cannot read it: {exc}") from None
    if not found:
        raise TrainingDataError(f"{config.interactions}: interactions file not found")
    try:
        with fs.open(path, "rb") as handle:
            schema = pq.read_schema(handle)
    except Exception as exc:  # noqa: BLE001 - any reader error: one clear message
        raise TrainingDataError(
            f"{config.interactions}: not a readable Parquet file: {exc}"
        ) from None
    missing = {"user_id", "item_id", "timestamp"} - set(schema.names)
    if missing:
        raise TrainingDataError(
            f"{config.interactions}: interactions need columns {sorted(missing)}"
        )
    when = schema.field("timestamp").type
    if not (pa.types.is_integer(when) or pa.types.is_timestamp(when)):
        raise TrainingDataError(
            f"{config.interactions}: timestamp is {when}, not an integer or a timestamp"
        )


def load_training_data(store: ArtifactStore, config: DataConfig) -> TrainingData:
    manifest = resolve_run(store, config.catalog, config.run_date)
    sids = read_published_table(store, manifest, "sids").sort_by("item_id")
    item_ids = sids["item_id"].to_pylist()
    levels = len(sids["codes"][0]) if len(sids) else 0  # every row holds every level
    codes = code_matrix(sids["codes"], levels).astype(np.int64)
    tokenizer = store.read_json(*tokenizer_dir(manifest.tokenizer_id), TOKENIZER_CONFIG)
    observed = tuple(int(codes[:, level].max()) + 1 for level in range(codes.shape[1]))

    interactions = read_interactions(config.interactions)
    index = {item: i for i, item in enumerate(item_ids)}
    known = pc.is_in(interactions["item_id"], value_set=pa.array(item_ids, pa.string()))
    dropped = interactions.num_rows - pc.sum(known).as_py()
    if dropped:
        log.warning("%d interactions name items without a published SID: dropped", dropped)
    interactions = interactions.filter(known).sort_by(
        [("user_id", "ascending"), ("timestamp", "ascending")]
    )
    users, sequences = [], []
    user_col = interactions["user_id"].to_numpy(zero_copy_only=False)
    item_col = np.array([index[i] for i in interactions["item_id"].to_pylist()], np.int64)
    boundaries = np.flatnonzero(user_col[1:] != user_col[:-1]) + 1
    starts = np.concatenate([[0], boundaries]) if len(user_col) else np.array([], np.int64)
    ends = np.concatenate([boundaries, [len(user_col)]]) if len(user_col) else starts
    order = sorted(range(len(starts)), key=lambda k: _user_sort_key(user_col[starts[k]]))
    for k in order:
        seq = item_col[starts[k] : ends[k]]
        if len(seq) >= 3:  # a training item, a validation item, a test item
            users.append(str(user_col[starts[k]]))
            sequences.append(seq)
        if config.users_limit and len(users) >= config.users_limit:
            break
    if not users:
        raise TrainingDataError(f"{config.interactions}: no user has 3 or more interactions")

    cold, dropped_users = None, 0
    if config.cold_item_share > 0:
        cold, users, sequences, dropped_users = hold_out_cold(
            len(item_ids), users, sequences, config.cold_item_share, config.cold_item_seed
        )
    data = RecData(
        item_ids=item_ids,
        codes=codes,
        suffix=np.array(sids["suffix"].to_pylist(), np.int64),
        codebook_sizes=tuple(tokenizer.get("codebook_sizes", observed)),
        users=users,
        sequences=sequences,
        text=_item_texts(store, manifest, item_ids),
        embeddings=_embeddings(store, manifest, item_ids),
        cold=cold,
    )
    return TrainingData(data, run_ref(manifest), dropped, dropped_users)


def _embeddings(store: ArtifactStore, manifest, item_ids: list[str]) -> np.ndarray | None:
    """The published content embeddings in item order (None: a run published before them)."""
    if "embeddings" not in manifest.files:
        return None
    table = read_published_table(store, manifest, "embeddings")
    row = {item: i for i, item in enumerate(table["item_id"].to_pylist())}
    vectors = np.asarray(table["embedding"].combine_chunks().flatten(), np.float32)
    vectors = vectors.reshape(table.num_rows, -1)
    missing = [i for i in item_ids if i not in row]
    if missing:
        raise TrainingDataError(
            f"published embeddings lack {len(missing)} items with SIDs (first: {missing[0]})"
        )
    return vectors[[row[i] for i in item_ids]]


def hold_out_cold(
    n_items: int, users: list[str], sequences: list[np.ndarray], share: float, seed: int
) -> tuple[np.ndarray, list[str], list[np.ndarray], int]:
    """(cold mask, users, sequences, users dropped): `round(share * n_items)` items drawn with
    `seed` leave every training part; users left with fewer than 3 items are dropped."""
    cold = np.zeros(n_items, bool)
    picked = np.random.default_rng(seed).choice(n_items, round(share * n_items), replace=False)
    cold[picked] = True
    kept_users, kept = [], []
    for user, seq in zip(users, sequences, strict=True):
        train = seq[:-2]
        seq = np.concatenate([train[~cold[train]], seq[-2:]])
        if len(seq) >= 3:
            kept_users.append(user)
            kept.append(seq)
    return cold, kept_users, kept, len(users) - len(kept)


def split(data: RecData, max_history: int, which: str) -> Examples:
    """The protocol's examples: `train` (every position before the last two), `valid` (the
    second to last item) or `test` (the last item)."""
    users, histories, targets = [], [], []
    for u, seq in enumerate(data.sequences):
        n = len(seq)
        if which == "train":
            positions = range(1, n - 2)
        else:
            positions = [n - 2] if which == "valid" else [n - 1]
        for t in positions:
            hist = seq[max(0, t - max_history) : t]
            row = np.full(max_history, -1, np.int64)
            row[max_history - len(hist) :] = hist
            users.append(u)
            histories.append(row)
            targets.append(seq[t])
    return Examples(
        np.array(users, np.int64),
        np.array(histories, np.int64).reshape(-1, max_history),
        np.array(targets, np.int64),
    )
