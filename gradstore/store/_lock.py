"""One writer per store: an exclusive OS advisory lock held for the writer's lifetime.

The lock is ``flock(LOCK_EX | LOCK_NB)`` on the store's own directory (no lock file, so the store
holds nothing a plain zarr reader does not recognise). The kernel releases it when the writer
closes it or its process dies, so a crashed writer never leaves a stale lock: the next writer
simply gets it. Who holds it is recorded in the root attribute ``writer`` (pid, host, start time)
when the writer opens, and named when a second writer is refused.

Stores on fsspec URLs have no kernel lock. ``memory://`` (visible to this process only) is locked by
a registry of this process (:class:`MemoryLock`); ``s3://`` by a lease object beside the store, taken
and renewed with S3 conditional writes (:class:`ObjectLease`); writing to any other protocol is
refused (see ``docs/object-storage.md``).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
import uuid
import weakref
from pathlib import Path

from zarr.core.sync import sync

from gradstore.errors import StoreError


def holder() -> dict:
    """The ``writer`` root attribute of this process: pid, host and start time (UTC, ISO 8601)."""
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


class WriterLock:
    """The exclusive writer lock of the local store directory ``path`` (created if missing).

    Parameters
    ----------
    path : pathlib.Path
        The store directory.
    name : str
        How the store is named in messages.
    recorded : callable, optional
        Returns the ``writer`` attribute last recorded in the store (or None), to name the holder
        when the lock is taken.

    Raises
    ------
    StoreError
        If another writer (another process, or another writer in this one) holds the lock.
    """

    def __init__(self, path: Path, name: str, recorded=None):
        try:
            path.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise StoreError(f"cannot open {name!r} for writing ({exc.strerror}); check the path and its "
                             f"permissions") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreError(_busy(name, recorded() if recorded is not None else None)) from None
        self._fd = fd
        self._finalizer = weakref.finalize(self, os.close, fd)

    def check(self) -> None:
        """Nothing to check: the kernel keeps the lock until it is released or the process dies."""

    def release(self) -> None:
        """Release the lock (idempotent)."""
        self._finalizer()


# ---------------------------------------------------------------------- object stores
#: seconds a writer lease on object storage lasts without renewal (a holder renews every quarter of it)
LEASE_SECONDS = 60.0
#: suffix of the lease object, a sibling of the store's prefix (never inside it: zarr would list it)
LEASE_SUFFIX = ".gradstore-lock"


def object_lock(store, name: str, *, ttl: float | None = None):
    """The writer lock of a store on fsspec storage: :class:`MemoryLock` for ``memory://``,
    :class:`ObjectLease` for ``s3://``; any other protocol is refused (no exclusive writer there).

    Raises
    ------
    StoreError
        If the protocol has no lock, the store is the root of a bucket, or another writer holds it.
    """
    protocols = store.fs.protocol if isinstance(store.fs.protocol, tuple) else (store.fs.protocol,)
    if "memory" in protocols:
        return MemoryLock(store.path, name)
    if "s3" in protocols or "s3a" in protocols:
        return ObjectLease(store.fs, store.path, name, ttl=LEASE_SECONDS if ttl is None else ttl)
    raise StoreError(f"cannot write {name!r}: gradstore writes a run store only where it can hold the one-writer "
                     f"lock (local disks, memory://, s3:// with conditional writes), not on "
                     f"{protocols[0]}://; write the run locally and copy the finished store there "
                     f"(reading from {protocols[0]}:// works)")


#: stores on memory:// held by a writer of this process (memory:// is local to the process)
_MEMORY_HELD: dict[str, dict] = {}
_MEMORY_GUARD = threading.Lock()


class MemoryLock:
    """The writer lock of a ``memory://`` store: a registry of this process (the only one that can
    see the store)."""

    def __init__(self, path: str, name: str):
        key = path.rstrip("/")
        with _MEMORY_GUARD:
            if key in _MEMORY_HELD:
                raise StoreError(_busy(name, _MEMORY_HELD[key]))
            _MEMORY_HELD[key] = holder()
        self._finalizer = weakref.finalize(self, _memory_release, key)

    def check(self) -> None:
        """Nothing to check: the lock cannot be lost while this process runs."""

    def release(self) -> None:
        """Release the lock (idempotent)."""
        self._finalizer()


def _memory_release(key: str) -> None:
    with _MEMORY_GUARD:
        _MEMORY_HELD.pop(key, None)


def _busy(name: str, who) -> str:
    by = (f"pid {who.get('pid')} on host {who.get('host')} (since {who.get('since')})"
          if isinstance(who, dict) else "another process")
    return (f"{name!r} is being written by {by}; a store has one writer at a time: wait for it to finish or "
            f"stop it, or write to another path")


class _Lease:
    """The lease object of one writer and what its holder knows of it (shared with the renewal thread)."""

    def __init__(self, fs, key: str, name: str, ttl: float):
        self.fs, self.key, self.name, self.ttl = fs, key, name, ttl
        self.token = uuid.uuid4().hex
        self.etag, self.renewed, self.lost = None, 0.0, None
        self.stop = threading.Event()

    def document(self) -> bytes:
        return json.dumps({**holder(), "token": self.token, "expires": time.time() + self.ttl}).encode()

    def put(self, **condition) -> str:
        """Write the lease (``mode="create"``: If-None-Match; ``IfMatch=etag``); its new ETag."""
        out = sync(self.fs._pipe_file(self.key, self.document(), **condition))
        etag = out.get("ETag") if isinstance(out, dict) else None
        if not etag:  # without it no later write could be conditional
            raise OSError("the object store returned no ETag for the lease")
        return etag

    def read(self) -> tuple[dict | None, str]:
        """The lease's JSON (None if it is not a lease gradstore wrote) and its ETag."""
        info = sync(self.fs._info(self.key, refresh=True))
        raw = sync(self.fs._cat_file(self.key))
        try:
            held = json.loads(raw)
        except ValueError:
            held = None
        return (held if isinstance(held, dict) else None), info.get("ETag", "")

    def renew_loop(self) -> None:
        """The renewal thread: replace the lease every ``ttl / 4`` s while it is still this writer's."""
        while not self.stop.wait(self.ttl / 4):
            try:
                self.etag, self.renewed = self.put(IfMatch=self.etag), time.monotonic()
            except FileNotFoundError:
                self.lost = "its lease object was deleted"
                return
            except Exception as exc:  # a failed request is retried at the next beat; check() judges the age
                if _precondition(exc):
                    self.lost = "another writer replaced its lease"
                    return

    def release(self, thread: threading.Thread | None) -> None:
        self.stop.set()
        if thread is not None:
            thread.join(timeout=10)
        if self.lost is not None:
            return
        self.lost = "it was released"
        try:
            if self.etag and sync(self.fs._info(self.key, refresh=True)).get("ETag") == self.etag:
                sync(self.fs._rm_file(self.key))
        except Exception:  # an unreachable store, or interpreter exit: the lease expires by itself
            pass


