"""Symbolic (sympy) checks of the coherence theorems of Chatterjee & Zielinski, "Making Coherence Out
of Nothing At All", evaluated through :mod:`analysis` so the implementation is held to the paper.

Each check is registered in :data:`REGISTRY` and returns a :class:`CheckResult`; its claimed formula
is a keyword argument whose default is the paper's, so a wrong statement can be fed in and rejected.

>>> from theory import run_checks
>>> all(r.passed for r in run_checks(["lemma4_zero_gradients"]))
True
"""

# Importing the check modules registers their checks; the import order is the order of the report.
from theory import definitions  # noqa: F401, I001
from theory import minibatch  # noqa: F401
from theory import examples  # noqa: F401
from theory.result import REGISTRY, CheckResult, run_checks

__all__ = ["REGISTRY", "CheckResult", "run_checks"]
