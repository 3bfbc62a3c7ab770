"""The coherence quantities of Chatterjee & Zielinski, "Making Coherence Out of Nothing At All".

One definition of each quantity, used by capture reports, analysis, theory checks and reports.
Every function works on Python/NumPy scalars and arrays and on xarray/dask objects alike
(element-wise arithmetic only, so dask arrays stay lazy).

Notation: for per-example gradients g_1..g_m, ``norm_sq_of_sum`` = ||Σ g_i||² and
``sum_of_norm_sq`` = Σ ||g_i||².
"""

from __future__ import annotations

import numpy as np


def _quiet_divide(numerator, denominator):
    with np.errstate(divide="ignore", invalid="ignore"):
        try:
            return np.divide(numerator, denominator)
        except ZeroDivisionError:  # exact scalars (Fraction, int) raise where floats give NaN/inf
            return np.nan


def divide(numerator, denominator):
    """``numerator / denominator`` with 0/0 = NaN and x/0 = ±inf, silently.

    NumPy's error state is set where the division actually runs: for xarray objects backed by dask
    that is inside each chunk's task at compute time, not when the graph is built.
    """
    if hasattr(numerator, "dims") or hasattr(denominator, "dims"):  # xarray, possibly lazy
        import xarray as xr

        return xr.apply_ufunc(_quiet_divide, numerator, denominator, dask="parallelized",
                              output_dtypes=[np.float64])
    return _quiet_divide(numerator, denominator)


def _where_positive(denominator, value):
    """``value`` where ``denominator > 0``, NaN elsewhere (alpha is undefined when all g are zero)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        if hasattr(value, "where"):  # xarray
            return value.where(denominator > 0)
        return np.where(np.asarray(denominator) > 0, value, np.nan)[()]


def alpha(norm_sq_of_sum, sum_of_norm_sq, m):
    """Coherence alpha = ||E g||² / E||g||² (eq. 3 of *Making Coherence Out of Nothing At All*).

    Parameters
    ----------
    norm_sq_of_sum : array_like
        ||Σ_i g_i||² over the m examples.
    sum_of_norm_sq : array_like
        Σ_i ||g_i||² over the same examples.
    m : array_like
        Number of examples.

    Returns
    -------
    array_like
        alpha = ||Σ g||² / (m · Σ||g||²), in [0, 1]; NaN where every g_i is zero.

    Notes
    -----
    alpha = 1/m when the g_i are pairwise orthogonal (the orthogonal limit), 1 when they are all
    equal, 0 when they sum to zero (Theorem 1).
    """
    value = divide(norm_sq_of_sum, m * sum_of_norm_sq)  # 0/0 -> NaN, also for Python floats and dask
    return _where_positive(sum_of_norm_sq, value)


def m_coherence(norm_sq_of_sum, sum_of_norm_sq, m):
    """m-coherence = m · alpha = ||Σ g||² / Σ||g||²: 1 in the orthogonal limit, m when all agree."""
    return m * alpha(norm_sq_of_sum, sum_of_norm_sq, m)


def gradient_diversity(norm_sq_of_sum, sum_of_norm_sq, m):
    """Gradient diversity (Yin et al.) = 1 / alpha."""
    return divide(1.0, alpha(norm_sq_of_sum, sum_of_norm_sq, m))


def self_removed_m_coherence(norm_sq_of_sum, sum_of_norm_sq, m):
    """m-coherence − 1 = Σ_{i≠j} g_i·g_j / Σ||g_i||²: 0 in the orthogonal limit."""
    return m_coherence(norm_sq_of_sum, sum_of_norm_sq, m) - 1


def coherence(moments, *, source: str = "exact"):
    """All four coherence quantities from a Dataset of moments.

    Parameters
    ----------
    moments : xarray.Dataset
        ``m``, ``norm_sq_of_sum`` and ``sum_of_norm_sq`` with any dimensions, e.g. the output of
        :func:`analysis.sources.layer_moments` (step, sample, layer).
    source : str
        Where the moments came from (``"exact"``, ``"coords"``, ``"proj"``); recorded in the
        ``source`` attribute of the result and of each variable.

    Returns
    -------
    xarray.Dataset
        ``alpha``, ``m_coherence``, ``gradient_diversity``, ``self_removed_m_coherence`` and ``m``,
        lazy if the inputs are.
    """
    import xarray as xr

    args = (moments["norm_sq_of_sum"], moments["sum_of_norm_sq"], moments["m"])
    out = xr.Dataset({
        "alpha": alpha(*args),
        "m_coherence": m_coherence(*args),
        "gradient_diversity": gradient_diversity(*args),
        "self_removed_m_coherence": self_removed_m_coherence(*args),
        "m": moments["m"],
    })
    for name in out.data_vars:
        out[name].attrs["source"] = source
    out.attrs["source"] = source
    return out
