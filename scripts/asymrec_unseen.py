"""How cold items fare under each way a model can rank items no training sequence held.

Rescores one saved checkpoint of a `sidpipe train asymrec` run (an AsymRec model, an ablation, or
SASRec) on the validation and test targets, with every `unseen_items` way (AsymRec's: its codes,
its content codes scaled by other factors, or its nearest seen items; SASRec's: its own row or
its nearest seen items' rows), and prints overall, cold-target and warm-target recall, cold R@100
and the cold targets' median rank:

    python scripts/asymrec_unseen.py [--store artifacts] RUN_ID [--model asymrec|sasrec|...]

The README's table "How the cold-item figures move" came from this script. It writes nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sidpipe.models.sasrec import SASRec  # noqa: E402
from sidpipe.storage.layout import training_dir  # noqa: E402
from sidpipe.storage.store import ArtifactStore  # noqa: E402
from sidpipe.tasks.training.checkpoint import load_checkpoint  # noqa: E402
from sidpipe.tasks.training.data import split  # noqa: E402

WAYS = ["codes", "content x1", "content", "content x2.5", "content x3", "neighbours"]
SASREC_WAYS = ["own", "neighbours"]


def ways(net) -> list[str]:
    """The ways `net` can rank unseen items (the content ways need MHQ's content view: the
    published-SID ablation has none)."""
    if isinstance(net, SASRec):
        return SASREC_WAYS
    return WAYS if net.config.targets == "mhq" else ["codes", "neighbours"]


def scorer(net, way: str, embeddings: np.ndarray):
    """(states: histories [B, T] -> hidden states [B, T, d], item rows [n, d]) of `net` when
    unseen items are ranked `way`. SASRec also reads unseen items in a history by their rows."""
    if isinstance(net, SASRec):
        net.config = net.config.model_copy(update={"unseen_items": way})
        net.mark_unseen(net.unseen.cpu().numpy().copy(), embeddings)
        table = net.ranking_table()
        return (lambda history: net.states(history, table)), table[1:]
    return net.states, ranking_table(net, way, embeddings)


def ranking_table(net, way: str, embeddings: np.ndarray) -> torch.Tensor:
    """The item embeddings AsymRec `net` ranks by when unseen items are ranked `way` ("content
    xK": the content view's codes alone, their sum times K)."""
    name, _, scale = way.partition(" x")
    net.config = net.config.model_copy(update={"unseen_items": name})
    net.mark_unseen(net.unseen.cpu().numpy().copy(), embeddings)
    table = net.ranking_embeddings()
    if scale:  # `content` scales by the number of views: rescale to K
        unseen = net.unseen[:, None]
        table = torch.where(unseen, table / len(net.config.views) * float(scale), table)
    return table


def rescore(store: ArtifactStore, run_id: str, model: str = "asymrec") -> list[dict]:
    """One row per way and split: recall@10 overall and on cold and warm targets, cold R@100 and
    the cold targets' median 0-based rank (ties count against the target, as in evaluation)."""
    config, training, rec = load_checkpoint(store, training_dir("asymrec", run_id, model), "cpu")
    with torch.no_grad():
        return _rescore(config, training.data, rec.module.eval())


def last_states(states, history: torch.Tensor) -> torch.Tensor:
    """The hidden state after each history's last item, 1,024 histories at a time."""
    return torch.cat([states(history[s : s + 1024])[:, -1] for s in range(0, len(history), 1024)])


def _rescore(config, data, net) -> list[dict]:
    rows = []
    for which in ("valid", "test"):
        examples = split(data, config.data.max_history, which)
        history = torch.from_numpy(np.where(examples.history >= 0, examples.history + 1, 0))
        target = torch.from_numpy(examples.target)
        cold = data.cold[examples.target]
        # AsymRec reads histories by content whatever the way: its states are computed once
        shared = None if isinstance(net, SASRec) else last_states(net.states, history)
        for way in ways(net):
            states, table = scorer(net, way, data.embeddings)
            scores = (last_states(states, history) if shared is None else shared) @ table.T
            picked = scores[torch.arange(len(scores)), target]
            ranks = ((scores >= picked[:, None]).sum(1) - 1).numpy()
            rows.append(
                {
                    "split": which,
                    "way": way,
                    "recall@10": float((ranks < 10).mean()),
                    "cold_recall@10": float((ranks[cold] < 10).mean()) if cold.any() else 0.0,
                    "warm_recall@10": float((ranks[~cold] < 10).mean()),
                    "cold_recall@100": float((ranks[cold] < 100).mean()) if cold.any() else 0.0,
                    "cold_median_rank": float(np.median(ranks[cold])) if cold.any() else 0.0,
                    "ranks": ranks,
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_id")
    parser.add_argument("--store", default="artifacts")
    parser.add_argument("--model", default="asymrec")
    args = parser.parse_args()
    print(
        "| split | unseen items ranked by | R@10 | cold R@10 | warm R@10 | cold R@100 | cold median rank |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rescore(ArtifactStore(args.store), args.run_id, args.model):
        print(
            f"| {r['split']} | {r['way']} | {r['recall@10']:.4f} | {r['cold_recall@10']:.4f} | "
            f"{r['warm_recall@10']:.4f} | "
            f"{r['cold_recall@100']:.3f} | {r['cold_median_rank']:.0f} |"
        )


if __name__ == "__main__":
    main()
