"""One artifact store over fsspec: a local folder or s3://bucket/prefix, same code.

Every file write is atomic on its own: local files are written to a temporary name and renamed,
remote objects are uploaded whole in one PUT (or a multipart upload that only completes at the
end), so a crash never leaves a half-written object behind a real name. Multi-file results are
made visible by a manifest written last (see `storage.manifest`).

This module knows paths and bytes, never what a stage means.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import tempfile
from collections.abc import Iterable
from contextlib import contextmanager
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from sidpipe.errors import CorruptArtifactError, StoreError


def _file_mode() -> int:
    """0666 less the process's umask (read once, at import: os.umask is process-wide)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


FILE_MODE = _file_mode()
COPY_BLOCK = 8 << 20  # bytes read and written at once by `copy`


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def open_filesystem(uri: str, **storage_options: Any) -> tuple[fsspec.AbstractFileSystem, str]:
    """Filesystem and bare path for a URI. s3 listings are not cached: other processes write too."""
    if uri.startswith("s3://"):
        storage_options.setdefault("use_listings_cache", False)
    fs, path = fsspec.core.url_to_fs(uri, **storage_options)
    if _is_local(fs):
        path = os.path.abspath(path)
    return fs, path


class ArtifactStore:
    """Read and write artifacts under one root URI (`./artifacts`, `s3://bucket/prefix`)."""

    def __init__(self, root: str, **storage_options: Any) -> None:
        self.root_uri = root
        self.storage_options = storage_options
        self.fs, self.root = open_filesystem(root, **storage_options)
        self.protocol = "file" if _is_local(self.fs) else self.fs.protocol
        if isinstance(self.protocol, (tuple, list)):
            self.protocol = self.protocol[0]

    # -- paths ---------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        """Filesystem path of an artifact, relative parts joined under the root."""
        return (
            posixpath.join(self.root, *parts)
            if not _is_local(self.fs)
            else os.path.join(self.root, *parts)
        )

    def uri(self, *parts: str) -> str:
        """Full URI of an artifact (for manifests, logs and readers such as polars/duckdb)."""
        p = self.path(*parts)
        return p if _is_local(self.fs) else f"{self.protocol}://{p}"

    def relative(self, path: str) -> str:
        """Path relative to the root, with forward slashes (what manifests record)."""
        rel = path[len(self.root) :].lstrip("/\\")
        return rel.replace(os.sep, "/")

    @contextmanager
    def _backend(self, action: str, *parts: str):
        """Any backend error (no credentials, no bucket, no permission, a timeout) becomes one
        StoreError naming the URI; a missing file stays a FileNotFoundError."""
        try:
            yield
        except (FileNotFoundError, StoreError):
            raise
        except Exception as exc:  # noqa: BLE001 - any backend error becomes one clear message
            raise StoreError(f"cannot {action} {self.uri(*parts)}: {exc}") from exc

    # -- reading ---------------------------------------------------------------------------------
    def exists(self, *parts: str) -> bool:
        with self._backend("read", *parts):
            return self.fs.exists(self.path(*parts))

    def read_bytes(self, *parts: str) -> bytes:
        with self._backend("read", *parts):
            return self.fs.cat_file(self.path(*parts))

    def read_json(self, *parts: str) -> Any:
        data = self.read_bytes(*parts)
        try:
            return json.loads(data)
        except ValueError as exc:  # truncated or overwritten
            raise CorruptArtifactError(f"{self.uri(*parts)} is not valid JSON: {exc}") from None

    def read_parquet(self, *parts: str, columns: list[str] | None = None) -> pa.Table:
        """A Parquet file, its data pages checked against their CRC32 checksums."""
        data = self.read_bytes(*parts)
        try:
            return pq.read_table(io.BytesIO(data), columns=columns, page_checksum_verification=True)
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise CorruptArtifactError(
                f"{self.uri(*parts)} is not a readable Parquet file ({type(exc).__name__}: "
                f"{str(exc)[:200]})"
            ) from None

    def glob(self, pattern: str) -> list[str]:
        """Paths matching a glob relative to the root, sorted (fresh listing, never cached)."""
        self.fs.invalidate_cache()
        with self._backend("list", pattern):
            return sorted(self.fs.glob(self.path(pattern)))

    def listdir(self, *parts: str) -> list[str]:
        path = self.path(*parts)
        self.fs.invalidate_cache()
        with self._backend("list", *parts):
            if not self.fs.exists(path):
                return []
            return sorted(self.fs.ls(path, detail=False))

    # -- writing ---------------------------------------------------------------------------------
    @contextmanager
    def _atomic_sink(self, *parts: str):
        """A binary file to write one object into; it appears under its name only if the block
        ends without an error. Local: a temporary name in the same folder, fsynced and renamed.
        Remote: a local temporary file uploaded at the end (one PUT, or a multipart upload that
        completes only at the end). Yields the file; the object's path is `self.path(*parts)`."""
        path = self.path(*parts)
        local = _is_local(self.fs)
        try:
            directory = os.path.dirname(path) if local else None
            if directory:
                os.makedirs(directory, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
        except Exception as exc:  # noqa: BLE001
            raise StoreError(f"cannot write {self.uri(*parts)}: {exc}") from exc
        try:
            # mkstemp makes the file 0600; a published file gets what the umask allows
            # (0644 under the usual 022), like any file the user writes.
            os.fchmod(fd, FILE_MODE)
            with os.fdopen(fd, "wb") as handle:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
            try:
                if local:
                    os.replace(tmp, path)
                else:
                    self.fs.put_file(tmp, path)
            except Exception as exc:  # noqa: BLE001
                raise StoreError(f"cannot write {self.uri(*parts)}: {exc}") from exc
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def write_bytes(self, data: bytes, *parts: str) -> str:
        """Write one object atomically; returns its path."""
        if not _is_local(self.fs):
            # Small objects go up in one PUT without a local temporary file.
            with self._backend("write", *parts):
                self.fs.pipe_file(self.path(*parts), data)
            return self.path(*parts)
        with self._backend("write", *parts), self._atomic_sink(*parts) as handle:
            handle.write(data)
        return self.path(*parts)

    def write_json(self, obj: Any, *parts: str) -> str:
        # Insertion order is kept (stages in DAG order); it is deterministic for our models.
        data = json.dumps(obj, indent=2, default=str).encode() + b"\n"
        return self.write_bytes(data, *parts)

    def write_text(self, text: str, *parts: str) -> str:
        return self.write_bytes(text.encode(), *parts)

    def write_parquet(self, table: pa.Table, *parts: str) -> str:
        sink = io.BytesIO()
        pq.write_table(table, sink, compression="zstd", write_page_checksum=True)
        return self.write_bytes(sink.getvalue(), *parts)

    def write_parquet_batches(
        self, schema: pa.Schema, batches: Iterable[pa.RecordBatch | pa.Table], *parts: str
    ) -> tuple[str, int]:
        """Write one Parquet file a batch at a time (never the whole table in memory), as
        atomically as `write_bytes`; returns (path, rows)."""
        rows = 0
        with self._backend("write", *parts), self._atomic_sink(*parts) as handle:
            with pq.ParquetWriter(
                handle, schema, compression="zstd", write_page_checksum=True
            ) as writer:
                for batch in batches:
                    writer.write(batch)
                    rows += batch.num_rows
        return self.path(*parts), rows

    def copy(self, source: tuple[str, ...], target: tuple[str, ...]) -> tuple[str, str, int]:
        """Copy one object a block at a time (atomic at the target, as `write_bytes`), hashing
        it on the way; returns (target path, sha256 hex, bytes)."""
        digest, size, path = hashlib.sha256(), 0, self.path(*source)
        with self._backend("copy to", *target), self.fs.open(path, "rb") as src:
            with self._atomic_sink(*target) as handle:
                while block := src.read(COPY_BLOCK):
                    digest.update(block)
                    handle.write(block)
                    size += len(block)
                if size != src.size:
                    raise StoreError(f"read {size} of {src.size} bytes of {self.uri(*source)}")
        return self.path(*target), digest.hexdigest(), size

    def delete(self, *parts: str) -> None:
        path = self.path(*parts)
        with self._backend("delete", *parts):
            if self.fs.exists(path):
                self.fs.rm(path, recursive=True)

    def __reduce__(self):
        """Pickled as its root URI and options (process, Dask and Ray task runners): the
        receiving process opens its own filesystem."""
        return _reopen, (self.root_uri, self.storage_options)

    def __repr__(self) -> str:
        return f"ArtifactStore({self.root_uri!r})"


def existing_store(uri: str) -> ArtifactStore:
    """A store to read from: a root that does not exist is a mistyped URI, not an empty store."""
    store = ArtifactStore(uri)
    with store._backend("read"):
        found = store.fs.exists(store.root)
    if not found:
        raise StoreError(
            f"no artifact store at {uri}",
            hint="check --store (or SIDPIPE_STORE); `sidpipe run --store URI` creates a store",
        )
    return store


def _reopen(root: str, options: dict) -> ArtifactStore:
    return ArtifactStore(root, **options)


def concat_tables(tables: Iterable[pa.Table]) -> pa.Table | None:
    tables = [t for t in tables if t is not None and t.num_rows]
    if not tables:
        return None
    return pa.concat_tables(tables, promote_options="permissive")
