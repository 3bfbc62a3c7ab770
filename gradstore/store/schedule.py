"""When to capture: every N steps, an explicit list of steps, or log-spaced early steps then a cadence."""

from __future__ import annotations

import numpy as np

from gradstore.errors import StoreError


class Schedule:
    """A set of training steps at which the :class:`~gradstore.store.Recorder` captures.

    Build one with :meth:`every`, :meth:`at` or :meth:`log_then_every`; test membership with
    ``step in schedule``; list the steps below a bound with :meth:`steps`.
    """

    def __init__(self, *, explicit=(), every: int | None = None, start: int = 0):
        self._explicit = frozenset(int(s) for s in explicit)
        if any(s < 0 for s in self._explicit):
            raise StoreError("schedule steps must be >= 0")
        if every is not None and int(every) < 1:
            raise StoreError(f"a schedule cadence must be a positive number of steps, got every={every}")
        if start < 0:
            raise StoreError(f"a schedule start must be >= 0, got {start}")
        self._every = None if every is None else int(every)
        self._start = int(start)

    @classmethod
    def every(cls, n: int, *, start: int = 0) -> Schedule:
        """Steps ``start, start + n, start + 2n, ...``."""
        return cls(every=n, start=start)

    @classmethod
    def at(cls, steps) -> Schedule:
        """Exactly the given steps."""
        return cls(explicit=steps)

    @classmethod
    def log_then_every(cls, every: int, *, until: int, n_log: int = 20) -> Schedule:
        """Step 0, about ``n_log`` log-spaced steps in ``[1, until)``, then every ``every`` steps.

        Early training changes fastest, so the papers sample it densely (log-spaced) and later
        training on a regular cadence (multiples of ``every`` from ``until`` on).
        """
        if until < 1 or n_log < 1:
            raise StoreError("log_then_every needs until >= 1 and n_log >= 1")
        early = np.unique(np.round(np.geomspace(1, until, n_log + 1)[:-1]).astype(np.int64))
        start = -(-int(until) // int(every)) * int(every)
        return cls(explicit=[0, *early.tolist()], every=every, start=start)

    def __contains__(self, step) -> bool:
        step = int(step)
        if step in self._explicit:
            return True
        return self._every is not None and step >= self._start and (step - self._start) % self._every == 0

    def steps(self, stop: int) -> list[int]:
        """The scheduled steps in ``[0, stop)``, sorted."""
        found = {s for s in self._explicit if s < stop}
        if self._every is not None:
            found.update(range(self._start, stop, self._every))
        return sorted(found)

    def __repr__(self) -> str:
        parts = []
        if self._explicit:
            parts.append(f"at={sorted(self._explicit)[:8]}{'...' if len(self._explicit) > 8 else ''}")
        if self._every is not None:
            parts.append(f"every={self._every}, start={self._start}")
        return f"Schedule({', '.join(parts)})"
