"""One writer per store: an exclusive OS advisory lock held for the writer's lifetime.

The lock is ``flock(LOCK_EX | LOCK_NB)`` on the store's own directory (no lock file, so the store
holds nothing a plain zarr reader does not recognise). The kernel releases it when the writer
closes it or its process dies, so a crashed writer never leaves a stale lock: the next writer
simply gets it. Who holds it is recorded in the root attribute ``writer`` (pid, host, start time)
when the writer opens, and named when a second writer is refused.

Object stores (``s3://``, ``memory://``...) have no such lock; see ``docs/store-format.md``.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
import weakref
from pathlib import Path

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
            who = recorded() if recorded is not None else None
            by = (f"pid {who.get('pid')} on host {who.get('host')} (since {who.get('since')})"
                  if isinstance(who, dict) else "another process")
            raise StoreError(f"{name!r} is being written by {by}; a store has one writer at a time: wait "
                             f"for it to finish or stop it, or write to another path") from None
        self._fd = fd
        self._finalizer = weakref.finalize(self, os.close, fd)

    def release(self) -> None:
        """Release the lock (idempotent)."""
        self._finalizer()
