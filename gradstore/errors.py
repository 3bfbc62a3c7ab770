"""Errors that describe bad input: one line saying what is wrong and how to fix it.

The CLI prints ``gradstore: error: <message>`` for any :class:`GradstoreError` and exits with
status 2; library users catch them as ordinary exceptions (they subclass :class:`ValueError`).
"""


class GradstoreError(ValueError):
    """Base class for every user-facing error of the toolkit."""


class DataError(GradstoreError):
    """Missing, truncated or altered data files, or invalid data parameters."""


class StoreError(GradstoreError):
    """A store that is missing, foreign, damaged or does not match what is being written."""


class CaptureError(GradstoreError):
    """A model, loss or input the capture engine cannot handle."""


class ConfigError(GradstoreError):
    """An experiment configuration file that cannot be read, or a setting of the wrong type or range."""


class AnalysisError(GradstoreError):
    """An analysis that cannot run as asked: nothing to compute, an empty store, an unreachable cluster."""
