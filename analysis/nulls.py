"""Permutation nulls for group statistics, vectorized across null worlds.

A group statistic is a function of a 0/1 membership ``mask`` over examples. Each null world
shuffles the group labels (group sizes kept); the statistic is evaluated for every world at once by
passing a (permutation, example) mask matrix, e.g. ``mask @ values`` — one array operation, not a
Python loop. The same permutation is used at every step (membership is a property of the example).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import xarray as xr

from analysis.coherence import gram_moments, m_coherence
from gradstore.errors import AnalysisError

ALTERNATIVES = ("two-sided", "greater", "less")
#: null worlds per block: block b is drawn from ``default_rng([seed, b])``, so a world's mask does
#: not depend on how many worlds are asked for, nor on chunking
PERMUTATION_BLOCK = 128
#: masks larger than this many bytes (as float64) are lazy: kept as booleans (1/8 of the memory)
#: and turned into floats block by block inside the tasks that use them
EAGER_MASK_BYTES = 32 << 20


def _mask_block(values: np.ndarray, seed: int, block: int, size: int) -> np.ndarray:
    rng = np.random.default_rng([seed, block])
    out = np.ascontiguousarray(np.broadcast_to(values, (size, values.size)))
    return rng.permuted(out, axis=1, out=out)


def _draw_worlds(values: np.ndarray, seed: int, n_permutations: int) -> np.ndarray:
    """(n_permutations, example) booleans: the seeded shuffles of ``values``, block by block."""
    sizes = [min(PERMUTATION_BLOCK, n_permutations - s) for s in range(0, n_permutations, PERMUTATION_BLOCK)]
    if not sizes:
        return np.zeros((0, values.size), bool)
    return np.concatenate([_mask_block(values, seed, b, k) for b, k in enumerate(sizes)])


def permuted_masks(mask, n_permutations: int = 1000, *, seed: int = 0) -> xr.DataArray:
    """(permutation, example) float 0/1 matrix: ``n_permutations`` seeded shuffles of ``mask``.

    Drawn in blocks of :data:`PERMUTATION_BLOCK` worlds, once. A mask over more than
    :data:`EAGER_MASK_BYTES` (as floats) is a dask array over the boolean masks, each block made
    float inside the task that uses it: 1000 worlds over 50,000 examples hold 50 MB, not 400 MB,
    and a step-by-step computation does not draw them again for every batch of steps.
    """
    values = np.asarray(mask.values if isinstance(mask, xr.DataArray) else mask).astype(bool)
    worlds = _draw_worlds(values, seed, n_permutations)
    if 8 * worlds.size <= EAGER_MASK_BYTES:
        data = worlds.astype(np.float64)
    else:
        import dask.array as da

        data = da.from_array(worlds, chunks=(PERMUTATION_BLOCK, -1), name=f"permuted-masks-{seed}-"
                             f"{n_permutations}-{_digest(values)}").astype(np.float64)
    return xr.DataArray(data, dims=("permutation", "example"))


#: null worlds turned into floats at a time inside a task of :func:`null_sums` (32 × 50,000 × 8 B = 13 MB)
SUM_BLOCK = 32


def null_sums(mask, x: xr.DataArray, n_permutations: int = 1000, *, seed: int = 0,
              dim: str = "example") -> xr.DataArray:
    """Σ_{i in world} x_i for every null world of :func:`permuted_masks`: dims (permutation, *rest of x).

    The same worlds as ``xr.dot(permuted_masks(mask, n_permutations, seed=seed), x, dim=dim)``, in
    memory bounded by one chunk of ``x``. Lazy ``x`` (rechunked to one chunk along ``dim``) gives
    one task per chunk, whose only other input is the mask itself (packed bits): the task draws
    the worlds, once per process (the last :data:`CACHED_WORLDS` sets drawn are kept, read-only,
    as booleans: 50 MB for 1000 worlds over 50,000 examples) and turns :data:`SUM_BLOCK` of them at
    a time into floats. So a graph carries no masks (a step-by-step computation would otherwise
    send them with every batch) and a worker holds the masks, the chunk it computes on and one
    small block.

    Examples
    --------
    >>> x = xr.DataArray(np.arange(6.0).reshape(2, 3), dims=("step", "example"))
    >>> sums = null_sums([True, False, True], x, 4)
    >>> bool(np.allclose(sums, xr.dot(permuted_masks([True, False, True], 4), x, dim="example")))
    True
    """
    values = np.asarray(mask.values if isinstance(mask, xr.DataArray) else mask).astype(bool)
    key = (np.packbits(values).tobytes(), int(values.size), int(seed), int(n_permutations))
    rest = [d for d in x.dims if d != dim]
    x = x.transpose(dim, *rest)
    if x.chunks is None:
        data = _world_sums(np.asarray(x.values, dtype=np.float64), key)
    else:
        import string

        import dask.array as da

        x = x.chunk({dim: -1})
        letters = string.ascii_lowercase[2:2 + len(rest)]
        data = da.blockwise(_world_sums, "p" + letters, x.data.astype(np.float64), "e" + letters,
                            new_axes={"p": n_permutations}, dtype=np.float64, concatenate=True, key=key)
    return xr.DataArray(data, dims=("permutation", *rest), coords={k: v for k, v in x.coords.items()
                                                                    if dim not in v.dims})


#: sets of null worlds each process keeps (:func:`null_sums`)
CACHED_WORLDS = 2


@functools.lru_cache(maxsize=CACHED_WORLDS)
def _cached_worlds(packed: bytes, size: int, seed: int, n_permutations: int) -> np.ndarray:
    values = np.unpackbits(np.frombuffer(packed, np.uint8), count=size).astype(bool)
    worlds = _draw_worlds(values, seed, n_permutations)
    worlds.flags.writeable = False
    return worlds


def _world_sums(x: np.ndarray, key: tuple) -> np.ndarray:
    """(n, ...) floats -> (P, ...): Σ over the n examples in each of the P worlds of ``key``."""
    worlds = _cached_worlds(*key)
    flat = x.reshape(x.shape[0], -1)
    out = np.empty((worlds.shape[0], flat.shape[1]))
    for start in range(0, worlds.shape[0], SUM_BLOCK):
        block = worlds[start:start + SUM_BLOCK]
        np.matmul(block.astype(np.float64), flat, out=out[start:start + block.shape[0]])
    return out.reshape((worlds.shape[0], *x.shape[1:]))


def _digest(values: np.ndarray) -> str:
    import hashlib

    return hashlib.sha1(np.packbits(values).tobytes() + str(values.size).encode()).hexdigest()[:16]


def summarize(observed: xr.DataArray, null: xr.DataArray, *, alternative: str = "two-sided",
              band: tuple[float, float] = (0.025, 0.975)) -> xr.Dataset:
    """``null_mean``, ``null_low``, ``null_high`` and ``p_value`` of ``observed`` against ``null``.

    ``null`` has a ``permutation`` dimension (the null worlds); every other dimension is matched
    element-wise with ``observed``, so a batch of steps can be summarized on its own. p-values as
    in :func:`permutation_test`.
    """
    if alternative not in ALTERNATIVES:
        raise AnalysisError(f"unknown alternative {alternative!r}; use one of {', '.join(ALTERNATIVES)}")
    n_permutations = null.sizes["permutation"]
    if null.chunks:
        null = null.chunk({"permutation": -1})
    greater = (1 + (null >= observed).sum("permutation")) / (n_permutations + 1)
    less = (1 + (null <= observed).sum("permutation")) / (n_permutations + 1)
    p = {"greater": greater, "less": less, "two-sided": np.minimum(1.0, 2 * np.minimum(greater, less))}
    low, high = null.quantile(list(band), dim="permutation", skipna=False).transpose("quantile", ...)
    return xr.Dataset({
        "null_mean": null.mean("permutation", skipna=False),
        "null_low": low.drop_vars("quantile"),
        "null_high": high.drop_vars("quantile"),
        "p_value": p[alternative].where(observed.notnull()),
    })


def permutation_test(
    statistic: Callable[[xr.DataArray], xr.DataArray],
    mask,
    *,
    n_permutations: int = 1000,
    seed: int = 0,
    alternative: str = "two-sided",
    band: tuple[float, float] = (0.025, 0.975),
) -> xr.Dataset:
    """Observed group statistic, its permutation null distribution and p-values.

    Parameters
    ----------
    statistic : callable
        Maps a (permutation, example) 0/1 mask to a DataArray with a ``permutation`` dim (and any
        others, e.g. step and layer); it must treat worlds independently.
    mask : array_like of bool
        The observed group membership over the examples of the statistic.
    n_permutations : int
        Number of null worlds.
    seed : int
        Seed of the shuffles (same seed, same null).
    alternative : {"two-sided", "greater", "less"}
        "greater": is the observed value unusually large under the null.
    band : (float, float)
        Quantiles of the null reported as ``null_low`` and ``null_high``.

    Returns
    -------
    xarray.Dataset
        ``observed``, ``null`` (permutation, …), ``null_mean``, ``null_low``, ``null_high`` and
        ``p_value`` = (1 + #{null ≥ observed}) / (N + 1) for "greater" (≤ for "less"; twice the
        smaller one, capped at 1, for "two-sided").
    """
    if alternative not in ALTERNATIVES:
        raise AnalysisError(f"unknown alternative {alternative!r}; use one of {', '.join(ALTERNATIVES)}")
    if n_permutations < 1:
        raise AnalysisError(f"n_permutations must be at least 1, got {n_permutations}")
    values = np.asarray(mask.values if isinstance(mask, xr.DataArray) else mask).astype(np.float64)
    observed = statistic(xr.DataArray(values[None, :], dims=("permutation", "example"))).isel(permutation=0)
    null = statistic(permuted_masks(values, n_permutations, seed=seed))
    observed = observed.drop_vars("permutation", errors="ignore")
    out = summarize(observed, null, alternative=alternative, band=band)
    out["observed"], out["null"] = observed, null
    out.attrs = {"n_permutations": n_permutations, "seed": seed, "alternative": alternative}
    return out[["observed", "null", "null_mean", "null_low", "null_high", "p_value"]]


def mean_difference(values: xr.DataArray) -> Callable[[xr.DataArray], xr.DataArray]:
    """Statistic: mean of ``values`` (…, example) in the group minus mean outside it."""
    def statistic(mask):
        n_in, n_out = mask.sum("example"), (1 - mask).sum("example")
        inside = xr.dot(mask, values, dim="example", optimize=True) / n_in.where(n_in > 0)
        outside = xr.dot(1 - mask, values, dim="example", optimize=True) / n_out.where(n_out > 0)
        return inside - outside
    return statistic


def coherence_gap(gram: xr.DataArray) -> Callable[[xr.DataArray], xr.DataArray]:
    """Statistic: m-coherence inside the group minus m-coherence outside it, from a gram.

    ||Σ_{i∈A} g_i||² = mask^T G mask for every world at once: (permutation, example) masks
    contract with the (…, example, example_) gram.
    """
    def coherence_of(mask):
        return m_coherence(*gram_moments(gram, mask))

    return lambda mask: coherence_of(mask) - coherence_of(1 - mask)


def class_pair_test(gram: xr.DataArray, labels, a, b, **kwargs) -> xr.Dataset:
    """Class ``a`` versus class ``b``: m-coherence gap with its permutation null.

    Keeps the examples of the two classes, and shuffles the class labels among them.

    Parameters
    ----------
    gram : xarray.DataArray
        g_i·g_j (…, example, example_).
    labels : array_like
        Class of each example of ``gram``.
    a, b
        The two classes.
    **kwargs
        Passed to :func:`permutation_test` (``n_permutations``, ``seed``, ``alternative``).
    """
    labels = np.asarray(labels.values if isinstance(labels, xr.DataArray) else labels)
    keep = np.flatnonzero((labels == a) | (labels == b))
    if not ((labels == a).any() and (labels == b).any()):
        raise AnalysisError(f"classes {a!r} and {b!r} both need examples; found "
                             f"{int((labels == a).sum())} and {int((labels == b).sum())}")
    sub = gram.isel(example=keep, example_=keep)
    return permutation_test(coherence_gap(sub), labels[keep] == a, **kwargs)
