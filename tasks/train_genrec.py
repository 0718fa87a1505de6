"""Train and evaluate the generative recommender (or SASRec) on published SIDs.

`train_recommender` trains with early stopping on validation NDCG@10 and writes the best
weights (safetensors) and the learning curve; `evaluate_recommender` reloads them and computes,
on the test users, Recall@5/10 and NDCG@5/10 (constrained beam search for the generative model,
exact ranking for SASRec), the invalid-SID rate of unconstrained decoding, metrics by item
popularity (head/torso/tail) and a check of the beam search against exact scores of every item.
Both read the data again (`tasks.train_data.prepare_data`, seconds) and talk through the store:
`<store>/training/genrec/<run_id>/` holds config.json, model.safetensors, history.json,
metrics.json and predictions.parquet.
"""

from __future__ import annotations

import copy
import logging
import math
import platform
import time
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from sidpipe.config import GenRecTrainConfig
from sidpipe.models.genrec import (
    EOS,
    PAD,
    GenRecModel,
    GenRecModelConfig,
    SidTrie,
    TokenSpace,
    beam_search,
    cosine_with_warmup,
    count_parameters,
    score_items,
)
from sidpipe.models.sasrec import SASRec, SASRecConfig
from sidpipe.storage.store import ArtifactStore
from sidpipe.tasks.train_data import TASK_FIELDS, GenRecData, Split, prepare_data, splits

log = logging.getLogger(__name__)
KS = (5, 10)
TITLE_PIECES_PER_HISTORY_ITEM = 12  # history titles -> next SID: the first word pieces of each


def training_dir(run_id: str) -> tuple[str, ...]:
    return ("training", "genrec", run_id)


def pick_device(config: GenRecTrainConfig) -> torch.device:
    if config.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda asked for, but torch sees no CUDA GPU")
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(config.device)


