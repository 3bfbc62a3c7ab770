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
