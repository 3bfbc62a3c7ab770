"""The metric registry: every metric of :func:`analysis.report.analyze` declares itself here.

A metric is a function of a :class:`Context` returning a lazy :class:`xarray.Dataset`, registered
in its own module with the :func:`metric` decorator, which declares

- its **inputs** (:data:`INPUTS`): what the run must hold (``"moments"``, ``"dots"`` and ``"gram"``
  exactly or estimated from ``grad_coords``/``grad_proj``; ``"coords"``/``"proj"`` only from those);
- what it **needs** (:data:`NEEDS`): ``"classes"`` (a classification store with labels), ``"corrupt"``,
  ``"correct"``; a store without what a metric needs skips that metric with a note;
- its **tables**: one CSV per table, ``name -> dims``; each output variable goes into the table of
  its dimensions (variables with a ``permutation`` dimension, and scalars, stay in Zarr only). An
  output whose dimensions match no declared table is refused (never silently left out);
- its **plot**: ``plot(results, folder) -> [paths]``, called with the computed results;
- optionally a **finish**: ``finish(raw, state) -> (results, state)``, turning the metric's raw
  per-step outputs into its results, in step order, a batch of steps at a time (cumulative
  quantities carry their running sums in ``state``; see :class:`analysis.report.Plan`).

Adding a metric is one module (or a test file) with one decorated function::

    from analysis.registry import metric

    @metric("mean_loss", inputs=(), tables={"mean_loss": ("step",)})
    def mean_loss(ctx):
        return xr.Dataset({"mean_loss": ctx.ds["loss"].mean("example")})

It then appears in :data:`analysis.report.METRICS`, ``gradstore analyze --metrics``, the TOML
configuration check, the results, the CSV tables and the plots, with no other change.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import xarray as xr

from gradstore.errors import AnalysisError

#: what a metric may read: the exact stored variable of each, or an estimate (sources.ESTIMATE_VARIABLES)
INPUTS = {
    "moments": "norm_sq_of_sum",   # coherence moments per sample (or estimated from coords/proj)
    "dots": "dot_with_sum",        # per-example g_i · Σ g_j (or estimated)
    "gram": "gram",                # pairwise g_i · g_j (or estimated)
    "sq_norm": "sq_norm",          # per-example ||g_i||² (exact only)
    "coords": "grad_coords",       # the sampled coordinates themselves
    "proj": "grad_proj",           # the random projections themselves
}
#: inputs that an estimate from ``grad_coords``/``grad_proj`` can stand in for
ESTIMABLE = ("moments", "dots", "gram")
#: properties of the store a metric may need (without them it is skipped with a note)
NEEDS = ("classes", "corrupt", "correct")


@dataclass(frozen=True)
class Metric:
    """One registered metric (see the module docstring)."""

    name: str
    compute: Callable
    inputs: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()
    tables: dict = field(default_factory=dict)
    plot: Callable | None = None
    finish: Callable | None = None
    summary: str = ""


#: name -> Metric, in registration order (the default order of the analysis)
REGISTRY: dict[str, Metric] = {}


def metric(name: str, *, inputs=(), needs=(), tables=None, plot=None, finish=None):
    """Register the decorated ``fn(ctx) -> xarray.Dataset`` as the metric ``name``.

    Parameters
    ----------
    name : str
        Metric name (``gradstore analyze --metrics NAME``).
    inputs : sequence of str
        Keys of :data:`INPUTS` the metric reads.
    needs : sequence of str
        Keys of :data:`NEEDS`: without them the metric is skipped with a note.
    tables : dict of str to tuple of str
        CSV table name -> the dimensions of the variables that go into it.
    plot : callable, optional
        ``plot(results, folder) -> list of paths`` of the PNGs it wrote.
    finish : callable, optional
        ``finish(raw, state) -> (results, state)`` (see the module docstring).

    Raises
    ------
    AnalysisError
        For a name already registered, an unknown input or need, or a table name another metric has.
    """
    inputs, needs, tables = tuple(inputs), tuple(needs), dict(tables or {})
    if name in REGISTRY:
        raise AnalysisError(f"a metric named {name!r} is already registered; choose another name")
    bad = [i for i in inputs if i not in INPUTS] + [n for n in needs if n not in NEEDS]
    if bad:
        raise AnalysisError(f"metric {name!r}: unknown input/need {', '.join(bad)}; inputs are "
                            f"{', '.join(INPUTS)}, needs are {', '.join(NEEDS)}")
    taken = {t: m.name for m in REGISTRY.values() for t in m.tables}
    clash = [t for t in tables if t in taken]
    if clash:
        raise AnalysisError(f"metric {name!r}: table {clash[0]!r} is already metric {taken[clash[0]]!r}'s; "
                            "give the table another name")

    def register(fn):
        doc = (fn.__doc__ or "").strip().splitlines()
        REGISTRY[name] = Metric(name, fn, inputs, needs, {t: tuple(d) for t, d in tables.items()}, plot, finish,
                                doc[0] if doc else "")
        return fn

    return register


def unregister(name: str) -> None:
    """Remove the metric ``name`` (for tests that register their own)."""
    REGISTRY.pop(name, None)


class Names(Sequence):
    """The registered metric names, always current (a test's metric appears once registered)."""

    def __getitem__(self, index):
        return tuple(REGISTRY)[index]

    def __len__(self):
        return len(REGISTRY)

    def __repr__(self):
        return repr(tuple(REGISTRY))


def get(name: str) -> Metric:
    """The metric ``name``; :class:`AnalysisError` if none is registered under it."""
    if name not in REGISTRY:
        raise AnalysisError(f"unknown metric {name!r}; choose from {', '.join(REGISTRY)}")
    return REGISTRY[name]


def has_classes(ds: xr.Dataset) -> bool:
    """Whether ``ds`` is a classification store with class labels (``task`` attr, ``true_label``)."""
    if str(ds.attrs.get("task", "classification")) != "classification":
        return False
    if "true_label" not in ds.variables:
        return False
    labels = np.asarray(ds["true_label"].values)
    return bool(labels.size) and bool((labels >= 0).any())


def has(ds: xr.Dataset, need: str) -> bool:
    """Whether ``ds`` has what :data:`NEEDS` entry ``need`` names."""
    if need == "classes":
        return has_classes(ds)
    if need == "correct":
        return "correct" in ds.variables and has_classes(ds)
    return need in ds.variables  # "corrupt"


def table_of(metric_: Metric, dims) -> str | None:
    """The table of ``metric_`` that holds variables of dimensions ``dims`` (None: Zarr only)."""
    dims = frozenset(dims)
    if not dims or "permutation" in dims:
        return None
    for table, table_dims in metric_.tables.items():
        if frozenset(table_dims) == dims:
            return table
    raise AnalysisError(f"metric {metric_.name!r} has an output with dimensions {tuple(sorted(dims))} that none "
                        f"of its tables ({', '.join(metric_.tables) or 'none'}) declares; add a table for them "
                        "to its @metric(tables=...)")
