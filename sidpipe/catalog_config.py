"""The `catalog:` section of the config (where the items come from, how rows are read and
checked) and the base of every config section. `sidpipe.config` re-exports `CatalogConfig`.

Imports nothing that imports Prefect, torch or model code (as `sidpipe.config`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from sidpipe.catalog_names import catalog_name_of
from sidpipe.data import SAMPLE_CATALOG

__all__ = ["CatalogConfig"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CatalogConfig(_Section):
    """Where the items come from and how their rows are read."""

    uri: str = Field(
        default=SAMPLE_CATALOG,
        description="Catalog file: Parquet, JSONL or CSV; a local path or s3:// URI.",
    )
    name: str | None = Field(
        default=None,
        pattern=r"^[a-z0-9][a-z0-9._-]*$",
        description="Catalog name used in artifact paths (lowercase, digits, . _ -). Default: "
        "derived from the file name (see `catalog_name_of`).",
    )
    same_catalog: bool = Field(
        default=False,
        description="This file is a new snapshot or location of the catalog already published "
        "under this name (the store records each name's source and refuses another without it).",
    )
    allow_http_images: bool = Field(
        default=False,
        description="Accept http(s):// image references (off: offline-first).",
    )
    check_images: bool = Field(
        default=True,
        description="Quarantine rows whose image reference does not resolve to a non-empty file.",
    )
    image_roots: list[str] = Field(
        default_factory=list,
        description="Folders images may come from besides the catalog's own folder (an s3:// "
        "catalog: its prefix), which is always allowed: local paths or s3://bucket/prefix. A "
        "reference whose real path (symlinks followed, .. removed) is outside all of them is "
        "quarantined (unsafe_image:outside image root). See docs/security.md.",
    )
    allowed_image_hosts: list[str] = Field(
        default_factory=list,
        description="http(s) image hosts fetched although they are, or resolve to, a loopback, "
        "link-local (cloud metadata), private, unspecified or multicast address: host names "
        "(exact) or IP addresses/networks (10.0.0.0/8). Other such hosts are quarantined "
        "(unsafe_image:...) and refused again at download.",
    )
    column_types: dict[str, Literal["text", "number", "list", "bool"]] = Field(
        default_factory=dict,
        description="Declared types of attribute columns (e.g. {price: number}); a value of "
        "another type quarantines its row (bad_type:<column>). Core columns are always typed.",
    )
    max_text_chars: int = Field(
        default=100_000,
        ge=1,
        description="Longest title, description or image reference kept; longer: quarantined.",
    )

    @property
    def store_name(self) -> str:
        """The name the store files this catalog under: `name`, else derived from the file."""
        return self.name or catalog_name_of(self.uri)
