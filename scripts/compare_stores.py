"""Did a code change change any result? Compare two stores' published SID tables and training runs.

Run the same commands against two checkouts (before and after a change), each into its own
store, then:

    python scripts/compare_stores.py STORE_BEFORE STORE_AFTER

SID tables are compared byte for byte (same catalog and date); training runs by their config
name and model: every metric in metrics.json (timings, machine and the tokenization run's id
left out), the learning curve (epoch seconds left out) and predictions.parquet row for row.
Exits 1 when anything differs.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pyarrow.parquet as pq

NOT_RESULTS = {"train_seconds", "eval_seconds", "seconds", "run_id", "machine"}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def training_runs(store: Path) -> dict[tuple[str, str], Path]:
    """(flow, "<config>-<model>") -> the newest run folder of that config and model."""
    runs = {}
    for folder in sorted(store.glob("training/*/*")):
        runs[(folder.parent.name, folder.name.split("-", 2)[2])] = folder
    return runs


def results(folder: Path) -> tuple[dict, list, object]:
    metrics = json.loads((folder / "metrics.json").read_text())
    metrics.get("published", {}).pop("run_id", None)
    history = json.loads((folder / "history.json").read_text())
    return (
        {k: v for k, v in metrics.items() if k not in NOT_RESULTS},
        [{k: v for k, v in row.items() if k not in NOT_RESULTS} for row in history],
        pq.read_table(folder / "predictions.parquet"),
    )


def main(before: Path, after: Path) -> int:
    same = True
    for table in sorted(p.relative_to(before) for p in before.glob("sids/*/*/sids.parquet")):
        if not (after / table).exists():
            print(f"only before: {table}")
            same = False
            continue
        equal = digest(before / table) == digest(after / table)
        same &= equal
        print(f"{'same' if equal else 'DIFFERENT'}: {table}")
    runs_after = training_runs(after)
    for key, folder in sorted(training_runs(before).items()):
        if key not in runs_after:
            print(f"only before: training {key}")
            same = False
            continue
        (m1, h1, p1), (m2, h2, p2) = results(folder), results(runs_after[key])
        differing = sorted(k for k in m1.keys() | m2.keys() if m1.get(k) != m2.get(k))
        equal = not differing and h1 == h2 and p1.equals(p2)
        same &= equal
        detail = (
            ""
            if equal
            else f" (metrics {differing}, curve {h1 == h2}, predictions {p1.equals(p2)})"
        )
        print(f"{'same' if equal else 'DIFFERENT'}: training {key}{detail}")
    print("identical" if same else "results differ")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
