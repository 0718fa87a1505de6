"""Stable content hashes: the keys of the stage cache and the fingerprints in manifests.

A hash here must never depend on dict order, Python's hash seed, the machine or the time.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: equal values give equal strings."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def stable_hash(obj: Any, length: int = 32) -> str:
    """Hex sha256 of an object's canonical JSON, truncated to `length` characters."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:length]


def hash_strings(values: Iterable[str], length: int = 32) -> str:
    """Order-sensitive hash of many strings (e.g. every item hash of a catalog)."""
    digest = hashlib.sha256()
    for value in values:
        digest.update(value.encode())
        digest.update(b"\n")
    return digest.hexdigest()[:length]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
