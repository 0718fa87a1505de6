"""Datasets that ship inside the sidpipe package (each folder's SOURCE.md says where from).

- `fashion-sample/`: 1,000 fashion products with photos; what `sidpipe run` tokenizes by default.
- `amazon-beauty-2014/`, `amazon-toys-2014/`: the 5-core catalogs and interactions the training
  flows use (Toys is held out: report on it, never tune on it).

Found through importlib.resources, so they work from a wheel as well as from a checkout.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def bundled(*parts: str) -> str:
    """The filesystem path of a bundled file."""
    return str(Path(str(files(__name__).joinpath(*parts))))


SAMPLE_CATALOG = bundled("fashion-sample", "catalog.csv")
BEAUTY_INTERACTIONS = bundled("amazon-beauty-2014", "interactions.parquet")
