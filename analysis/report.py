"""Every metric of a run in one lazy results Dataset; opening stores; writing results.

:func:`analyze` builds the whole computation lazily (only small static metadata and the ``correct``
history for easy/hard groups are read eagerly); the caller computes it with any Dask scheduler.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

from analysis import hardness, losssplit, minibatch, nulls, pairwise, sources
from analysis.coherence import coherence
from gradstore.errors import AnalysisError, StoreError

METRICS = ("coherence", "stiffness", "confusion", "loss_split", "easy_hard", "minibatch")


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
    unknown = [str(m) for m in metrics if m not in METRICS]
    if unknown:
        raise AnalysisError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(METRICS)}")
    if not metrics:
        raise AnalysisError(f"no metric asked for, so there is nothing to compute; choose from {', '.join(METRICS)}")
    return tuple(dict.fromkeys(metrics))


def _with_prefix(ds: xr.Dataset, prefix: str) -> xr.Dataset:
    return ds.rename({name: prefix + name for name in ds.data_vars})


def _null_vars(test: xr.Dataset, name: str) -> xr.Dataset:
    return xr.Dataset({
        f"{name}_null": test["null"],
        f"{name}_null_low": test["null_low"],
        f"{name}_null_high": test["null_high"],
        f"{name}_p_value": test["p_value"],
    })


def analyze(ds: xr.Dataset, *, metrics=METRICS, n_permutations: int = 1000, seed: int = 0,
            snapshot=None, batch_sizes=(1, 10, 100), pair_source: str | None = None) -> xr.Dataset:
    """All requested metrics of a run as one lazy Dataset.

    Parameters
    ----------
    ds : xarray.Dataset
        A run (:func:`open_store`, ``gradstore.open_run`` or :func:`analysis.synthetic.synthetic_run`).
    metrics : sequence of str
        Any of :data:`METRICS`.
    n_permutations : int
        Null worlds per permutation test (0: no nulls).
    seed : int
        Seed of the permutations and minibatch draws.
    snapshot : int, optional
        Step number splitting easy from hard (default: the middle captured step).
    batch_sizes : sequence of int
        Minibatch sizes for the amplification check (larger than the sample are dropped).
    pair_source : {"exact", "coords", "proj"}, optional
        Where pairwise products come from (default: the exact ``gram`` if stored, else
        ``grad_coords``, else ``grad_proj``).

    Returns
    -------
    xarray.Dataset
        Coherence (dims source, step, sample, layer); stiffness, confusion, loss split and
        minibatch per (step, layer); easy/hard per (step, layer, group[, group_]); null
        distributions on ``permutation``. Pairwise metrics carry the ``source`` they used in
        their attributes. The layer ``(model)`` is the whole model.

    Notes
    -----
    Pairwise metrics, the loss split, easy/hard and minibatch use the tracked *training* examples;
    stiffness classes are their true labels; the loss split's groups are pristine/corrupt.
    Permutation tests are two-sided. The easy/hard null contracts every null world with the gram
    (cost ~ permutations × examples² per step and layer).
    """
    metrics = check_metrics(metrics)
    parts = []
    train = sources.split_mask(ds, "train").values
    index = np.flatnonzero(train)
    if "coherence" in metrics:
        parts.append(_coherence(ds))
    if pair_source is None:
        pair_source = pairwise_source(ds)
    else:
        sources.check_source(pair_source)
    needs_gram = {"stiffness", "confusion", "easy_hard", "minibatch"} & set(metrics)
    if needs_gram and pair_source is None:
        raise StoreError("stiffness, confusion, easy/hard and minibatch need gram, grad_coords or grad_proj, "
                         "which this run did not store; drop those metrics or capture one of them")
    gram = sources.layer_gram(ds, pair_source, examples=index) if needs_gram else None
    if "stiffness" in metrics:
        labels = sources.static(ds, "true_label")[index] if "true_label" in ds.variables else None
        parts.append(_tag(pairwise.stiffness(gram, labels=labels), pair_source))
    if "confusion" in metrics:
        parts.append(_tag(pairwise.confusion(gram), pair_source))
    if "loss_split" in metrics:
        parts.append(_loss_split(ds, index, n_permutations, seed))
    if "easy_hard" in metrics:
        parts.append(_tag(_easy_hard(ds, gram, index, n_permutations, seed, snapshot), pair_source))
    if "minibatch" in metrics:
        sizes = [k for k in batch_sizes if k <= index.size] or [1]
        parts.append(_tag(minibatch.minibatch_coherence(gram, sizes, seed=seed), pair_source))
    out = xr.merge(parts, compat="override", join="outer", combine_attrs="override")
    out.attrs = dict(metrics=list(metrics), n_permutations=n_permutations, seed=seed,
                     pairwise_source=pair_source or "none")
    return out


def _tag(part: xr.Dataset, source: str) -> xr.Dataset:
    for name in part.data_vars:
        part[name].attrs["source"] = source
    return part


def _coherence(ds: xr.Dataset) -> xr.Dataset:
    found = sources.available_sources(ds, "norm_sq_of_sum")
    if not found:
        raise StoreError("coherence needs the stored moments, grad_coords or grad_proj; none is in this run")
    per_source = [coherence(sources.layer_moments(ds, s), source=s) for s in found]
    out = xr.concat(per_source, "source", join="outer", combine_attrs="drop").assign_coords(source=found)
    for name in out.data_vars:
        out[name].attrs["source"] = "see the source dimension: exact = stored moments, else an estimate"
    return out


def _loss_split(ds, index, n_permutations, seed) -> xr.Dataset:
    source = sources.best_source(ds, "dot_with_sum")
    if source is None:
        raise StoreError("the loss split needs dot_with_sum, grad_coords or grad_proj; none is in this run")
    d = sources.layer_dot_with_sum(ds, source).isel(example=index)
    corrupt = sources.static(ds, "corrupt")[index].astype(bool)
    out = losssplit.loss_split(d, corrupt).drop_vars(["n_p", "n_c"])
    out["n_pristine"], out["n_corrupt"] = int((~corrupt).sum()), int(corrupt.sum())
    if n_permutations and 0 < corrupt.sum() < corrupt.size:
        for name, mask, stat in (("f_p", ~corrupt, losssplit.share), ("f_c", corrupt, losssplit.share),
                                 ("r_p", ~corrupt, losssplit.cumulative), ("r_c", corrupt, losssplit.cumulative)):
            test = nulls.permutation_test(lambda m, stat=stat: stat(d, m), mask,
                                          n_permutations=n_permutations, seed=seed)
            out = out.merge(_null_vars(test, name))
    return _tag(out, source)


def _easy_hard(ds, gram, index, n_permutations, seed, snapshot) -> xr.Dataset:
    correct = ds["correct"].isel(example=index)
    easy = hardness.easy_mask(correct, at=snapshot).values
    out = _with_prefix(hardness.easy_hard(gram, easy), "easy_hard_")
    out["learned_step"] = hardness.learned_step(correct)
    out["easy"] = ("example", easy)
    out.attrs["snapshot"] = int(snapshot if snapshot is not None else correct.step.values[correct.sizes["step"] // 2])
    if n_permutations and 0 < easy.sum() < easy.size:
        test = nulls.permutation_test(nulls.coherence_gap(gram), easy, n_permutations=n_permutations, seed=seed)
        out["easy_hard_gap"] = test["observed"]
        out = out.merge(_null_vars(test, "easy_hard_gap"))
    return out


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
