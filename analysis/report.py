"""The analysis driver: open a store, dispatch the registered metrics, compute them.

The metrics themselves live in their modules and declare their inputs, needs, tables and plots
with :func:`analysis.registry.metric`; this module only opens stores (:func:`open_store`), checks
the request against the registry and the store (:func:`prepare`), and computes: lazily as one
Dataset (:func:`analyze`, for any Dask scheduler) or a few steps at a time with bounded memory
(:meth:`Plan.compute`, what ``gradstore analyze`` runs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import xarray as xr

from analysis import coherence, hardness, losssplit, minibatch, pairwise, registry, sources
from analysis.context import MAX_PAIR_EXAMPLES, Context
from gradstore.errors import AnalysisError, StoreError

#: the modules of the built-in metrics, imported in the default order of the analysis (each registers its own)
METRIC_MODULES = (coherence, pairwise, losssplit, hardness, minibatch)
#: entry-point group of metrics from other packages: ``[project.entry-points."gradstore.metrics"]``
#: ``name = "package.module"``; each module is imported here, and registers its metrics
ENTRY_POINTS = "gradstore.metrics"


def _load_plugins() -> None:
    from importlib.metadata import entry_points

    for point in entry_points(group=ENTRY_POINTS):
        try:
            point.load()
        except Exception as exc:  # a broken plug-in names itself, in one line
            raise AnalysisError(f"the metric plug-in {point.name!r} ({point.value}) failed to import: {exc}; "
                                "fix or uninstall it") from None


_load_plugins()
#: the registered metric names, in order (always current: a metric registered later appears)
METRICS = registry.Names()


def open_store(path, *, verify: bool = False, skip_damaged: bool = False, progress=None) -> xr.Dataset:
    """Open a run store lazily; one-line errors if it is missing, not a run or has nothing to analyse.

    ``path`` is a local directory or an fsspec URL (``s3://...``), passed on to
    :func:`gradstore.store.open_run`. With ``verify``, every committed value is first read back and
    checked (:func:`gradstore.store.verify_run`): a damaged store is refused, or with
    ``skip_damaged`` its damaged steps are left out (listed in ``attrs["skipped_steps"]``).

    Raises
    ------
    StoreError
        If ``path`` is missing, a file, or not a gradstore run.
    AnalysisError
        If the run has no committed step (a run stopped before its first capture) or no examples.
    """
    from gradstore.store import open_run

    if not str(path).strip():
        raise StoreError("the run store path is empty; give the directory a capture run wrote")
    if "://" not in str(path):
        local = Path(path)
        if not local.exists():
            raise StoreError(f"no run store at {str(local)!r}; give the directory a capture run wrote")
        if not local.is_dir():
            raise StoreError(f"{str(local)!r} is a file, not a run store directory; give the run's directory")
    skip = ()
    if verify:
        from gradstore.store import verify_run

        checked = verify_run(str(path), progress=progress)
        if not checked.ok and (checked.static_damage or not skip_damaged):
            raise StoreError(checked.message())
        skip = checked.damaged_indices
    ds = open_run(str(path), skip_steps=skip)
    check_not_empty(ds, str(path))
    return ds


def check_not_empty(ds: xr.Dataset, name: str) -> None:
    """:class:`AnalysisError` if run ``name`` has no committed step or no tracked example."""
    if ds.sizes.get("step", 0) == 0:
        raise AnalysisError(f"run store {name!r} has no committed steps (the run stopped before its first "
                            "capture); there is nothing to analyse: continue the run with --resume or rerun it")
    if ds.sizes.get("example", 0) == 0:
        raise AnalysisError(f"run store {name!r} tracks no examples, so there is nothing to analyse; "
                            "record a run with a tracked sample (tracked_train >= 2)")


def pairwise_source(ds: xr.Dataset) -> str | None:
    """Best source of pairwise products: exact ``gram``, else ``grad_coords``, else ``grad_proj``."""
    return sources.best_source(ds, "gram")


def check_metrics(metrics) -> tuple[str, ...]:
    """Validate metric names (each once, in the order given).

    Raises
    ------
    AnalysisError
        Naming the unknown ones, or if no metric is asked for (there would be nothing to compute).
    """
    metrics = list(metrics)
    unknown = [str(m) for m in metrics if m not in registry.REGISTRY]
    if unknown:
        raise AnalysisError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(METRICS)}")
    if not metrics:
        raise AnalysisError(f"no metric asked for, so there is nothing to compute; choose from {', '.join(METRICS)}")
    return tuple(dict.fromkeys(metrics))


def _missing_inputs(ds: xr.Dataset, metric: registry.Metric) -> list[str]:
    missing = []
    for name in metric.inputs:
        exact = registry.INPUTS[name]
        if name in registry.ESTIMABLE:
            if not sources.available_sources(ds, exact):
                missing.append(f"{exact} (or grad_coords/grad_proj)")
        elif exact not in ds.variables:
            missing.append(exact)
    return missing


@dataclass
class Plan:
    """The checked request: each metric's lazy raw output, ready to compute.

    Attributes
    ----------
    raw : dict of str to xarray.Dataset
        Each metric's lazy output (before its ``finish``, if it has one).
    attrs : dict
        The results' attributes (metrics, options, ``notes`` on what was skipped or sampled).
    """

    raw: dict
    attrs: dict = field(default_factory=dict)

    def _finish(self, name: str, part: xr.Dataset, state=None):
        metric = registry.get(name)
        if metric.finish is None:
            return part, None
        out, state = metric.finish(part, state)
        for var in out.data_vars:
            source = next((part[v].attrs["source"] for v in part.data_vars if "source" in part[v].attrs), None)
            if source is not None:
                out[var].attrs.setdefault("source", source)
        return out, state

    def _merge(self, parts: dict) -> xr.Dataset:
        seen = {}
        for name, part in parts.items():
            for var in part.data_vars:
                if var in seen:
                    raise AnalysisError(f"metrics {seen[var]!r} and {name!r} both output {var!r}; rename one")
                seen[var] = name
                part[var].attrs["metric"] = name
                registry.table_of(registry.get(name), part[var].dims)  # refuses an undeclared table
        out = xr.merge(list(parts.values()), compat="override", join="outer", combine_attrs="override") \
            if parts else xr.Dataset()
        out.attrs = dict(self.attrs)
        return out

    def lazy(self) -> xr.Dataset:
        """Every metric's results as one lazy Dataset (finished lazily)."""
        return self._merge({name: self._finish(name, part)[0] for name, part in self.raw.items()})

    def compute(self, *, steps_per_batch: int = 8, compute=None, progress=None,
                null_distributions: bool = True) -> xr.Dataset:
        """Compute the results a few steps at a time: peak memory bounded by a batch, not by the run.

        Each batch of steps is computed (one Dask compute of every metric's raw per-step output),
        then finished in step order (cumulative quantities carry their running sums from batch to
        batch, so they are exact); static outputs are computed once.

        Parameters
        ----------
        steps_per_batch : int
            Steps per compute.
        compute : callable, optional
            Turns a lazy Dataset into a computed one (default ``Dataset.compute``: the current
            Dask scheduler, e.g. a ``distributed.Client`` that is open).
        progress : callable, optional
            Wraps the iterable of batches (e.g. ``tqdm``).
        null_distributions : bool
            Keep the null distributions (``*_null``, permutation × step × layer: they grow with the
            run); False keeps only their bands and p-values (what the CSV tables hold).
        """
        compute = compute or (lambda obj: obj.compute())
        raw = xr.merge([part.rename({v: f"{name}\0{v}" for v in part.data_vars}) for name, part in self.raw.items()],
                       compat="override", join="outer", combine_attrs="drop") if self.raw else xr.Dataset()
        per_step = [v for v in raw.data_vars if "step" in raw[v].dims]
        static = compute(raw.drop_vars(per_step).drop_dims("step", errors="ignore"))
        n_steps = raw.sizes.get("step", 0)
        states = {name: None for name in self.raw}
        batches = {name: [] for name in self.raw}
        starts = range(0, n_steps, max(1, steps_per_batch)) if per_step else range(0)
        for start in (progress(starts) if progress else starts):
            batch = compute(raw[per_step].isel(step=slice(start, start + steps_per_batch))).merge(static, join="exact")
            for name in self.raw:
                part = self._of(batch, name)
                out, states[name] = self._finish(name, part, states[name])
                if not null_distributions:
                    out = out.drop_vars([v for v in out.data_vars if "permutation" in out[v].dims and "step" in out[v].dims])
                batches[name].append(out)
        parts = {}
        for name in self.raw:
            if batches[name]:
                first = batches[name][0]
                stepped = [v for v in first.data_vars if "step" in first[v].dims]
                joined = xr.concat([b[stepped] for b in batches[name]], "step", data_vars="all",
                                   combine_attrs="override")
                parts[name] = joined.merge(first.drop_vars(stepped).drop_dims("step", errors="ignore"),
                                           combine_attrs="override", join="exact")
            else:
                parts[name], _ = self._finish(name, self._of(static, name))
        out = self._merge(parts)
        template = self.lazy()  # graph only: the dimension order of every variable
        out = xr.Dataset({v: out[v].transpose(*template[v].dims) for v in out.data_vars}, attrs=out.attrs)
        if not null_distributions:
            out.attrs["null_distributions"] = "left out (bands and p-values kept)"
        return out

    def _of(self, data: xr.Dataset, name: str) -> xr.Dataset:
        prefix = f"{name}\0"
        names = [v for v in data.data_vars if v.startswith(prefix)]
        part = data[names].rename({v: v[len(prefix):] for v in names})
        for v in part.data_vars:
            part[v].attrs = dict(self.raw[name][v].attrs)
        part.attrs = dict(self.raw[name].attrs)
        return part


def prepare(ds: xr.Dataset, *, metrics=None, n_permutations: int = 1000, seed: int = 0, snapshot=None,
            batch_sizes=(1, 10, 100), pair_source: str | None = None,
            max_pair_examples: int = MAX_PAIR_EXAMPLES) -> Plan:
    """Check the request against the registry and the store; build every metric lazily.

    Parameters are those of :func:`analyze`. A metric whose :data:`~analysis.registry.NEEDS` the
    store lacks (e.g. classes on a sequence or regression store) is skipped, with a note in
    ``attrs["notes"]`` and its name in ``attrs["skipped_metrics"]``.

    Raises
    ------
    AnalysisError
        For an unknown metric or source.
    StoreError
        If a requested metric's inputs are not in the store (naming them).
    """
    metrics = check_metrics(METRICS if metrics is None else metrics)
    if pair_source is None:
        pair_source = pairwise_source(ds)
    else:
        sources.check_source(pair_source)
    ctx = Context(ds, n_permutations=n_permutations, seed=seed, snapshot=snapshot, batch_sizes=tuple(batch_sizes),
                  pair_source=pair_source, max_pair_examples=max_pair_examples)
    missing = {name: _missing_inputs(ds, registry.get(name)) for name in metrics}
    missing = {name: m for name, m in missing.items() if m}
    if missing:
        what = "; ".join(f"{name} needs {', '.join(m)}" for name, m in missing.items())
        raise StoreError(f"{what}, which this run did not store; drop those metrics or capture them")
    raw, skipped = {}, []
    for name in metrics:
        metric = registry.get(name)
        lacking = [need for need in metric.needs if not registry.has(ds, need)]
        if lacking:
            skipped.append(name)
            ctx.note(f"{name}: skipped, the store has no {' and no '.join(lacking)} "
                     f"(task {ds.attrs.get('task', 'classification')!r})")
            continue
        raw[name] = metric.compute(ctx)
    attrs = dict(metrics=[m for m in metrics if m not in skipped], n_permutations=n_permutations, seed=seed,
                 pairwise_source=pair_source or "none", skipped_metrics=skipped, notes=list(ctx.notes))
    if ctx.sampled and any(registry.get(m).inputs and "gram" in registry.get(m).inputs for m in raw):
        attrs["pair_sample"] = int(ctx.pair_index.size)
    return Plan(raw, attrs)


def analyze(ds: xr.Dataset, *, metrics=None, n_permutations: int = 1000, seed: int = 0,
            snapshot=None, batch_sizes=(1, 10, 100), pair_source: str | None = None,
            max_pair_examples: int = MAX_PAIR_EXAMPLES) -> xr.Dataset:
    """All requested metrics of a run as one lazy Dataset.

    Parameters
    ----------
    ds : xarray.Dataset
        A run (:func:`open_store`, ``gradstore.open_run``, ``xarray.open_zarr`` or
        :func:`analysis.synthetic.synthetic_run`).
    metrics : sequence of str, optional
        Any of :data:`METRICS` (default: all of them).
    n_permutations : int
        Null worlds per permutation test (0: no nulls).
    seed : int
        Seed of the permutations, the minibatch draws and the pair sample.
    snapshot : int, optional
        Step number splitting easy from hard (default: the middle captured step).
    batch_sizes : sequence of int
        Minibatch sizes for the amplification check (larger than the sample are dropped).
    pair_source : {"exact", "coords", "proj"}, optional
        Where pairwise products come from (default: the exact ``gram`` if stored, else
        ``grad_coords``, else ``grad_proj``).
    max_pair_examples : int
        Pairwise metrics over more training examples than this use a seeded sample of this many
        (exact over the sampled pairs, with ``*_se`` jackknife standard errors).

    Returns
    -------
    xarray.Dataset
        Coherence (dims source, step, sample, layer); stiffness, confusion, loss split and
        minibatch per (step, layer); easy/hard per (step, layer, group[, group_]); null
        distributions on ``permutation``. Pairwise metrics carry the ``source`` they used in
        their attributes. The layer ``(model)`` is the whole model. ``attrs["notes"]`` says what
        was skipped (a store without classes) or sampled.

    Notes
    -----
    Pairwise metrics, the loss split, easy/hard and minibatch use the tracked *training* examples;
    stiffness classes are their true labels; the loss split's groups are pristine/corrupt.
    Permutation tests are two-sided. The easy/hard null contracts every null world with the gram
    (cost ~ permutations × examples² per step and layer).
    """
    return prepare(ds, metrics=metrics, n_permutations=n_permutations, seed=seed, snapshot=snapshot,
                   batch_sizes=batch_sizes, pair_source=pair_source, max_pair_examples=max_pair_examples).lazy()


def compute_by_steps(lazy: xr.Dataset, *, steps_per_batch: int = 4, compute=None, progress=None) -> xr.Dataset:
    """Compute ``lazy`` a few steps at a time, so peak memory does not grow with the run's length.

    One big compute of many metrics lets the scheduler hold per-step inputs (grams) read for one
    metric until every other metric has used them; computing step batches bounds that to
    ``steps_per_batch`` steps. Cumulative quantities (r_p, r_c) stay exact: a batch's graph reads
    the earlier steps' small per-example inputs again.

    Parameters
    ----------
    lazy : xarray.Dataset
        From :func:`analyze`.
    steps_per_batch : int
        Steps per compute.
    compute : callable, optional
        Turns a lazy Dataset into a computed one (default ``Dataset.compute``; pass a
        dask.distributed client's compute-and-gather to run on a cluster).
    progress : callable, optional
        Wraps the iterable of batches (e.g. ``tqdm``).
    """
    compute = compute or (lambda obj: obj.compute())
    per_step = [n for n in lazy.data_vars if "step" in lazy[n].dims]
    static = compute(lazy.drop_vars(per_step))
    if "step" not in lazy.dims or not per_step:
        return static
    starts = range(0, lazy.sizes["step"], max(1, steps_per_batch))
    batches = [compute(lazy[per_step].isel(step=slice(s, s + steps_per_batch)))
               for s in (progress(starts) if progress else starts)]
    out = xr.concat(batches, "step", data_vars="all", combine_attrs="override").merge(static)
    out = xr.Dataset({name: out[name].transpose(*lazy[name].dims) for name in lazy.data_vars}, attrs=lazy.attrs)
    return out
