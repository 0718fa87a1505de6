"""Turn the Amazon 2014 5-core files into sidpipe's input contracts (run once; outputs committed).

    python scripts/prepare_amazon.py data/amazon-beauty-2014 Beauty.txt

- `catalog.jsonl.gz`: item_id, title, brand, categories (one "a, b, c" string: every category
  once, in order): the catalog `sidpipe run` tokenizes (TIGER's item text without price, which
  these files lack).
- `interactions.parquet`: user_id, item_id, timestamp. The 5-core sequence files keep each user's
  chronological order but not the time, so `timestamp` is the position in the sequence (0, 1,
  ...): enough for leave-one-out, and ties cannot occur.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def main(folder: Path, sequences: str) -> None:
    users, items, stamps = [], [], []
    for line in (folder / sequences).read_text().splitlines():
        user, *seq = line.split()
        for position, item in enumerate(seq):
            users.append(user)
            items.append(item)
            stamps.append(position)
    table = pa.table(
        {
            "user_id": pa.array(users, pa.string()),
            "item_id": pa.array(items, pa.string()),
            "timestamp": pa.array(stamps, pa.int64()),
        }
    )
    pq.write_table(table, folder / "interactions.parquet", compression="zstd")
    with (
        gzip.open(folder / "items.jsonl.gz", "rt") as src,
        gzip.open(folder / "catalog.jsonl.gz", "wt") as out,
    ):
        for line in src:
            item = json.loads(line)
            categories = ", ".join(dict.fromkeys(c for path in item["categories"] for c in path))
            row = {"item_id": str(item["item_id"]), "title": item["title"]}
            if item.get("brand"):
                row["brand"] = item["brand"]
            row["categories"] = categories
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"{folder}: {table.num_rows:,} interactions of {len(set(users)):,} users")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
