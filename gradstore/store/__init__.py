"""The gradstore run store: a Zarr v3 group per training run (format: ``docs/store-format.md``).

- :func:`open_run` reads a run as a lazy :class:`xarray.Dataset` of its committed steps.
- :func:`create_run` / :class:`RunWriter` write one step at a time from numpy arrays.
- :func:`verify_run` reads every committed value back and checks it against its digest.
- :class:`Recorder` is what a training loop calls every step; a :class:`Schedule` decides when
  it captures.

Importing this package does not import torch (the Recorder imports it when it is created).
"""

from gradstore.errors import StoreError
from gradstore.store.reader import open_run
from gradstore.store.recorder import Recorder
from gradstore.store.schedule import Schedule
from gradstore.store.schema import SAMPLES, SCHEMA_VERSION, RunLayout
from gradstore.store.verify import Verification, verify_run
from gradstore.store.writer import RunWriter, create_run

__all__ = ["SAMPLES", "SCHEMA_VERSION", "Recorder", "RunLayout", "RunWriter", "Schedule", "StoreError",
           "Verification", "create_run", "open_run", "verify_run"]
