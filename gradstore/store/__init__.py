"""The gradstore run store: a Zarr v3 group per training run (format: ``docs/store-format.md``).

- :func:`open_run` reads a run as a lazy :class:`xarray.Dataset` of its committed steps.
- :func:`create_run` / :class:`RunWriter` write one step at a time from numpy arrays.
- :func:`verify_run` reads every committed value back and checks it against its digest.
- A :class:`Schedule` decides when a Recorder captures.

This package never imports torch, for reading or writing. The Recorder lives in the torch side,
:mod:`gradstore.record`; ``gradstore.store.Recorder`` still names it, importing it (and torch) only
when that name is asked for.
"""

from gradstore.errors import StoreError
from gradstore.store.reader import open_run
from gradstore.store.schedule import Schedule
from gradstore.store.schema import SAMPLES, SCHEMA_VERSION, RunLayout
from gradstore.store.verify import Verification, verify_run
from gradstore.store.writer import RunWriter, create_run

__all__ = ["SAMPLES", "SCHEMA_VERSION", "Recorder", "RunLayout", "RunWriter", "Schedule", "StoreError",
           "Verification", "create_run", "open_run", "verify_run"]


def __getattr__(name: str):
    if name == "Recorder":  # torch side: imported on first use only
        from gradstore.record import Recorder

        return Recorder
    raise AttributeError(f"module 'gradstore.store' has no attribute {name!r}")
