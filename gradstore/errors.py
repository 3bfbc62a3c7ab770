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


class RunFolderError(GradstoreError):
    """A run folder, checkpoint or result file that is foreign, damaged, or cannot be written."""

    @classmethod
    def write_failed(cls, what: str, exc: OSError, *, retry: str = "run again with --resume") -> "RunFolderError":
        """The one-line error for ``what`` failing with ``exc``: the reason, and what to do about it.

        A full disk (``ENOSPC``, ``EDQUOT``) says "free space then <retry>"; any other file-system
        error names its reason and the file.
        """
        import errno

        if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
            return cls(f"{what} failed: no space left on device; free space then {retry}")
        text = str(exc).strip()
        reason = getattr(exc, "strerror", None) or (text.splitlines()[0] if text else type(exc).__name__)
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        return cls(f"{what} failed: {reason}{where}; fix that then {retry}")
