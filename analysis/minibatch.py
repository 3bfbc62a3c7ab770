"""Minibatch versus per-example coherence (Corollary 3.1 of *Making Coherence Out of Nothing*).

For minibatch gradients h = (1/k) Σ_{i∈B} g_i with the k examples drawn independently and
uniformly from the m examples, alpha_k = ||E h||² / E||h||² = k·alpha / (1 + (k − 1)·alpha):
averaging amplifies coherence. Measured: draw ``n_batches`` seeded minibatches, form their
gradients from the gram (h_b·h_b' = w_b^T G w_b' for the count vectors w_b) and estimate
||E h||² by the mean of h_b·h_b' over b ≠ b' and E||h||² by the mean of ||h_b||².
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from analysis.coherence import alpha, gram_moments, pairwise_alpha
from analysis.registry import metric
from gradstore.errors import AnalysisError


def predicted_alpha_k(alpha, k):
    """alpha_k = k·alpha / (1 + (k − 1)·alpha) (Corollary 3.1)."""
    return k * alpha / (1 + (k - 1) * alpha)


def batch_counts(m: int, k: int, n_batches: int, *, seed: int = 0, replace: bool = True) -> np.ndarray:
    """(batch, example) counts of ``n_batches`` seeded minibatches of size ``k`` from m examples."""
    if k < 1 or (not replace and k > m):
        raise AnalysisError(f"minibatch size {k} is impossible with {m} examples")
    rng = np.random.default_rng(seed)
    if replace:
        picks = rng.integers(0, m, size=(n_batches, k))
    else:
        picks = np.argsort(rng.random((n_batches, m)), axis=1)[:, :k]
    counts = np.zeros((n_batches, m))
    np.add.at(counts, (np.arange(n_batches)[:, None], picks), 1.0)
    return counts


def minibatch_coherence(gram: xr.DataArray, sizes=(1, 10, 100), *, n_batches: int = 512, seed: int = 0,
                        replace: bool = True) -> xr.Dataset:
    """Per-example alpha, predicted and measured minibatch alpha_k for each size k.

    Parameters
    ----------
    gram : xarray.DataArray
        g_i·g_j (…, example, example_) over the sample (e.g. the tracked training examples).
    sizes : sequence of int
        Minibatch sizes k.
    n_batches : int
        Minibatches drawn per size (at least 2).
    replace : bool
        Draw each minibatch's examples with replacement (the setting of Corollary 3.1).

    Returns
    -------
    xarray.Dataset
        ``alpha`` (…), ``alpha_k_predicted`` and ``alpha_k_measured`` (…, batch_size).
    """
    if n_batches < 2:
        raise AnalysisError(f"n_batches must be at least 2, got {n_batches}")
    m = gram.sizes["example"]
    per_example = alpha(*gram_moments(gram))
    measured = []
    for j, k in enumerate(sizes):
        w = xr.DataArray(batch_counts(m, k, n_batches, seed=seed + j, replace=replace), dims=("batch", "example"))
        wg = xr.dot(w, gram, dim="example", optimize=True)                           # (…, batch, example_)
        diag = xr.dot(wg, w.rename(example="example_"), dim="example_", optimize=True)  # ||k h_b||², (…, batch)
        c = w.sum("batch", skipna=False).rename(example="example_")
        everything = xr.dot(wg.sum("batch", skipna=False), c, dim="example_", optimize=True)
        mean_sq = diag.sum("batch", skipna=False) / n_batches
        cross = (everything - diag.sum("batch", skipna=False)) / (n_batches * (n_batches - 1))
        measured.append(pairwise_alpha(cross, mean_sq))  # E_{b≠b'}[h_b·h_b'] / E||h_b||²
    size = xr.DataArray(list(sizes), dims="batch_size", name="batch_size")
    return xr.Dataset({
        "alpha": per_example,
        "alpha_k_predicted": predicted_alpha_k(per_example, size),
        "alpha_k_measured": xr.concat(measured, "batch_size"),
    }).assign_coords(batch_size=list(sizes))


@metric("minibatch", inputs=("gram",),
        tables={"minibatch_alpha": ("step", "layer"), "minibatch": ("batch_size", "step", "layer")})
def minibatch_metric(ctx) -> xr.Dataset:
    """Per-example alpha and minibatch alpha_k, predicted (Corollary 3.1) and measured from seeded draws."""
    n = ctx.pair_index.size
    sizes = [k for k in ctx.batch_sizes if k <= n] or [1]
    # "alpha" is coherence's (source, step, sample, layer) output: this one is over the pair sample
    return ctx.tag(minibatch_coherence(ctx.gram(), sizes, seed=ctx.seed).rename(alpha="minibatch_alpha"))
