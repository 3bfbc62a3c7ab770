"""Where a run store lives: local paths, ``file://`` URLs and other fsspec URLs.

Local paths and ``file://`` URLs use zarr's :class:`~zarr.storage.LocalStore`, which writes every
key to a temporary file and renames it into place, so a key is always either the old or the new
value, even under ``kill -9``. Other URLs (``memory://``, ``s3://``, ...) use
:class:`~zarr.storage.FsspecStore`; object stores replace whole objects as well. On ``s3://``
fsspec's listings cache is off by default (``use_listings_cache=False``): a reader or a resuming
writer lists what is in the bucket now, not what an earlier listing of this process saw.
"""

from __future__ import annotations

import os
from pathlib import Path

import zarr
from zarr.storage import FsspecStore, LocalStore

from gradstore.errors import StoreError


def local_path(target: str | os.PathLike) -> Path | None:
    """The filesystem path of ``target``, or ``None`` if it is a non-local URL."""
    text = os.fspath(target)
    if text.startswith("file://"):
        return Path(text[len("file://"):])
    if "://" in text:
        return None
    return Path(text).expanduser()


def open_store(target, *, read_only: bool, storage_options: dict | None = None):
    """A zarr store for ``target`` (path, URL or an existing zarr store)."""
    if isinstance(target, zarr.abc.store.Store):
        return target
    path = local_path(target)
    if path is not None:
        if read_only and not path.exists():
            raise StoreError(f"no run store at {os.fspath(target)!r}; check the path")
        return LocalStore(path, read_only=read_only)
    options = dict(storage_options or {})
    if os.fspath(target).split("://", 1)[0] in ("s3", "s3a"):
        # listings are read fresh: a cached listing misses what another process wrote since
        options.setdefault("use_listings_cache", False)
    try:
        return FsspecStore.from_url(os.fspath(target), read_only=read_only, storage_options=options)
    except (ImportError, ValueError, OSError) as exc:
        raise StoreError(f"cannot open {os.fspath(target)!r} ({exc}); check the URL and its fsspec backend") from exc


def describe(target) -> str:
    """A short printable name of ``target`` for messages."""
    if isinstance(target, zarr.abc.store.Store):
        return str(target)
    return os.fspath(target)


def remove_partial_files(path: Path) -> int:
    """Delete temporary ``*.partial`` files a killed LocalStore write left under ``path``."""
    count = 0
    for leftover in path.rglob("*.partial"):
        leftover.unlink(missing_ok=True)
        count += 1
    return count