# -- batches -------------------------------------------------------------------------------------
def _pad(rows: list[list[int]]) -> torch.Tensor:
    """Right-pad token rows with PAD into one tensor."""
    out = torch.full((len(rows), max(len(r) for r in rows)), PAD, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def next_sid_sources(data: GenRecData, split: Split, rows: np.ndarray) -> torch.Tensor:
    """[task, user, SIDs of the history items, oldest first] (padding masked by the encoder)."""
    space = data.space
    padded = np.vstack([np.zeros((1, space.sid_length), np.int64), data.sid_tokens])
    history = padded[split.history[rows] + 1].reshape(len(rows), -1)  # -1 -> the PAD row
    users = np.array([space.user(data.users[u]) for u in split.user[rows]], np.int64)
    task = np.full(len(rows), space.task("next_sid"), np.int64)
    return torch.from_numpy(np.column_stack([task, users, history]))


def history_titles_sources(
    data: GenRecData, split: Split, rows: np.ndarray, titles: int
) -> torch.Tensor:
    space, title = data.space, data.text["title"]
    sources = []
    for r in rows:
        recent = [h for h in split.history[r] if h >= 0][-titles:]
        pieces = [p for h in recent for p in (title[h] or [])[:TITLE_PIECES_PER_HISTORY_ITEM]]
        sources.append([space.task("history_titles_to_sid"), space.user(data.users[split.user[r]])])
        sources[-1] += pieces
    return _pad(sources)


def item_task_batch(data: GenRecData, task_name: str, items: np.ndarray):
    """Source and target of an item-level task (title -> SID, SID -> title, ...)."""
    source_field, target_field = TASK_FIELDS[task_name]
    space = data.space
    sources, targets = [], []
    for i in items:
        src = data.sid_tokens[i].tolist() if source_field is None else data.text[source_field][i]
        tgt = (
            data.sid_tokens[i].tolist()
            if target_field is None
            else [*data.text[target_field][i], EOS]
        )
        sources.append([space.task(task_name), *src])
        targets.append(tgt)
    return _pad(sources), _pad(targets)


class TaskSampler:
    """Batches of the configured tasks, each step's task drawn uniformly (TriAlignGR's TMT)."""

    def __init__(self, data: GenRecData, train: Split, config: GenRecTrainConfig, seed: int):
        self.data, self.train, self.config = data, train, config
        self.rng = np.random.default_rng(seed)
        self.pools: dict[str, np.ndarray] = {}
        for name in data.tasks:
            if name in ("next_sid", "history_titles_to_sid"):
                self.pools[name] = np.arange(len(train.target))
            else:
                fields = [f for f in TASK_FIELDS[name] if f]
                ok = [i for i in range(data.n_items) if all(data.text[f][i] for f in fields)]
                self.pools[name] = np.array(ok, np.int64)
        self._orders = {name: iter(()) for name in self.pools}

    @property
    def steps_per_epoch(self) -> int:
        """Enough steps that next_sid sees each training window about once per epoch."""
        windows = math.ceil(len(self.train.target) / self.config.batch_size)
        return windows * len(self.pools)

    def _take(self, name: str) -> np.ndarray:
        picked = []
        while len(picked) < self.config.batch_size:
            try:
                picked.append(next(self._orders[name]))
            except StopIteration:
                self._orders[name] = iter(self.rng.permutation(self.pools[name]))
        return np.array(picked, np.int64)

    def batch(self) -> tuple[str, torch.Tensor, torch.Tensor]:
        name = list(self.pools)[self.rng.integers(len(self.pools))]
        rows = self._take(name)
        if name == "next_sid":
            source = next_sid_sources(self.data, self.train, rows)
            target = torch.from_numpy(self.data.sid_tokens[self.train.target[rows]])
            return name, source, target
        if name == "history_titles_to_sid":
            source = history_titles_sources(self.data, self.train, rows, self.config.history_titles)
            target = torch.from_numpy(self.data.sid_tokens[self.train.target[rows]])
            return name, source, target
        source, target = item_task_batch(self.data, name, rows)
        return name, source, target


# -- models --------------------------------------------------------------------------------------
def build_model(config: GenRecTrainConfig, space: TokenSpace, n_items: int) -> torch.nn.Module:
    if config.model == "sasrec":
        return SASRec(
            n_items,
            SASRecConfig(
                d_model=config.d_model,
                heads=config.heads,
                layers=config.encoder_layers,
                dropout=config.dropout,
                max_history=config.max_history,
            ),
        )
    return GenRecModel(
        space,
        GenRecModelConfig(
            d_model=config.d_model,
            heads=config.heads,
            head_dim=config.head_dim,
            encoder_layers=config.encoder_layers,
            decoder_layers=config.decoder_layers,
            feedforward=config.feedforward,
            dropout=config.dropout,
            # task + user token, then the longest input any task builds
            max_source=2
            + max(
                config.max_history * space.sid_length,
                config.history_titles * TITLE_PIECES_PER_HISTORY_ITEM,
                config.text_max_tokens,
            ),
            max_target=max(space.sid_length, config.text_max_tokens + 1),
        ),
    )


def sasrec_batch(train_sequences: list[np.ndarray], rows: np.ndarray, h: int):
    """Inputs and next-item targets for SASRec (item ids 1..n, 0 = padding)."""
    inputs = np.zeros((len(rows), h), np.int64)
    targets = np.zeros((len(rows), h), np.int64)
    for k, r in enumerate(rows):
        seq = train_sequences[r] + 1
        x, y = seq[:-1][-h:], seq[1:][-h:]
        inputs[k, h - len(x) :] = x
        targets[k, h - len(y) :] = y
    return torch.from_numpy(inputs), torch.from_numpy(targets)


# -- ranking -------------------------------------------------------------------------------------
def rank_targets(
    model: torch.nn.Module,
    data: GenRecData,
    split: Split,
    rows: np.ndarray,
    config: GenRecTrainConfig,
    device: torch.device,
    trie: SidTrie | None,
) -> tuple[np.ndarray, np.ndarray]:
    """0-based rank of each row's target (-1: not in the top `beams`) and the top 10 items."""
    model.eval()
    ranks = np.full(len(rows), -1, np.int64)
    top = np.full((len(rows), 10), -1, np.int64)
    item_of = {tuple(t): i for i, t in enumerate(data.sid_tokens.tolist())}
    for start in range(0, len(rows), config.eval_batch_size):
        chunk = rows[start : start + config.eval_batch_size]
        if config.model == "sasrec":
            history = torch.from_numpy(
                np.where(split.history[chunk] >= 0, split.history[chunk] + 1, 0)
            )
            scores = model.scores(history.to(device)).float().cpu()
            target_scores = scores[torch.arange(len(chunk)), torch.from_numpy(split.target[chunk])]
            # Ties count against the target: a collapsed model must not score well.
            ranks[start : start + len(chunk)] = (
                (scores >= target_scores[:, None]).sum(1) - 1
            ).numpy()
            top[start : start + len(chunk)] = scores.topk(10, dim=1).indices.numpy()
            continue
        with _autocast(device):
            tokens, scores = beam_search(
                model, next_sid_sources(data, split, chunk).to(device), trie, config.beams
            )
        for k, (seqs, row_scores) in enumerate(zip(tokens.tolist(), scores.tolist(), strict=True)):
            found = [
                item_of.get(tuple(s), -1) if math.isfinite(sc) else -1
                for s, sc in zip(seqs, row_scores, strict=True)
            ]
            target = split.target[chunk[k]]
            if target in found:
                ranks[start + k] = found.index(target)
            top[start + k] = (found + [-1] * 10)[:10]
    return ranks, top


def metrics_from_ranks(ranks: np.ndarray) -> dict[str, float]:
    out = {}
    for k in KS:
        hit = (ranks >= 0) & (ranks < k)
        out[f"recall@{k}"] = float(hit.mean()) if len(ranks) else 0.0
        gains = np.where(hit, 1.0 / np.log2(np.maximum(ranks, 0) + 2), 0.0)
        out[f"ndcg@{k}"] = float(gains.mean()) if len(ranks) else 0.0
    return out


def popularity_buckets(popularity: np.ndarray) -> np.ndarray:
    """0 head (top 20% of items by training interactions), 1 torso, 2 tail (bottom 50%)."""
    order = np.argsort(-popularity, kind="stable")
    bucket = np.full(len(popularity), 1, np.int64)
    bucket[order[: int(0.2 * len(order))]] = 0
    bucket[order[int(0.5 * len(order)) :]] = 2
    return bucket


@torch.no_grad()
def invalid_rate(model, data, split, rows, config, device, trie: SidTrie) -> dict[str, float]:
    """Share of unconstrained beam outputs (top 10, and top 1) that name no catalog item."""
    model.eval()
    invalid = top1 = total = 0
    for start in range(0, len(rows), config.eval_batch_size):
        chunk = rows[start : start + config.eval_batch_size]
        with _autocast(device):
            tokens, _ = beam_search(
                model, next_sid_sources(data, split, chunk).to(device), None, config.beams
            )
        for seqs in tokens.tolist():
            misses = [trie.item(tuple(s)) is None for s in seqs[:10]]
            invalid += sum(misses)
            top1 += misses[0]
            total += len(misses)
    return {
        "invalid_rate": invalid / max(total, 1),
        "invalid_rate_top1": top1 / max(len(rows), 1),
    }


@torch.no_grad()
def exact_check(model, data, split, rows, config, device, trie) -> dict[str, float]:
    """Beam search vs exact scores of every item: same top-1, top-10 overlap, score agreement."""
    model.eval()
    item_tokens = torch.from_numpy(data.sid_tokens).to(device)
    source = next_sid_sources(data, split, rows).to(device)
    with _autocast(device):  # the same numerics as the reported metrics
        exact = score_items(model, source, item_tokens)
        tokens, scores = beam_search(model, source, trie, config.beams)
    item_of = {tuple(t): i for i, t in enumerate(data.sid_tokens.tolist())}
    same_top1, overlap, worst = 0, 0.0, 0.0
    for b in range(len(rows)):
        found = [
            (item_of[tuple(seq)], score)
            for seq, score in zip(tokens[b].tolist()[:10], scores[b].tolist()[:10], strict=True)
            if math.isfinite(score)  # beams beyond the catalog's valid SIDs stay empty
        ]
        beam_items = [i for i, _ in found]
        exact_top = exact[b].topk(min(10, len(beam_items))).indices.tolist()
        same_top1 += beam_items[0] == exact_top[0]
        overlap += len(set(beam_items) & set(exact_top)) / len(beam_items)
        beam_scores = torch.tensor([sc for _, sc in found], device=exact.device)
        worst = max(worst, (exact[b, beam_items] - beam_scores).abs().max().item())
    n = max(len(rows), 1)
    return {
        "beam_exact_top1_agreement": same_top1 / n,
        "beam_exact_overlap@10": overlap / n,
        "beam_exact_max_score_diff": worst,
    }


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


# -- training ------------------------------------------------------------------------------------
def train_recommender(
    config: GenRecTrainConfig,
    data: GenRecData,
    progress: Callable[[int, int, dict], None] | None = None,
) -> tuple[torch.nn.Module, list[dict]]:
    """Train with early stopping on validation NDCG@10; returns the best model and the curve."""
    torch.manual_seed(config.seed)
    if config.threads:
        torch.set_num_threads(config.threads)
    device = pick_device(config)
    parts = splits(data, config.max_history)
    model = build_model(config, data.space, data.n_items).to(device)
    trie = SidTrie(data.space, data.sid_tokens.tolist(), data.item_ids)
    rng = np.random.default_rng(config.seed)
    valid_rows = np.arange(len(parts["valid"].target))
    if config.valid_users and config.valid_users < len(valid_rows):
        valid_rows = np.sort(rng.choice(valid_rows, config.valid_users, replace=False))

    if config.model == "sasrec":
        # Every training position is a target once, as in the generative model's windows:
        # long sequences are cut into windows of max_history targets, from the end.
        train_sequences = []
        for seq in data.sequences:
            train = seq[:-2]
            for end in range(len(train), 1, -config.max_history):
                train_sequences.append(train[max(0, end - config.max_history - 1) : end])
        trainable = np.array([u for u, s in enumerate(train_sequences) if len(s) >= 2])
        steps_per_epoch = math.ceil(len(trainable) / config.batch_size)
        sampler = None
    else:
        sampler = TaskSampler(data, parts["train"], config, config.seed)
        steps_per_epoch = sampler.steps_per_epoch
    budget = config.time_limit_minutes * 60 if config.time_limit_minutes else math.inf
    # cosine-budget: the decay follows the share of the time limit used, updated every step.
    clock = {"used": 0.0}
    train_costs: list[float] = []
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=config.learning_rate,
        weight_decay=config.weight_decay,
        betas=(0.9, 0.98),
    )
    total = steps_per_epoch * config.epochs
    if config.lr_schedule == "constant":
        factor = lambda s: min(1.0, (s + 1) / config.warmup_steps)  # noqa: E731
    else:
        factor = lambda s: cosine_with_warmup(s, config.warmup_steps, total, clock["used"])  # noqa: E731
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    log.info(
        "training %s (%s params) on %s: %d users, %d items, tasks %s, %d steps/epoch",
        config.model,
        f"{count_parameters(model):,}",
        device,
        len(data.users),
        data.n_items,
        ",".join(data.tasks) if config.model != "sasrec" else "next item",
        steps_per_epoch,
    )
    history: list[dict] = []
    best, best_state, waited = -1.0, None, 0
    training_started = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        model.train()
        started, losses = time.perf_counter(), []
        order = rng.permutation(trainable) if sampler is None else None
        for step in range(steps_per_epoch):
            if sampler is None:
                rows = order[step * config.batch_size : (step + 1) * config.batch_size]
                inputs, targets = sasrec_batch(train_sequences, rows, config.max_history)
                with _autocast(device):
                    loss = model(inputs.to(device), targets.to(device))
            else:
                _, source, target = sampler.batch()
                with _autocast(device):
                    loss = model(source.to(device), target.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            if config.lr_schedule == "cosine-budget":
                clock["used"] = (time.perf_counter() - training_started) / budget
            schedule.step()
            losses.append(loss.item())
            # An epoch longer than the whole budget (multitask on a CPU) is cut where it ends.
            if time.perf_counter() - training_started >= budget:
                break
        row = {
            "epoch": epoch,
            "loss": float(np.mean(losses)),
            "seconds": time.perf_counter() - started,
            "steps": len(losses),
        }
        # Stop (validating here) when the budget is spent or another epoch would not fit.
        train_costs.append(row["seconds"])
        spent = time.perf_counter() - training_started
        out_of_time = spent + float(np.mean(train_costs)) > budget
        if len(losses) < steps_per_epoch:
            row["cut_short"] = True
        if epoch % config.eval_every == 0 or epoch == config.epochs or out_of_time:
            ranks, _ = rank_targets(model, data, parts["valid"], valid_rows, config, device, trie)
            row.update({f"valid_{k}": v for k, v in metrics_from_ranks(ranks).items()})
            if row["valid_ndcg@10"] > best:
                best, waited = row["valid_ndcg@10"], 0
                best_state = copy.deepcopy({k: v.cpu() for k, v in model.state_dict().items()})
                row["best"] = True
            else:
                waited += 1
        history.append(row)
        if progress is not None:
            progress(epoch, config.epochs, row)
        if waited >= config.patience:
            log.info(
                "early stop at epoch %d: no better validation NDCG@10 in %d checks", epoch, waited
            )
            break
        if out_of_time:
            log.info("stopped at epoch %d: time limit of %.0f min", epoch, budget / 60)
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    return model, history


def evaluate_recommender(
    config: GenRecTrainConfig, data: GenRecData, model: torch.nn.Module
) -> tuple[dict, pa.Table]:
    """Test metrics (and the test users' top 10) of a trained model."""
    device = next(model.parameters()).device
    parts = splits(data, config.max_history)
    test = parts["test"]
    rows = np.arange(len(test.target))
    trie = SidTrie(data.space, data.sid_tokens.tolist(), data.item_ids)
    started = time.perf_counter()
    ranks, top = rank_targets(model, data, test, rows, config, device, trie)
    metrics: dict = {**metrics_from_ranks(ranks), "users": len(rows)}
    metrics["eval_seconds"] = time.perf_counter() - started
    buckets = popularity_buckets(data.popularity())[test.target]
    metrics["by_popularity"] = {
        name: {"users": int((buckets == b).sum()), **metrics_from_ranks(ranks[buckets == b])}
        for b, name in enumerate(("head", "torso", "tail"))
    }
    predicted = top[top >= 0]
    metrics["predictions_valid"] = bool((predicted < data.n_items).all())
    if config.model == "tiger":
        subset = rows[: config.invalid_users]
        metrics.update(invalid_rate(model, data, test, subset, config, device, trie))
        if config.exact_check_users:
            metrics.update(
                exact_check(
                    model, data, test, rows[: config.exact_check_users], config, device, trie
                )
            )
    else:
        metrics["invalid_rate"] = 0.0  # SASRec scores items, it never writes an invalid one
    predictions = pa.table(
        {
            "user_id": pa.array([data.users[u] for u in test.user], pa.string()),
            "target": pa.array([data.item_ids[t] for t in test.target], pa.string()),
            "rank": pa.array(ranks, pa.int64()),
            "top10": pa.array(
                [[data.item_ids[i] for i in r if i >= 0] for r in top], pa.list_(pa.string())
            ),
        }
    )
    return metrics, predictions


# -- checkpoints ---------------------------------------------------------------------------------
def save_checkpoint(store: ArtifactStore, run_id: str, config, data, model, history) -> None:
    from safetensors.torch import save as save_tensors

    where = training_dir(run_id)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    store.write_bytes(save_tensors(state), *where, "model.safetensors")
    store.write_json(history, *where, "history.json")
    store.write_json(
        {
            "train": config.model_dump(mode="json"),
            "token_space": {
                "codebook_sizes": list(data.space.codebook_sizes),
                "suffix_size": data.space.suffix_size,
                "user_buckets": data.space.user_buckets,
                "text_vocab": data.space.text_vocab,
            },
            "published": data.published,
            "tasks": data.tasks,
            "parameters": count_parameters(model),
        },
        *where,
        "config.json",
    )


def load_checkpoint(store: ArtifactStore, run_id: str, config, data, device) -> torch.nn.Module:
    from safetensors.torch import load as load_tensors

    saved = store.read_json(*training_dir(run_id), "config.json")
    if saved["published"] != data.published:
        raise RuntimeError(
            f"checkpoint {run_id} was trained on {saved['published']}, not {data.published}"
        )
    model = build_model(config, data.space, data.n_items)
    model.load_state_dict(
        load_tensors(store.read_bytes(*training_dir(run_id), "model.safetensors"))
    )
    return model.to(device)


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads"


# -- Prefect tasks -------------------------------------------------------------------------------
@task(name="train-recommender", cache_policy=NO_CACHE)
def train_task(config: GenRecTrainConfig, run_id: str) -> dict:
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    logger = get_run_logger()
    store = ArtifactStore(config.store)
    data = prepare_data(config)
    artifact = create_progress_artifact(0.0, description=f"training {config.name}: epochs done")

    def progress(epoch: int, epochs: int, row: dict) -> None:
        update_progress_artifact(artifact, 100.0 * epoch / epochs)
        valid = f", valid NDCG@10 {row['valid_ndcg@10']:.4f}" if "valid_ndcg@10" in row else ""
        logger.info(
            "epoch %d/%d: loss %.4f in %.1fs%s", epoch, epochs, row["loss"], row["seconds"], valid
        )

    started = time.perf_counter()
    model, history = train_recommender(config, data, progress)
    save_checkpoint(store, run_id, config, data, model, history)
    best = [row["epoch"] for row in history if row.get("best")]
    return {
        "epochs": len(history),
        "best_epoch": best[-1] if best else None,
        "train_seconds": time.perf_counter() - started,
        "users": len(data.users),
        "items": data.n_items,
        "tasks": data.tasks,
        "dropped_interactions": data.dropped_interactions,
    }


@task(name="evaluate-recommender", cache_policy=NO_CACHE)
def evaluate_task(config: GenRecTrainConfig, run_id: str, trained: dict) -> dict:
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    store = ArtifactStore(config.store)
    data = prepare_data(config)
    model = load_checkpoint(store, run_id, config, data, pick_device(config))
    metrics, predictions = evaluate_recommender(config, data, model)
    metrics = {
        **metrics,
        **trained,
        "model": config.model,
        "config": config.name,
        "seed": config.seed,
        "machine": machine(),
        "published": data.published,
        "run_id": run_id,
    }
    where = training_dir(run_id)
    store.write_parquet(predictions, *where, "predictions.parquet")
    store.write_json(metrics, *where, "metrics.json")
    keys = ("recall@5", "recall@10", "ndcg@5", "ndcg@10", "invalid_rate")
    create_table_artifact(
        [{"metric": k, "value": round(metrics[k], 4)} for k in keys],
        key="genrec-metrics",
        description=f"{config.name} ({config.model}) test metrics, run {run_id}",
    )
    create_markdown_artifact(
        _markdown(metrics), key="genrec-report", description=f"{config.name} report"
    )
    return metrics


def _markdown(m: dict) -> str:
    lines = [
        f"### {m['config']} ({m['model']}), run {m['run_id']}",
        f"{m['users']:,} test users, {m['items']:,} items, {m['epochs']} epochs in "
        f"{m['train_seconds']:.0f}s on {m['machine']}",
        "",
        "| | R@5 | R@10 | N@5 | N@10 | users |",
        "|---|---:|---:|---:|---:|---:|",
        f"| all | {m['recall@5']:.4f} | {m['recall@10']:.4f} | {m['ndcg@5']:.4f} | "
        f"{m['ndcg@10']:.4f} | {m['users']:,} |",
    ]
    for name, b in m["by_popularity"].items():
        lines.append(
            f"| {name} | {b['recall@5']:.4f} | {b['recall@10']:.4f} | {b['ndcg@5']:.4f} | "
            f"{b['ndcg@10']:.4f} | {b['users']:,} |"
        )
    lines.append(f"\ninvalid SIDs without the trie: {m['invalid_rate']:.2%} of the top 10")
    return "\n".join(lines)