class ObjectLease:
    """The writer lease of a store on S3: the object ``<store>.gradstore-lock`` beside its prefix.

    Taken with a conditional create (``If-None-Match: *``), so of two writers opening at once
    exactly one gets it; renewed by a background thread every ``ttl / 4`` seconds with a
    conditional replace (``If-Match`` on the lease's ETag), so a lease another writer took over is
    never renewed; deleted on :meth:`release`. A lease is stale, and taken over (again with
    ``If-Match``), when its ``expires`` time has passed, or at once when it names this host and a
    process that no longer runs (a writer killed here). :meth:`check`, which the writer calls
    before every step and before every commit, raises once the lease is lost or has gone unrenewed
    for ``3 ttl / 4`` seconds (a holder cut off from the store), so a writer never commits without
    a lease. An endpoint that ignores conditional writes is detected when the lease is taken, and
    refused.

    The object holds JSON: ``pid``, ``host``, ``since`` (the writer's :func:`holder`), ``token``
    (unique per writer) and ``expires`` (Unix time). The clocks of hosts sharing a store must agree
    to well within ``ttl``.
    """

    def __init__(self, fs, path: str, name: str, *, ttl: float):
        path = path.rstrip("/")
        if "/" not in path:
            raise StoreError(f"cannot write {name!r}: a run store on object storage lives under a prefix of its "
                             f"bucket (s3://{path}/NAME.zarr), not at the bucket's root")
        self._lease = lease = _Lease(fs, path + LEASE_SUFFIX, name, float(ttl))
        self.key, self.name, self.ttl = lease.key, name, lease.ttl
        self._take()
        thread = threading.Thread(target=lease.renew_loop, name="gradstore-lease", daemon=True)
        thread.start()
        self._finalizer = weakref.finalize(self, lease.release, thread)

    def _take(self) -> None:
        lease = self._lease
        for _ in range(3):
            try:
                etag = lease.put(mode="create")
            except FileExistsError:
                pass
            except Exception as exc:  # botocore/aiohttp errors have no common base class
                raise StoreError(f"cannot take the writer lock of {self.name!r} (creating {self.key!r}: "
                                 f"{_first_line(exc)}); check that the bucket exists and the credentials may "
                                 f"write there") from None
            else:
                return self._taken(etag)
            try:
                held, etag = lease.read()
            except FileNotFoundError:  # released in between: try again
                continue
            if not _stale(held):
                raise StoreError(_busy(self.name, held) + f" (its lease {self.key!r} expires {_when(held)} "
                                 f"unless renewed)")
            try:
                return self._taken(lease.put(IfMatch=etag))
            except FileNotFoundError:
                continue
            except StoreError:
                raise
            except Exception as exc:
                if _precondition(exc):
                    raise StoreError(_busy(self.name, None) + " (it took over the stale lease at the same "
                                     "moment)") from None
                raise StoreError(f"cannot take over the stale writer lock {self.key!r} of {self.name!r} "
                                 f"({_first_line(exc)})") from None
        raise StoreError(f"cannot take the writer lock of {self.name!r}: {self.key!r} keeps appearing and "
                         f"disappearing (other writers?); try again")

    def _taken(self, etag: str) -> None:
        """Holding the lease: check the endpoint honours both conditions, or give it up and refuse."""
        lease, ignored = self._lease, None
        try:
            try:
                lease.put(mode="create")
                ignored = "If-None-Match"
            except FileExistsError:
                pass
            if ignored is None:
                try:
                    lease.put(IfMatch='"00000000000000000000000000000000"')
                    ignored = "If-Match"
                except Exception as exc:
                    if not _precondition(exc):
                        raise
        except Exception as exc:  # botocore/aiohttp errors have no common base class
            self._drop()
            raise StoreError(f"cannot write {self.name!r}: checking that its object store honours conditional "
                             f"writes failed ({_first_line(exc)}); try again, or write locally and copy the "
                             f"store") from None
        if ignored is not None:
            self._drop()
            raise StoreError(f"cannot write {self.name!r}: its object store ignores conditional writes "
                             f"({ignored}), so gradstore cannot hold the one-writer lock there; use an endpoint "
                             f"that supports them (AWS S3, MinIO, moto) or write locally and copy the store")
        lease.etag, lease.renewed = etag, time.monotonic()

    def _drop(self) -> None:
        """Delete the lease this writer just wrote (it gives it up before holding it)."""
        try:
            sync(self._lease.fs._rm_file(self.key))
        except Exception:  # it expires by itself
            pass

    def check(self) -> None:
        """Raise :class:`StoreError` unless this writer still holds a fresh lease."""
        lease = self._lease
        lost, age = lease.lost, time.monotonic() - lease.renewed
        if lost is None and age > self.ttl - self.ttl / 4:
            lost = f"it was last renewed {age:.0f} s ago: the store cannot be reached?"
        if lost is not None:
            raise StoreError(f"this writer lost the writer lock of {self.name!r} ({lost}); it stopped before "
                             f"committing more: the committed steps are intact, resume the run")

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still this writer's (idempotent)."""
        self._finalizer()


def _stale(held) -> bool:
    """Whether a lease read from the store may be taken over: expired, or its writer died on this host."""
    if not isinstance(held, dict):
        return True  # not a lease gradstore wrote
    if held.get("host") == socket.gethostname() and isinstance(held.get("pid"), int) and held["pid"] > 0:
        try:
            os.kill(held["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            pass
    expires = held.get("expires")
    return not isinstance(expires, (int, float)) or expires < time.time()


def _precondition(exc: BaseException) -> bool:
    """Whether ``exc`` (as s3fs raises it) is an S3 412 Precondition Failed."""
    for e in (exc, exc.__cause__):
        response = getattr(e, "response", None)
        if isinstance(response, dict) and response.get("Error", {}).get("Code") in ("PreconditionFailed", "412"):
            return True
    return False


def _when(held) -> str:
    expires = held.get("expires") if isinstance(held, dict) else None
    if not isinstance(expires, (int, float)):
        return "at an unknown time"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
