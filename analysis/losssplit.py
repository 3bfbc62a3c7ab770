"""Loss-reduction split between pristine and corrupt examples (Coherent Gradients, §2.4).

With g_p and g_c the sums of the pristine and corrupt gradients of the tracked training sample and
g = g_p + g_c, the first-order loss reduction of a step along g splits as f_p + f_c = 1 with
f_p = g_p·g / g·g. From the stored per-example ``dot_with_sum`` d_i = g_i·g this is
f_p = Σ_{i pristine} d_i / Σ_i d_i, and the mean cumulative contribution is
r_p(t) = (1/n_p) Σ_{τ≤t} g_p(τ)·g(τ).

The functions take the group as a 0/1 ``mask`` over examples, optionally with a leading
``permutation`` dimension, so permutation nulls evaluate every null world in one array operation.
"""

from __future__ import annotations

import xarray as xr

from analysis import plots
from analysis.registry import metric


def share(dot_with_sum: xr.DataArray, mask: xr.DataArray) -> xr.DataArray:
    """f = Σ_{i in mask} d_i / Σ_i d_i (the masked group's share of the loss reduction)."""
    total = dot_with_sum.sum("example", skipna=False)
    return xr.dot(mask.astype(float), dot_with_sum, dim="example", optimize=True) / total.where(total != 0)


def cumulative(dot_with_sum: xr.DataArray, mask: xr.DataArray) -> xr.DataArray:
    """r(t) = (1/n) Σ_{τ≤t} Σ_{i in mask} d_i(τ), n = number of examples in the mask."""
    mask = mask.astype(float)
    n = mask.sum("example")
    return xr.dot(mask, dot_with_sum, dim="example", optimize=True).cumsum("step", skipna=False) / n.where(n > 0)


def loss_split(dot_with_sum: xr.DataArray, corrupt) -> xr.Dataset:
    """f_p, f_c, r_p, r_c for the training examples of ``dot_with_sum``.

    Parameters
    ----------
    dot_with_sum : xarray.DataArray
        d_i = g_i · Σ_j g_j over the training sample, dims (step, example, …) — training examples
        only (see :func:`analysis.sources.layer_dot_with_sum`).
    corrupt : array_like of bool
        Whether each example's training label is corrupt.

    Returns
    -------
    xarray.Dataset
        ``f_p``, ``f_c`` (f_p + f_c = 1), ``r_p``, ``r_c`` with the dims of ``dot_with_sum`` less
        ``example``; ``n_p``, ``n_c`` counts.
    """
    corrupt = xr.DataArray(corrupt.values if isinstance(corrupt, xr.DataArray) else corrupt, dims="example")
    pristine = ~corrupt
    return xr.Dataset({
        "f_p": share(dot_with_sum, pristine),
        "f_c": share(dot_with_sum, corrupt),
        "r_p": cumulative(dot_with_sum, pristine),
        "r_c": cumulative(dot_with_sum, corrupt),
        "n_p": pristine.sum(),
        "n_c": corrupt.sum(),
    })


# --- the registered metric: per-step sums, finished a batch of steps at a time ---------------

_NULLED = ("f_p", "f_c", "r_p", "r_c")


def finish(raw: xr.Dataset, state=None):
    """f_p, f_c, r_p, r_c (and their nulls) from the raw per-step group sums, a batch of steps at a time.

    ``raw`` holds ``ls_pristine`` and ``ls_corrupt`` = Σ_{i in group} d_i per (step, layer), the
    counts ``ls_n_pristine``/``ls_n_corrupt`` and, with nulls, ``ls_null_pristine`` (permutation,
    step, layer): the pristine sum in each null world, whose corrupt group is the complement (the
    same shuffle), so its corrupt sum is the total minus it. ``state`` carries the running sums of
    the earlier steps (None: these are the first steps), so r_p and r_c are exact across batches.
    Returns ``(results, state)``.
    """
    from analysis.nulls import summarize

    pristine, corrupt = raw["ls_pristine"], raw["ls_corrupt"]
    total = pristine + corrupt
    n_p, n_c = raw["ls_n_pristine"], raw["ls_n_corrupt"]
    zero = xr.zeros_like(pristine.isel(step=0, drop=True))
    state = state or {"p": zero, "c": zero}
    safe = total.where(total != 0)
    out = xr.Dataset({
        "f_p": pristine / safe,
        "f_c": corrupt / safe,
        "r_p": (pristine.cumsum("step", skipna=False) + state["p"]) / n_p.where(n_p > 0),
        "r_c": (corrupt.cumsum("step", skipna=False) + state["c"]) / n_c.where(n_c > 0),
        "n_pristine": n_p,
        "n_corrupt": n_c,
    })
    new = {"p": state["p"] + pristine.sum("step", skipna=False), "c": state["c"] + corrupt.sum("step", skipna=False)}
    if "ls_null_pristine" in raw:
        null_p = raw["ls_null_pristine"]
        null_c = total - null_p
        start = state.get("null_p", xr.zeros_like(null_p.isel(step=0, drop=True)))
        start_c = state.get("null_c", xr.zeros_like(start))
        nulls = {
            "f_p": null_p / safe,
            "f_c": null_c / safe,
            "r_p": (null_p.cumsum("step", skipna=False) + start) / n_p.where(n_p > 0),
            "r_c": (null_c.cumsum("step", skipna=False) + start_c) / n_c.where(n_c > 0),
        }
        for name in _NULLED:
            s = summarize(out[name], nulls[name])
            out[f"{name}_null"] = nulls[name].transpose("permutation", ...)
            out[f"{name}_null_low"], out[f"{name}_null_high"] = s["null_low"], s["null_high"]
            out[f"{name}_p_value"] = s["p_value"]
        new["null_p"] = start + null_p.sum("step", skipna=False)
        new["null_c"] = start_c + null_c.sum("step", skipna=False)
    return out, new


@metric("loss_split", inputs=("dots",), tables={"loss_split": ("step", "layer")}, plot=plots.one_plot("f_p", "loss_split.png", plots.loss_split_plot),
        finish=finish)
def loss_split_metric(ctx) -> xr.Dataset:
    """Pristine/corrupt loss-reduction split f_p, f_c, r_p, r_c with permutation nulls (Coherent Gradients §2.4)."""
    import numpy as np

    from analysis import sources
    from analysis.nulls import null_sums

    ds, index = ctx.ds, ctx.train_index
    source = sources.best_source(ds, "dot_with_sum")
    d = sources.layer_dot_with_sum(ds, source).isel(example=index)
    if "corrupt" in ds.variables:
        corrupt = sources.static(ds, "corrupt")[index].astype(bool)
    else:
        corrupt = np.zeros(index.size, bool)
        ctx.note("loss_split: the store has no corrupt labels; every training example counts as pristine")
    mask = xr.DataArray(corrupt, dims="example")
    raw = xr.Dataset({
        "ls_pristine": xr.dot((~mask).astype(float), d, dim="example", optimize=True),
        "ls_corrupt": xr.dot(mask.astype(float), d, dim="example", optimize=True),
        "ls_n_pristine": int((~corrupt).sum()),
        "ls_n_corrupt": int(corrupt.sum()),
    })
    if ctx.n_permutations and 0 < corrupt.sum() < corrupt.size:
        raw["ls_null_pristine"] = null_sums(~corrupt, d, ctx.n_permutations, seed=ctx.seed)
    return ctx.tag(raw, source)
