"""The tokenizer registry: which tokenizer versions a catalog has, and which one is pinned.

`<root>/tokenizers/_registry/<catalog>.json` = {"pinned": id, "versions": [...]}. Nightly runs
encode with the pinned tokenizer, so SIDs only change when someone refits (a new version, with a
drift report) and pins it. Tokenizers themselves live in `<root>/tokenizers/<tokenizer_id>/`.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from sidpipe.errors import CorruptArtifactError, TokenizerNotFound
from sidpipe.storage.layout import registry_path
from sidpipe.storage.store import ArtifactStore


class TokenizerVersion(BaseModel):
    tokenizer_id: str
    method: str
    created_at: datetime
    embed_key: str
    items: int
    codebook_sizes: list[int]
    parent: str | None = None  # the tokenizer pinned when this one was fitted
    drift: dict | None = None  # share of items whose SID changed against the parent


class Registry(BaseModel):
    catalog: str
    pinned: str | None = None
    versions: list[TokenizerVersion] = Field(default_factory=list)

    def version(self, tokenizer_id: str) -> TokenizerVersion | None:
        return next((v for v in self.versions if v.tokenizer_id == tokenizer_id), None)


def read_registry(store: ArtifactStore, catalog: str) -> Registry:
    if not store.exists(*registry_path(catalog)):
        return Registry(catalog=catalog)
    try:
        return Registry.model_validate(store.read_json(*registry_path(catalog)))
    except (CorruptArtifactError, ValueError) as exc:
        # Never guessed: which tokenizer is pinned decides every SID of the next run.
        raise CorruptArtifactError(
            f"the tokenizer registry of {catalog!r} is unreadable: {exc}",
            hint=f"restore {store.uri(*registry_path(catalog))} from a backup (the tokenizer "
            "versions themselves are intact in tokenizers/<id>/)",
        ) from None


def write_registry(store: ArtifactStore, registry: Registry) -> None:
    store.write_json(registry.model_dump(mode="json"), *registry_path(registry.catalog))


def register(store: ArtifactStore, catalog: str, version: TokenizerVersion, pin: bool) -> Registry:
    registry = read_registry(store, catalog)
    if registry.version(version.tokenizer_id) is None:
        registry.versions.append(version)
    if pin:
        registry.pinned = version.tokenizer_id
    write_registry(store, registry)
    return registry


def pin(store: ArtifactStore, catalog: str, tokenizer_id: str) -> Registry:
    registry = read_registry(store, catalog)
    if registry.version(tokenizer_id) is None:
        known = ", ".join(v.tokenizer_id for v in registry.versions) or "none"
        raise TokenizerNotFound(
            f"catalog {catalog!r} has no tokenizer {tokenizer_id!r} (versions: {known})"
        )
    registry.pinned = tokenizer_id
    write_registry(store, registry)
    return registry
