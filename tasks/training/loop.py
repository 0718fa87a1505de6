"""The one training loop of every training flow.

AdamW with gradient clipping; linear warm-up, then the configured schedule (cosine to 10% over
all epochs, cosine over the time budget's clock, or constant); validation every `eval_every`
epochs, at the last epoch and when time is up; the weights of the best validation kept (early
stopping after `patience` validations without improvement); a wall-clock budget that stops
before an epoch that would not fit and cuts an epoch longer than the whole budget. On CPU two
runs with the same seed and no time limit give bit-identical weights.

Knows a `Recommender` only through its interface: batches, loss. Never reads a store.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable

import numpy as np
import torch

from sidpipe.errors import ConfigError
from sidpipe.models.recommender import Batches, Recommender, autocast
from sidpipe.progress import Progress, duration
from sidpipe.tasks.training.config import LoopConfig, TrainConfig

log = logging.getLogger(__name__)
VALIDATION_METRIC = "ndcg@10"  # ranking flows; a CTR flow validates on "auc"


def pick_device(config: TrainConfig) -> torch.device:
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "device: cuda asked for, but torch sees no CUDA GPU", hint="use --device auto or cpu"
        )
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(config.device)


def seed_everything(config: TrainConfig) -> None:
    """Before a model is built: its initial weights and dropout follow the seed."""
    torch.manual_seed(config.seed)
    if config.threads:
        torch.set_num_threads(config.threads)


def count_parameters(module: torch.nn.Module) -> int:
    """Trainable parameters (frozen parts, e.g. AsymRec's fitted quantizers, not counted)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def cosine_with_warmup(step: int, warmup: int, total: int, clock: float = 0.0) -> float:
    """Learning-rate factor: linear warm-up, then cosine decay to 10%. The decay follows the
    steps or, under a time budget, the share of it used (`clock`), whichever is further along."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, max((step - warmup) / max(1, total - warmup), clock))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def _epoch_status(bar: Progress, epoch: int, epochs: int, steps: int, losses: list) -> str:
    """`epoch 2/6 ETA 1m10s, loss 5.2301` (the loss: mean of the last 50 steps). Reads the
    progress bar's own clock, never the loop's (the budget's clock must see only training)."""
    left = duration((steps - len(losses)) / max(bar.rate(), 1e-9))  # losses: this epoch's
    return f"epoch {epoch}/{epochs} ETA {left}, loss {np.mean(losses[-50:]):.4f}"


def train(
    rec: Recommender,
    batches: Batches,
    validate: Callable[[], dict[str, float]],
    config: LoopConfig,
    progress: Callable[[int, int, dict], None] | None = None,
    label: str = "train",
    metric: str = VALIDATION_METRIC,
) -> list[dict]:
    """Train `rec` in place; returns the learning curve (one row per epoch). `validate()`
    gives the validation metrics of the model as it stands; the weights with the best `metric`
    are kept. `rec` needs only `module`, `device` and `loss(batch)` (a `Recommender` or a click
    model).
    The last row says what ended training (`stopped_by`: patience, time_limit or epochs).
    Progress: steps of all epochs, with the epoch, its ETA and the running loss;
    `progress(epoch, epochs, row)` after each epoch."""
    model, device = rec.module, rec.device
    budget = config.time_limit_minutes * 60 if config.time_limit_minutes else math.inf
    clock = {"used": 0.0}  # cosine-budget: the share of the time limit used, every step
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=config.learning_rate,
        weight_decay=config.weight_decay,
        betas=(0.9, 0.98),
    )
    total = batches.steps_per_epoch * config.epochs
    if config.lr_schedule == "constant":
        factor = lambda s: min(1.0, (s + 1) / config.warmup_steps)  # noqa: E731
    else:
        factor = lambda s: cosine_with_warmup(s, config.warmup_steps, total, clock["used"])  # noqa: E731
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    history: list[dict] = []
    train_costs: list[float] = []
    best, best_state, waited = -1.0, None, 0
    training_started = time.perf_counter()
    limit = budget if math.isfinite(budget) else None
    with Progress(label, total=total, unit="steps", time_limit=limit) as bar:
        for epoch in range(1, config.epochs + 1):
            model.train()
            started, losses = time.perf_counter(), []
            for batch in batches.epoch():
                with autocast(device):
                    loss = rec.loss(tuple(t.to(device) for t in batch))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                optimizer.step()
                if config.lr_schedule == "cosine-budget":
                    clock["used"] = (time.perf_counter() - training_started) / budget
                schedule.step()
                losses.append(loss.item())
                bar.advance(
                    status=_epoch_status(bar, epoch, config.epochs, batches.steps_per_epoch, losses)
                )
                if time.perf_counter() - training_started >= budget:
                    break  # an epoch longer than the whole budget is cut where it ends
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
            if len(losses) < batches.steps_per_epoch:
                row["cut_short"] = True
            if epoch % config.eval_every == 0 or epoch == config.epochs or out_of_time:
                row.update({f"valid_{k}": v for k, v in validate().items()})
                if row[f"valid_{metric}"] > best:
                    best, waited = row[f"valid_{metric}"], 0
                    best_state = copy.deepcopy({k: v.cpu() for k, v in model.state_dict().items()})
                    row["best"] = True
                else:
                    waited += 1
            history.append(row)
            if waited >= config.patience:
                row["stopped_by"] = "patience"
            elif out_of_time:
                row["stopped_by"] = "time_limit"
            elif epoch == config.epochs:
                row["stopped_by"] = "epochs"
            if progress is not None:
                progress(epoch, config.epochs, row)
            if waited >= config.patience:
                log.info(
                    "early stop at epoch %d: no better validation %s in %d checks",
                    epoch,
                    metric,
                    waited,
                )
                break
            if out_of_time:
                log.info("stopped at epoch %d: time limit of %.0f min", epoch, budget / 60)
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    return history
