"""A lock per catalog in the artifact store, so two runs can never write one catalog at once.

Prefect's deployment concurrency limit keeps scheduled runs and backfills apart; this lock also
covers runs started outside Prefect (a cron job, a laptop, a second cluster) on the same store.

- Local stores: an OS file lock (`flock`) on `<root>/locks/<name>.lock`. The kernel drops it when
  the holder exits, however it dies, so a killed run never blocks the next one.
- S3: a lease object `<root>/locks/<name>.json` created with a conditional PUT (If-None-Match),
  renewed by a heartbeat thread and taken over after it lapses with a compare-and-swap PUT
  (If-Match on the lapsed lease's ETag): of two runs racing for a lapsed lease exactly one wins.

The lock never decides what a run does; it only says who may write. Holder details (run id, host,
pid, since) are stored beside it so a refused run can say who holds the catalog.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from sidpipe.errors import LockHeldError, LockLostError, StoreError
from sidpipe.storage.layout import LOCKS_DIR
from sidpipe.storage.store import ArtifactStore

log = logging.getLogger(__name__)


def catalog_lock_name(catalog: str) -> str:
    """The one lock every run of a catalog holds (its registry and SID tables are shared)."""
    return f"catalog-{catalog}"


def _held_message(name: str, holder: dict[str, Any] | None, store_uri: str) -> str:
    who = (
        f"run {holder.get('run_id')} on {holder.get('host')} (pid {holder.get('pid')}) "
        f"since {holder.get('acquired_at')}"
        if holder
        else "another run"
    )
    return f"{name} in {store_uri} is locked by {who}; a killed run's lock lapses by itself"


def _now() -> datetime:
    return datetime.now(UTC)


class StoreLock:
    """`with StoreLock(store, "catalog-shop", run_id=...):` holds the lock for the block."""

    def __init__(
        self,
        store: ArtifactStore,
        name: str,
        run_id: str,
        ttl_seconds: float = 300.0,
        wait_seconds: float = 0.0,
        poll_seconds: float = 1.0,
    ) -> None:
        self.store = store
        self.name = name
        self.ttl = ttl_seconds
        self.wait = wait_seconds
        self.poll = min(poll_seconds, max(wait_seconds, 0.05))
        self.token = uuid.uuid4().hex
        self.holder = {
            "run_id": run_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "token": self.token,
            "acquired_at": None,
            "expires_at": None,
        }
        if store.protocol == "file":
            self._impl = _FileLock(self)
        elif store.protocol in ("s3", "s3a"):
            self._impl = _LeaseLock(self)
        else:
            raise NotImplementedError(
                f"no lock for {store.protocol}:// stores (local folders and S3 have one); "
                "keep one writer per catalog yourself"
            )

    def acquire(self) -> StoreLock:
        deadline = time.monotonic() + self.wait
        while True:
            self.holder["acquired_at"] = _now().isoformat()
            if self._impl.try_acquire():
                return self
            if time.monotonic() >= deadline:
                raise LockHeldError(
                    _held_message(self.name, self._impl.current_holder(), self.store.root_uri)
                )
            time.sleep(self.poll)

    def release(self) -> None:
        """Give the lock back; a storage error here is logged, never raised (the run's work is
        done, and a lease left behind lapses by itself)."""
        try:
            self._impl.release()
        except Exception as exc:  # noqa: BLE001
            log.warning("could not release lock %s: %s (it lapses by itself)", self.name, exc)

    def set_run_id(self, run_id: str) -> None:
        """Name the run that holds the lock (a resumed run adopts an older run id)."""
        self.holder["run_id"] = run_id
        self._impl.rewrite()

    def ensure_held(self) -> None:
        """Raise LockLostError unless this run still holds the lock: call before publishing."""
        self._impl.ensure_held()

    def __enter__(self) -> StoreLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class _FileLock:
    """flock on a local file; the holder's details go into the locked file itself."""

    def __init__(self, lock: StoreLock) -> None:
        self.lock = lock
        self.path = lock.store.path(LOCKS_DIR, f"{lock.name}.lock")
        self.fd: int | None = None

    def try_acquire(self) -> bool:
        import fcntl

        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(self.lock.holder).encode(), 0)
        self.fd = fd
        return True

    def rewrite(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, json.dumps(self.lock.holder).encode(), 0)

    def ensure_held(self) -> None:
        if self.fd is None:
            raise LockLostError(f"{self.lock.name}: this run does not hold the lock")

    def current_holder(self) -> dict | None:
        try:
            with open(self.path, "rb") as handle:
                return json.loads(handle.read() or b"null")
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self.fd is not None:
            import fcntl

            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


