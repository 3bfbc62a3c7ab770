"""Group structure over examples: one-hot group matrices and block sums of pairwise matrices.

A pairwise matrix M (…, example, example_) — a gram, cosines or signs — summed over the pairs
(i, j) with i in group a and j in group b is Y^T M Y for the one-hot (example, group) matrix Y;
one array operation for every block at once.
"""

from __future__ import annotations

import numpy as np
import xarray as xr


def onehot(labels, *, dim: str = "group", example=None) -> xr.DataArray:
    """One-hot (example, ``dim``) float matrix of ``labels``; groups are the sorted distinct labels.

    Parameters
    ----------
    labels : array_like or xarray.DataArray
        One label per example (any sortable values: class numbers, ``"easy"``/``"hard"``).
        Examples labelled ``None``/NaN are in no group (all-zero row) when given as a float array.
    dim : str
        Name of the group dimension.
    example : array_like, optional
        Example ids for the ``example`` coordinate.
    """
    values = np.asarray(labels.values if isinstance(labels, xr.DataArray) else labels)
    keep = ~_is_missing(values)
    groups = np.unique(values[keep])
    matrix = (values[:, None] == groups[None, :]) & keep[:, None]
    coords = {dim: groups}
    if example is not None:
        coords["example"] = np.asarray(example)
    elif isinstance(labels, xr.DataArray) and "example" in labels.coords:
        coords["example"] = labels.example.values
    return xr.DataArray(matrix.astype(np.float64), dims=("example", dim), coords=coords)


def _is_missing(values):
    if values.dtype.kind == "f":
        return np.isnan(values)
    if values.dtype.kind == "O":
        return np.array([v is None for v in values])
    return np.zeros(values.shape, bool)


def off_diagonal(n: int) -> xr.DataArray:
    """(example, example_) matrix with 0 on the diagonal and 1 elsewhere (pairs z ≠ z')."""
    return xr.DataArray(1.0 - np.eye(n), dims=("example", "example_"))


def block_sums(matrix: xr.DataArray, groups: xr.DataArray, *, pairs_only: bool = True) -> xr.DataArray:
    """Σ_{i∈a, j∈b} M_ij for every pair of groups: (…, group, group_).

    Parameters
    ----------
    matrix : xarray.DataArray
        Pairwise values with dims (…, example, example_).
    groups : xarray.DataArray
        One-hot (example, group) matrix from :func:`onehot`.
    pairs_only : bool
        Leave out i = j (the pairs z ≠ z' of Fort et al.).
    """
    dim = groups.dims[1]
    if pairs_only:
        matrix = matrix * off_diagonal(matrix.sizes["example"])
    left = xr.dot(groups.drop_vars("example", errors="ignore"), matrix, dim="example", optimize=True)
    right = groups.drop_vars("example", errors="ignore").rename(example="example_", **{dim: dim + "_"})
    return xr.dot(left, right, dim="example_", optimize=True)


def pair_counts(groups: xr.DataArray, *, pairs_only: bool = True) -> xr.DataArray:
    """Number of pairs (i, j) with i in a and j in b (i ≠ j if ``pairs_only``): (group, group_)."""
    dim = groups.dims[1]
    n = groups.sum("example").values
    counts = np.outer(n, n) - (np.diag(n) if pairs_only else 0)
    return xr.DataArray(counts, dims=(dim, dim + "_"),
                        coords={dim: groups[dim].values, dim + "_": groups[dim].values})
