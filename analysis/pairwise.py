"""Pairwise gradient alignment: stiffness, gradient confusion and group coherence.

All functions take a gram (…, example, example_) of g_i·g_j — the stored exact ``gram`` or one
estimated from coordinates/projections (:func:`analysis.sources.layer_gram`) — restricted to the
examples of interest, and stay lazy.

References
----------
Fort, Nowak, Jastrzebski, Narayanan (2019), *Stiffness: A New Perspective on Generalization in
Neural Networks*. Sankararaman, De, Xu, Huang, Goldstein (2020), *The Impact of Neural Network
Overparameterization on Gradient Confusion and Stochastic Gradient Descent*.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from analysis.coherence import gram_diagonal, m_coherence, pairwise_alpha
from analysis.groups import block_sums, off_diagonal, onehot, pair_counts
from analysis.registry import metric

CONFUSION_STATS = ("min_cosine", "median_cosine", "p05_cosine", "fraction_negative")


def cosines(gram: xr.DataArray) -> xr.DataArray:
    """cos(g_i, g_j) = g_i·g_j / (||g_i|| ||g_j||); NaN where a gradient is zero."""
    norm = np.sqrt(gram_diagonal(gram))
    denom = norm * norm.rename(example="example_")
    return gram / denom.where(denom > 0)


def pair_mean_se(matrix: xr.DataArray) -> xr.DataArray:
    """Jackknife standard error (over examples) of the mean of a symmetric matrix over pairs i ≠ j.

    With T = Σ_{i≠j} M_ij and r_k = Σ_{j≠k} M_kj, leaving example k out gives the mean
    θ_(k) = (T − 2 r_k) / ((n − 1)(n − 2)); the jackknife variance is (n − 1)/n Σ_k (θ_(k) − θ̄)².
    The sampling error of a mean over the pairs of a random sample of examples (a U-statistic).
    """
    n = matrix.sizes["example"]
    if n < 3:
        return xr.full_like(matrix.isel(example=0, example_=0, drop=True), np.nan, dtype=np.float64)
    pairs = matrix * off_diagonal(n)
    rows = pairs.sum("example_", skipna=False)
    total = rows.sum("example", skipna=False)
    theta = (total - 2 * rows) / ((n - 1) * (n - 2))
    return np.sqrt((n - 1) / n * ((theta - theta.mean("example")) ** 2).sum("example", skipna=False))


def stiffness(gram: xr.DataArray, *, labels=None, se: bool = False) -> xr.Dataset:
    """Sign and cosine stiffness over pairs z ≠ z', overall and class by class.

    Parameters
    ----------
    gram : xarray.DataArray
        g_i·g_j with dims (…, example, example_).
    labels : array_like, optional
        One class per example; adds the class-by-class matrices (within classes on the diagonal,
        between classes off it).

    Returns
    -------
    xarray.Dataset
        ``sign_stiffness`` = mean of sign(g_i·g_j) and ``cosine_stiffness`` = mean of
        cos(g_i, g_j) over i ≠ j; with ``labels`` also ``sign_stiffness_class`` and
        ``cosine_stiffness_class`` with dims (…, class, class_); with ``se`` also
        ``sign_stiffness_se`` and ``cosine_stiffness_se`` (:func:`pair_mean_se`: the sampling error
        when the examples are a random sample of a larger set).

    Notes
    -----
    Fort et al. (2019), eqs. 2-3: S(z, z') = E[sign(g·g')] or E[cos(g, g')]; sign(g·g') > 0 means
    a small step on z lowers the loss on z'.
    """
    n = gram.sizes["example"]
    signs = np.sign(gram)
    cos = cosines(gram)
    pairs = off_diagonal(n)
    count = n * (n - 1) or np.nan  # no pairs with fewer than two examples
    out = xr.Dataset({
        "sign_stiffness": (signs * pairs).sum(("example", "example_"), skipna=False) / count,
        "cosine_stiffness": (cos * pairs).sum(("example", "example_"), skipna=False) / count,
    })
    if se:
        out["sign_stiffness_se"] = pair_mean_se(signs)
        out["cosine_stiffness_se"] = pair_mean_se(cos)
    if labels is not None:
        groups = onehot(labels, dim="class", example=gram.example.values)
        counts = pair_counts(groups)
        with np.errstate(divide="ignore", invalid="ignore"):
            out["sign_stiffness_class"] = (block_sums(signs, groups) / counts.where(counts > 0)).transpose(
                ..., "class", "class_")
            out["cosine_stiffness_class"] = (block_sums(cos, groups) / counts.where(counts > 0)).transpose(
                ..., "class", "class_")
    return out


def _confusion_numpy(cos: np.ndarray) -> np.ndarray:
    n = cos.shape[-1]
    iu = np.triu_indices(n, 1)
    values = cos[..., iu[0], iu[1]]
    if values.shape[-1] == 0:
        return np.full(cos.shape[:-2] + (5,), np.nan)
    q05, median = np.quantile(values, [0.05, 0.5], axis=-1)
    negative = (values < 0).mean(-1)
    if n < 3:
        se = np.full(negative.shape, np.nan)
    else:  # jackknife over examples of the fraction of negative pairs (as pair_mean_se)
        below = (cos < 0) & ~np.eye(n, dtype=bool)
        rows = below.sum(-1)
        theta = (rows.sum(-1, keepdims=True) - 2 * rows) / ((n - 1) * (n - 2))
        se = np.sqrt((n - 1) / n * ((theta - theta.mean(-1, keepdims=True)) ** 2).sum(-1))
    return np.stack([values.min(-1), median, q05, negative, se], axis=-1)


def confusion(gram: xr.DataArray, *, se: bool = False) -> xr.Dataset:
    """Gradient confusion: the distribution of pairwise cosines over pairs i < j.

    Returns
    -------
    xarray.Dataset
        ``min_cosine`` (the confusion bound: g_i·g_j ≥ −η with η = −min cosine after
        normalization), ``median_cosine``, ``p05_cosine`` (5th percentile) and
        ``fraction_negative`` (share of pairs with negative cosine), over the leading dims; with
        ``se`` also ``fraction_negative_se``, its jackknife standard error over examples (the
        sampling error when the examples are a random sample; the minimum and quantiles are then
        those of the sampled pairs).

    Notes
    -----
    Sankararaman et al. (2020), Definition 2.1. Needs all examples of one step in one chunk
    (rechunked if not).
    """
    cos = cosines(gram).chunk({"example": -1, "example_": -1}) if gram.chunks else cosines(gram)
    stats = xr.apply_ufunc(
        _confusion_numpy, cos, input_core_dims=[["example", "example_"]], output_core_dims=[["statistic"]],
        dask="parallelized", output_dtypes=[np.float64], dask_gufunc_kwargs={"output_sizes": {"statistic": 5}},
    )
    names = CONFUSION_STATS + (("fraction_negative_se",) if se else ())
    return xr.Dataset({name: stats.isel(statistic=k) for k, name in enumerate(names)})


def group_coherence(gram: xr.DataArray, labels, *, dim: str = "group") -> xr.Dataset:
    """m-coherence within each group and the pairwise alpha within and between groups.

    Parameters
    ----------
    gram : xarray.DataArray
        g_i·g_j with dims (…, example, example_).
    labels : array_like
        Group of each example (e.g. ``"easy"``/``"hard"``, classes).
    dim : str
        Name of the group dimension of the result (the second is ``dim + "_"``).

    Returns
    -------
    xarray.Dataset
        ``m_coherence`` (…, group) = ||Σ_{i∈a} g_i||² / Σ_{i∈a} ||g_i||²;
        ``pairwise_alpha`` (…, group, group_) = mean_{i∈a, j∈b, i≠j} g_i·g_j divided by the
        mean ||g||² over a ∪ b (0 for orthogonal, 1 for identical gradients; within a group it
        is (m_coherence − 1)/(m − 1)); ``m`` (group).
    """
    groups = onehot(labels, dim=dim, example=gram.example.values)
    blocks = block_sums(gram, groups, pairs_only=False)
    sq = xr.dot(gram_diagonal(gram), groups, dim="example", optimize=True)
    within = xr.Dataset({"m_coherence": m_coherence(gram_diagonal(blocks, dim), sq)})
    counts = pair_counts(groups)
    m = groups.sum("example")
    cross = block_sums(gram, groups, pairs_only=True) / counts.where(counts > 0)
    mean_sq = (sq + sq.rename({dim: dim + "_"})) / (m + m.rename({dim: dim + "_"}))
    # within a group the mean ||g||² is sq/m, which the line above also gives (2 sq / 2 m)
    within["pairwise_alpha"] = pairwise_alpha(cross, mean_sq)
    within["m"] = m
    return within.transpose(..., dim, dim + "_")


# --- the registered metrics -----------------------------------------------------------------

def _stiffness_plots(results, folder):
    from analysis import plots

    files = []
    for name in ("sign_stiffness_class", "cosine_stiffness_class"):
        if name in results:
            for label, step in (("first", results.step.values[0]), ("last", results.step.values[-1])):
                files.append(folder / f"{name}_{label}.png")
                plots.matrix_plot(results[name].sel(step=step, layer="(model)"), files[-1],
                                  title=f"{name.replace('_class', '')} at step {step}")
    return files


@metric("stiffness", inputs=("gram",),
        tables={"stiffness": ("step", "layer"), "stiffness_class": ("step", "layer", "class", "class_")},
        plot=_stiffness_plots)
def stiffness_metric(ctx) -> xr.Dataset:
    """Sign and cosine stiffness over pairs, and class by class on a store with classes (Fort et al.)."""
    from analysis import sources
    from analysis.registry import has_classes

    labels = None
    if has_classes(ctx.ds):
        labels = sources.static(ctx.ds, "true_label")[ctx.pair_index]
    else:
        ctx.note("stiffness: the store has no classes (task is not classification or no true_label); "
                 "the class-by-class matrices are left out, the overall stiffness is computed")
    return ctx.tag(stiffness(ctx.gram(), labels=labels, se=ctx.sampled))


@metric("confusion", inputs=("gram",), tables={"confusion": ("step", "layer")})
def confusion_metric(ctx) -> xr.Dataset:
    """Gradient confusion: minimum, median, 5th percentile and negative share of pairwise cosines."""
    return ctx.tag(confusion(ctx.gram(), se=ctx.sampled))
