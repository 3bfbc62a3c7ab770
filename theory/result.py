"""Check results and the registry of checks run by ``gradstore theory``.

A *checker* is a small function that verifies one statement of the paper and returns
``(passed, detail)``. Its claimed formula is a keyword parameter whose default is the paper's, so a
test can hand it a wrong statement and expect ``passed`` to be False. The :func:`checker` decorator
times it, turns an exception into a failed result and registers it under a stable name.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

#: name -> wrapped checker, in registration (= presentation) order
REGISTRY: dict[str, Callable[..., CheckResult]] = {}


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check.

    Attributes
    ----------
    name : str
        Stable identifier (``theorem3_moments``).
    statement : str
        The statement of the paper being verified.
    location : str
        Where it is in the paper.
    method : str
        How it is verified (symbolic identity, exhaustive expansion, ...).
    passed : bool
        Whether the claimed statement was verified.
    seconds : float
        Wall time of the check.
    detail : str
        One line: what was shown, or why the claim was rejected.
    """

    name: str
    statement: str
    location: str
    method: str
    passed: bool
    seconds: float
    detail: str

    def to_dict(self) -> dict:
        """The result as a JSON-serializable dict."""
        return asdict(self)


def checker(name: str, *, statement: str, location: str, method: str):
    """Register a function returning ``(passed, detail)`` as the check ``name``.

    The wrapped function takes the same keyword arguments (the claimed formulas) and returns a
    :class:`CheckResult`. An exception raised while checking is a failed check whose detail names it.
    """
    if name in REGISTRY:
        raise ValueError(f"a theory check named {name!r} is already registered; choose another name")

    def decorate(func: Callable[..., tuple[bool, str]]) -> Callable[..., CheckResult]:
        @functools.wraps(func)
        def run(**claims) -> CheckResult:
            start = time.perf_counter()
            try:
                passed, detail = func(**claims)
            except Exception as exc:  # a claim that cannot even be evaluated is rejected
                passed, detail = False, f"raised {type(exc).__name__}: {exc}"
            return CheckResult(
                name=name,
                statement=statement,
                location=location,
                method=method,
                passed=bool(passed),
                seconds=time.perf_counter() - start,
                detail=detail,
            )

        REGISTRY[name] = run
        return run

    return decorate


def run_checks(names: list[str] | None = None) -> list[CheckResult]:
    """Run the registered checks (all of them, or those named) with the paper's statements.

    Parameters
    ----------
    names : list of str, optional
        Check names, as in :data:`REGISTRY`; None runs every check.

    Returns
    -------
    list of CheckResult
        In registration order (or in the order of ``names``).
    """
    from gradstore.errors import GradstoreError

    selected = list(REGISTRY) if names is None else list(names)
    unknown = [n for n in selected if n not in REGISTRY]
    if unknown:
        raise GradstoreError(
            f"unknown theory check(s) {', '.join(unknown)}; choose from {', '.join(REGISTRY)}"
        )
    return [REGISTRY[n]() for n in selected]