class _LeaseLock:
    """A lease object on S3, written only with conditional PUTs."""

    def __init__(self, lock: StoreLock) -> None:
        self.lock = lock
        self.parts = (LOCKS_DIR, f"{lock.name}.json")
        self.path = lock.store.path(*self.parts)
        self.fs = lock.store.fs
        self.etag: str | None = None
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self.lost: str | None = None  # why the lease was lost, if it was
        self.renewed = 0.0  # time.monotonic() of the last successful write of the lease

    def _body(self) -> bytes:
        self.lock.holder["expires_at"] = (_now() + timedelta(seconds=self.lock.ttl)).isoformat()
        return json.dumps(self.lock.holder).encode()

    def _read(self) -> tuple[dict | None, str | None]:
        try:
            info = self.fs.info(self.path, refresh=True)
            data = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None, None
        try:
            return json.loads(data), info.get("ETag")
        except ValueError:
            return {}, info.get("ETag")

    def _put(self, **condition: str) -> str:
        bucket, key, _ = self.fs.split_path(self.path)
        response = self.fs.call_s3(
            "put_object", Bucket=bucket, Key=key, Body=self._body(), **condition
        )
        self.renewed = time.monotonic()
        return response["ETag"]

    def try_acquire(self) -> bool:
        try:
            self.etag = self._put(IfNoneMatch="*")
        except (FileExistsError, OSError) as exc:
            if not _precondition_failed(exc):
                raise StoreError(
                    f"cannot take lock {self.lock.store.uri(*self.parts)}: {exc}"
                ) from exc
            holder, etag = self._read()
            if holder is None or etag is None:
                return False  # released meanwhile: the next poll creates it
            expires = holder.get("expires_at")
            if expires and datetime.fromisoformat(expires) > _now():
                return False
            try:  # the lease lapsed: replace exactly that version of it
                self.etag = self._put(IfMatch=etag)
            except (FileExistsError, OSError) as exc2:
                if _precondition_failed(exc2):
                    return False  # someone else took it over first
                raise StoreError(f"cannot take over lock {self.path}: {exc2}") from exc2
        self._start_heartbeat()
        return True

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._heartbeat = threading.Thread(
            target=self._renew_until_stopped, name=f"lease-{self.lock.name}", daemon=True
        )
        self._heartbeat.start()

    def _renew(self) -> None:
        try:
            self.etag = self._put(IfMatch=self.etag)
        except Exception as exc:  # noqa: BLE001 - a heartbeat must never kill the run
            if not _precondition_failed(exc):
                # Transient storage trouble: try again at the next beat (the TTL allows 3).
                log.warning("lock %s: renewal failed, retrying: %s", self.lock.name, exc)
                return
            holder, etag = self._read()
            if holder and holder.get("token") == self.lock.token:
                # Our own earlier write won but its reply was lost: the lease is still ours.
                self.etag = etag
                self._renew()
                return
            self.lost = "another run took the lease over after it lapsed"
            log.error("lock %s lost: %s", self.lock.name, self.lost)
            self._stop.set()

    def _renew_until_stopped(self) -> None:
        while not self._stop.wait(self.lock.ttl / 3):
            self._renew()

    def rewrite(self) -> None:
        self._renew()

    def ensure_held(self) -> None:
        if self.lost:
            raise LockLostError(f"{self.lock.name}: {self.lost}")
        if time.monotonic() - self.renewed > self.lock.ttl:
            raise LockLostError(
                f"{self.lock.name}: the lease was not renewed for {self.lock.ttl:.0f}s; another "
                "run may have taken it over"
            )

    def current_holder(self) -> dict | None:
        return self._read()[0]

    def release(self) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=10)
            self._heartbeat = None
        holder, etag = self._read()
        if holder and holder.get("token") == self.lock.token and etag == self.etag:
            self.fs.rm_file(self.path)
        self.etag = None


def _precondition_failed(exc: BaseException) -> bool:
    text = str(exc)
    return (
        isinstance(exc, FileExistsError)
        or "PreconditionFailed" in text
        or "pre-conditions you specified did not hold" in text
    )


def current_holder(store: ArtifactStore, name: str) -> dict | None:
    """Who holds the lock now, read from the store (works from any process or worker)."""
    if store.protocol == "file":
        try:
            with open(store.path(LOCKS_DIR, f"{name}.lock"), "rb") as handle:
                return json.loads(handle.read() or b"null")
        except (OSError, ValueError):
            return None
    try:
        return json.loads(store.read_bytes(LOCKS_DIR, f"{name}.json"))
    except (FileNotFoundError, ValueError):
        return None


def ensure_holder(store: ArtifactStore, name: str, token: str | None) -> None:
    """Raise LockLostError unless the lock's holder is the run with this token (None: no
    lock to check). Shard tasks call it before their checkpoint: a run whose lease was taken
    over must not mark work done in a folder that now belongs to another attempt."""
    if token is None:
        return
    holder = current_holder(store, name)
    if not holder or holder.get("token") != token:
        who = holder.get("run_id") if holder else "nobody"
        raise LockLostError(f"{name} is no longer held by this run (holder: {who})")
