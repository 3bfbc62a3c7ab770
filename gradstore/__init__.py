"""gradstore: exact per-example gradient statistics, captured during training into Zarr v3.

``import gradstore`` is light: it does not import torch. ``gradstore.capture`` (which does) and the
store functions are loaded on first use.
"""

from gradstore.errors import CaptureError, DataError, GradstoreError, StoreError

__version__ = "0.1.0"

__all__ = ["CaptureError", "DataError", "GradstoreError", "StoreError", "__version__", "open_run"]


def __getattr__(name):
    if name == "open_run":
        from gradstore.store import open_run

        return open_run
    if name in ("capture", "store"):
        import importlib

        return importlib.import_module(f"gradstore.{name}")
    raise AttributeError(f"module 'gradstore' has no attribute {name!r}")
