"""Gateway keys: made once, shown once, stored only as a hash; the records and where they live.

A key looks like ``fxg_<id>_<secret>``: ``<id>`` is a short public id (in `KeyRecord.id`, logs,
metrics and ``keys list``), ``<secret>`` 32 random bytes (URL-safe base64). Only the SHA-256 of
the whole key is stored; the gateway hashes the bearer key it is sent, looks the record up by
that hash and compares the two hashes in constant time (`hmac.compare_digest`).

Records (`flux_adapters.state.KeyRecord`) live in the shared state when it is Redis
(``FLUX_STATE_URL``, ``state_url``), else in a
JSON file (`FileKeys`, ``flux-adapters-keys.json`` by default, ``$FLUX_GATEWAY_KEYS``), written
atomically with mode 0600. Nothing here needs an extra: ``flux-adapters keys`` works without the
``gateway`` extra.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
import stat
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Final, Literal, Protocol

from flux_adapters.errors import ConfigurationError
from flux_adapters.state import KeyRecord, record_from_dict, record_to_dict

__all__ = [
    "DEFAULT_KEYS_PATH",
    "FileKeys",
    "KeyRecord",
    "KeyStore",
    "hash_key",
    "key_id_of",
    "new_key",
    "record_from_dict",
    "record_to_dict",
    "verify",
]

DEFAULT_KEYS_PATH: Final = Path("flux-adapters-keys.json")
_PREFIX: Final = "fxg_"
_SHAPE: Final = re.compile(r"fxg_([a-z0-9]{8})_[A-Za-z0-9_-]{43}")
_MAX_FILE_BYTES: Final = 64 * 1024 * 1024
MAX_KEY_LENGTH: Final = 200
"""A bearer value longer than this is refused before it is hashed."""


class KeyStore(Protocol):
    """Where key records live (the state backend's key methods have the same names)."""

    async def put_key(self, record: KeyRecord) -> None: ...
    async def get_key(self, key_hash: str) -> KeyRecord | None: ...
    async def list_keys(self) -> list[KeyRecord]: ...
    async def delete_key(self, key_id: str) -> bool: ...


def hash_key(key: str) -> str:
    """SHA-256 (hex) of *key*, as stored."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def new_key(
    *,
    name: str = "",
    budget_usd: float | None = None,
    period: Literal["day", "total"] = "total",
    allowed_models: Sequence[str] = (),
    allowed_providers: Sequence[str] = (),
    rate_per_minute: float | None = None,
) -> tuple[str, KeyRecord]:
    """A new key and its record: show the key once, store the record."""
    key_id = secrets.token_hex(4)
    key = f"{_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
    record = KeyRecord(
        id=key_id,
        key_hash=hash_key(key),
        name=name,
        budget_usd=budget_usd,
        period=period,
        allowed_models=tuple(allowed_models),
        allowed_providers=tuple(allowed_providers),
        rate_per_minute=rate_per_minute,
        created=time.time(),
    )
    return key, record


def key_id_of(key: str) -> str | None:
    """The public id inside a well-formed key; ``None`` for anything else."""
    match = _SHAPE.fullmatch(key)
    return match[1] if match else None


def verify(record: KeyRecord | None, key_hash: str) -> bool:
    """Whether *record* is the one for *key_hash*, compared in constant time."""
    stored = record.key_hash if record is not None else "0" * 64
    return hmac.compare_digest(stored.encode(), key_hash.encode()) and record is not None


class FileKeys:
    """Key records in a JSON file: read again whenever the file changed, written atomically.

    Several gateway processes on one machine can share the file; a ``keys revoke`` takes effect
    at the next request of each (the file's inode, times and size are checked on every lookup,
    a ``stat`` call). The gateway reads a file that changed in a thread, off its event loop.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        chosen = path or os.environ.get("FLUX_GATEWAY_KEYS") or DEFAULT_KEYS_PATH
        self.path = Path(chosen)
        self._lock = threading.Lock()
        self._seen: tuple[int, int, int, int] | None = None
        self._by_hash: dict[str, KeyRecord] = {}

    def _stamp(self) -> tuple[int, int, int, int] | None:
        """The file's identity and state now (``None``: there is no file).

        Raises:
            ConfigurationError: The file cannot be looked at, is not a regular file, or is
                larger than 64 MiB.
        """
        try:
            status = self.path.stat()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ConfigurationError(f"cannot read the key file {self.path}: {exc}") from None
        if not stat.S_ISREG(status.st_mode):  # a FIFO would block the gateway's loop for ever
            raise ConfigurationError(f"the key file {self.path} is not a regular file")
        if status.st_size > _MAX_FILE_BYTES:
            raise ConfigurationError(f"the key file {self.path} is larger than 64 MiB")
        # Every write (`_write`) renames a new file into place: a new inode, whatever the clock
        # and the size say (a revoke and a create within one tick of the file system's clock).
        return (status.st_ino, status.st_mtime_ns, status.st_ctime_ns, status.st_size)

    def _read(self) -> bytes:
        """The file's bytes, from what is at the path when it is opened.

        The path was looked at (`_stamp`) before: a FIFO or a larger file put in its place since
        is refused here too, as that file (never waited on, never read past the cap).
        """
        descriptor = os.open(self.path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with open(descriptor, "rb") as stream:
            if not stat.S_ISREG(os.fstat(descriptor).st_mode):
                raise ConfigurationError(f"the key file {self.path} is not a regular file")
            data = stream.read(_MAX_FILE_BYTES + 1)
        if len(data) > _MAX_FILE_BYTES:
            raise ConfigurationError(f"the key file {self.path} is larger than 64 MiB")
        return data

    def _load(self) -> dict[str, KeyRecord]:
        stamp = self._stamp()
        if stamp is None:
            self._seen, self._by_hash = None, {}
            return self._by_hash
        if stamp == self._seen:
            return self._by_hash
        try:
            # utf-8-sig: a BOM, as some editors on Windows save a file, is not damage
            data = json.loads(self._read().decode("utf-8-sig"))
        except ConfigurationError:
            raise
        except (OSError, ValueError, RecursionError) as exc:
            raise ConfigurationError(f"cannot read the key file {self.path}: {exc}") from None
        keys = data.get("keys") if isinstance(data, dict) else None
        if not isinstance(keys, list):
            raise ConfigurationError(f"the key file {self.path} holds no key list")
        try:
            records = [record_from_dict(item) for item in keys]
        except ConfigurationError as exc:  # say which file, as for a file that cannot be read
            raise ConfigurationError(f"cannot read the key file {self.path}: {exc}") from None
        self._seen, self._by_hash = stamp, {record.key_hash: record for record in records}
        return self._by_hash

    def _write(self, records: list[KeyRecord]) -> None:
        folder = self.path.parent if str(self.path.parent) else Path(".")
        text = json.dumps({"keys": [record_to_dict(r) for r in records]}, indent=2) + "\n"
        try:
            handle, temporary = tempfile.mkstemp(dir=folder, prefix=".keys-", suffix=".tmp")
        except OSError as exc:
            raise ConfigurationError(
                f"cannot write the key file {self.path}: {exc.strerror or type(exc).__name__}"
            ) from None
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as out:
                out.write(text)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(temporary, 0o600)
            os.replace(temporary, self.path)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            if isinstance(exc, OSError):
                raise ConfigurationError(
                    f"cannot write the key file {self.path}: {exc.strerror or type(exc).__name__}"
                ) from None
            raise

    @contextlib.contextmanager
    def _changing(self) -> Iterator[dict[str, KeyRecord]]:
        """The records, read afresh under a lock that other processes respect too.

        A change reads the file, changes it and writes it back: without the lock (``flock`` on
        ``<file>.lock``), two ``keys create`` at once each wrote the file without the other's key.
        """
        with self._lock:
            try:
                lock = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            except OSError as exc:
                raise ConfigurationError(
                    f"cannot lock the key file {self.path}: {exc.strerror or type(exc).__name__}"
                ) from None
            try:
                with contextlib.suppress(ImportError):
                    import fcntl

                    fcntl.flock(lock, fcntl.LOCK_EX)
                self._seen = None  # another process may have written it within the same stamp
                yield self._load()
            finally:
                os.close(lock)  # releases the flock

    def put_sync(self, record: KeyRecord) -> None:
        """Add or replace *record*."""
        with self._changing() as current:
            records = {r.id: r for r in current.values()}
            records[record.id] = record
            self._write(list(records.values()))

    def list_sync(self) -> list[KeyRecord]:
        """Every record, oldest first."""
        with self._lock:
            return sorted(self._load().values(), key=lambda r: (r.created, r.id))

    def get_sync(self, key_hash: str) -> KeyRecord | None:
        """The record whose hash is *key_hash*."""
        with self._lock:
            return self._load().get(key_hash)

    def delete_sync(self, key_id: str) -> bool:
        """Remove the record with *key_id*; whether there was one."""
        with self._changing() as current:
            records = list(current.values())
            kept = [r for r in records if r.id != key_id]
            if len(kept) == len(records):
                return False
            self._write(kept)
            return True

    async def put_key(self, record: KeyRecord) -> None:
        self.put_sync(record)

    async def get_key(self, key_hash: str) -> KeyRecord | None:
        # A stat on every call; a file that changed is read in a thread (up to 64 MiB of JSON:
        # seconds in which the gateway's loop would answer nothing else), as is any lookup while
        # another thread holds the lock (reading it, or a `keys create` in this process).
        if self._lock.acquire(blocking=False):
            try:
                stamp = self._stamp()
                if stamp is None:
                    return None
                if stamp == self._seen:
                    return self._by_hash.get(key_hash)
            finally:
                self._lock.release()
        return await asyncio.to_thread(self.get_sync, key_hash)

    async def list_keys(self) -> list[KeyRecord]:
        return self.list_sync()

    async def delete_key(self, key_id: str) -> bool:
        return self.delete_sync(key_id)
