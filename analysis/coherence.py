"""The coherence quantities of Chatterjee & Zielinski, "Making Coherence Out of Nothing At All".

One definition of each quantity, used by capture reports, analysis, theory checks and reports:
:func:`alpha`, :func:`m_coherence`, :func:`gradient_diversity`, :func:`self_removed_m_coherence`
and :func:`pairwise_alpha`; the moments they take, from a Gram block (:func:`gram_diagonal`,
:func:`gram_moments`), estimated from sampled coordinates or random projections
(:func:`estimated_moments`, :func:`estimated_gram`), or of a layer's weights alone from the
per-parameter moments (:func:`weight_moments`, :func:`weights_m_coherence`). Every other module
calls these.

The public functions are thin: they document the quantity and pass their arguments to a private
pure function of the same name (``_alpha``, ...), which does the arithmetic. The scalar quantities
work on Python/NumPy scalars and arrays, on exact numbers (``Fraction``, sympy) and on
xarray/dask objects alike (element-wise arithmetic only, so dask arrays stay lazy); the Gram and
estimator functions take named-dimension xarray objects.

Notation: for per-example gradients g_1..g_m, ``norm_sq_of_sum`` = ||Σ g_i||² and
``sum_of_norm_sq`` = Σ ||g_i||².
"""

from __future__ import annotations

import numpy as np

from analysis.registry import metric


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


# --- private pure definitions: arithmetic only ------------------------------------------------

def _alpha(norm_sq_of_sum, sum_of_norm_sq, m):
    # 0/0 -> NaN, also for Python floats and dask; NaN wherever every g_i is zero
    return _where_positive(sum_of_norm_sq, divide(norm_sq_of_sum, m * sum_of_norm_sq))


def _m_coherence(norm_sq_of_sum, sum_of_norm_sq):
    return _where_positive(sum_of_norm_sq, divide(norm_sq_of_sum, sum_of_norm_sq))


def _gradient_diversity(norm_sq_of_sum, sum_of_norm_sq, m):
    return divide(1.0, _alpha(norm_sq_of_sum, sum_of_norm_sq, m))


def _self_removed_m_coherence(norm_sq_of_sum, sum_of_norm_sq):
    return _m_coherence(norm_sq_of_sum, sum_of_norm_sq) - 1


def _pairwise_alpha(mean_cross, mean_sq):
    return _where_positive(mean_sq, divide(mean_cross, mean_sq))


def _gram_diagonal(gram, dim):
    import xarray as xr

    eye = xr.DataArray(np.eye(gram.sizes[dim]), dims=(dim, dim + "_"))
    return (gram * eye).sum(dim + "_", skipna=False)


def _gram_moments(gram, weights):
    import xarray as xr

    diagonal = _gram_diagonal(gram, "example")
    if weights is None:
        return (gram.sum(("example", "example_"), skipna=False), diagonal.sum("example", skipna=False),
                gram.sizes["example"])
    quad = xr.dot(xr.dot(weights, gram, dim="example"), weights.rename(example="example_"), dim="example_",
                  optimize=True)
    return quad, xr.dot(weights, diagonal, dim="example", optimize=True), weights.sum("example")


def _estimated_moments(vectors, weights, inner):
    import xarray as xr

    total = xr.dot(vectors, weights, dim="example", optimize=True)
    return (inner(total, total), xr.dot(inner(vectors, vectors), weights, dim="example"),
            float(weights.sum()))


def _weight_mask(ds):
    import xarray as xr

    from analysis.sources import MODEL

    shapes = {p["name"]: (len(p["shape"]), p["layer"]) for p in ds.attrs["model"]["params"]}
    layers = [str(v) for v in ds["layer"].values]
    names = [str(v) for v in ds["param"].values]
    mask = np.zeros((len(names), len(layers) + 1))
    for i, name in enumerate(names):
        ndim, layer = shapes[name]
        if ndim >= 2:
            mask[i, layers.index(layer)] = mask[i, -1] = 1.0
    return xr.DataArray(mask, dims=("param", "layer"), coords={"param": names, "layer": [*layers, MODEL]})


def _weight_moments(ds):
    import xarray as xr

    from analysis.sources import layer_moments

    mask = _weight_mask(ds)
    out = {"m": layer_moments(ds, "exact")["m"]}
    for name in ("norm_sq_of_sum", "sum_of_norm_sq"):
        summed = xr.dot(ds[f"param_{name}"].astype(np.float64), mask, dim="param")
        out[name] = summed.transpose("step", "sample", "layer")
    return xr.Dataset(out)


def _estimated_gram(vectors, dim, layers):
    import xarray as xr

    other = vectors.rename(example="example_")
    if layers is None:
        return xr.dot(vectors, other, dim=dim, optimize=True)
    parts = [xr.dot(vectors * layers.sel(layer=name), other, dim=dim, optimize=True) for name in layers.layer.values]
    return xr.concat(parts, "layer").assign_coords(layer=layers.layer.values)


# --- public quantities ------------------------------------------------------------------------

def alpha(norm_sq_of_sum, sum_of_norm_sq, m):
    r"""Coherence alpha = ||E g||² / E||g||² (eq. 3 of *Making Coherence Out of Nothing At All*).

    Over a sample of m examples, E g = (1/m) Σ g_i and E||g||² = (1/m) Σ ||g_i||², so

    .. math:: \alpha = \frac{\lVert \mathbb{E} g \rVert^2}{\mathbb{E}\lVert g \rVert^2}
              = \frac{\lVert \sum_i g_i \rVert^2}{m \sum_i \lVert g_i \rVert^2}.

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

    Examples
    --------
    >>> float(alpha(4.0, 2.0, 2))   # g_1 = g_2 = (1, 0): identical gradients
    1.0
    >>> float(alpha(2.0, 2.0, 2))   # g_1 = (1, 0), g_2 = (0, 1): orthogonal, 1/m
    0.5
    """
    return _alpha(norm_sq_of_sum, sum_of_norm_sq, m)


def m_coherence(norm_sq_of_sum, sum_of_norm_sq, m=None):
    r"""m-coherence = m · alpha = ||Σ g||² / Σ||g||² (*Making Coherence Out of Nothing At All*, §3).

    .. math:: m\alpha = \frac{\lVert \sum_i g_i \rVert^2}{\sum_i \lVert g_i \rVert^2}
              = 1 + \frac{\sum_{i \ne j} g_i \cdot g_j}{\sum_i \lVert g_i \rVert^2}.

    Parameters
    ----------
    norm_sq_of_sum, sum_of_norm_sq : array_like
        As for :func:`alpha`.
    m : array_like, optional
        Number of examples; m-coherence does not depend on it (adding zero gradients leaves it
        unchanged). Accepted so that every quantity here takes the same arguments.

    Returns
    -------
    array_like
        1 in the orthogonal limit, m when all g_i agree; NaN where every g_i is zero.

    Examples
    --------
    >>> float(m_coherence(4.0, 2.0, 2)), float(m_coherence(2.0, 2.0, 2))
    (2.0, 1.0)
    """
    return _m_coherence(norm_sq_of_sum, sum_of_norm_sq)


def gradient_diversity(norm_sq_of_sum, sum_of_norm_sq, m):
    r"""Gradient diversity = 1 / alpha = m Σ||g_i||² / ||Σ g_i||².

    .. math:: \Delta = \frac{m \sum_i \lVert g_i \rVert^2}{\lVert \sum_i g_i \rVert^2} = 1/\alpha

    It is 1 for identical gradients and m in the orthogonal limit. Yin et al. (2018),
    Definition 1, write Δ = Σ||g_i||² / ||Σ g_i||² without the factor m, which is 1/m-coherence
    = this value / m; the factor m is kept here (it is the reciprocal of alpha).

    Examples
    --------
    >>> float(gradient_diversity(2.0, 2.0, 2))   # orthogonal: m
    2.0
    """
    return _gradient_diversity(norm_sq_of_sum, sum_of_norm_sq, m)


def self_removed_m_coherence(norm_sq_of_sum, sum_of_norm_sq, m=None):
    r"""m-coherence − 1 = Σ_{i≠j} g_i·g_j / Σ||g_i||²: 0 in the orthogonal limit.

    Examples
    --------
    >>> float(self_removed_m_coherence(2.0, 2.0, 2))
    0.0
    """
    return _self_removed_m_coherence(norm_sq_of_sum, sum_of_norm_sq)


def pairwise_alpha(mean_cross, mean_sq):
    r"""alpha in its pairwise form, E_{v≠v'}[v·v'] / E[v·v], from the two means.

    .. math:: \alpha = \frac{\mathbb{E}_{v, v'}[v \cdot v']}{\mathbb{E}[v \cdot v]}

    for independent draws v, v' (the second form of alpha in the paper; theory's
    ``PAPER_FORMS``). Over a sample, averaging the cross products over pairs i ≠ j makes it an
    unbiased estimate of the population's ||E g||²; within one group of m examples it equals
    (m-coherence − 1)/(m − 1).

    Parameters
    ----------
    mean_cross : array_like
        Mean of v_i·v_j over the pairs i ≠ j (or over the pairs of two groups).
    mean_sq : array_like
        Mean of ||v_i||² over the same examples.

    Returns
    -------
    array_like
        NaN where ``mean_sq`` is not positive.

    Examples
    --------
    >>> float(pairwise_alpha(0.5, 2.0))
    0.25
    """
    return _pairwise_alpha(mean_cross, mean_sq)


def gram_diagonal(gram, dim: str = "example"):
    """The diagonal M_ii of a Gram block (…, dim, dim_), as (…, dim): ||g_i||² for a Gram.

    Parameters
    ----------
    gram : xarray.DataArray
        Pairwise values with dims ``dim`` and ``dim + "_"`` (a Gram g_i·g_j, cosines, block sums
        over groups), lazy or not.
    dim : str
        The first of the two square dimensions.

    Examples
    --------
    >>> import xarray as xr
    >>> g = xr.DataArray([[1.0, 2.0], [2.0, 5.0]], dims=("example", "example_"))
    >>> gram_diagonal(g).values.tolist()
    [1.0, 5.0]
    """
    return _gram_diagonal(gram, dim)


def gram_moments(gram, weights=None):
    r"""``(norm_sq_of_sum, sum_of_norm_sq, m)`` of the examples of a Gram block.

    With 0/1 (or count) weights w over the examples, ||Σ_i w_i g_i||² = wᵀ G w,
    Σ_i w_i ||g_i||² = w · diag G and m = Σ_i w_i: the arguments of :func:`alpha` and
    :func:`m_coherence`.

    Parameters
    ----------
    gram : xarray.DataArray
        g_i·g_j with dims (…, example, example_).
    weights : xarray.DataArray, optional
        (…, example) weights, e.g. (permutation, example) group masks of permutation nulls (each
        world is contracted with the Gram at once); default all examples (m an int).

    Examples
    --------
    >>> import xarray as xr
    >>> g = xr.DataArray([[1.0, 0.0], [0.0, 1.0]], dims=("example", "example_"))
    >>> float(m_coherence(*gram_moments(g)))   # orthogonal
    1.0
    """
    return _gram_moments(gram, weights)


def estimated_moments(vectors, weights, inner):
    r"""``(norm_sq_of_sum, sum_of_norm_sq, m)`` estimated from per-example estimate vectors.

    ``vectors`` are the stored sampled coordinates (``grad_coords``) or random projections
    (``grad_proj``) x_i of each g_i; inner products of the x_i stand in for those of the g_i:
    ||Σ_i w_i g_i||² ≈ ⟨Σ w_i x_i, Σ w_i x_i⟩ and Σ w_i ||g_i||² ≈ Σ w_i ⟨x_i, x_i⟩, with no
    rescaling (the quantities here are ratios, in which a common scale cancels).

    Parameters
    ----------
    vectors : xarray.DataArray
        (…, example, coord) or (…, example, layer, proj) float64.
    weights : xarray.DataArray
        (example) 0/1 mask of the examples of the sample.
    inner : callable
        ``inner(a, b)``: per-layer inner product over the vector dimension
        (:func:`analysis.sources.layer_inner` for a run's layout).

    Examples
    --------
    >>> import xarray as xr
    >>> x = xr.DataArray([[1.0, 0.0], [0.0, 1.0]], dims=("example", "proj"))
    >>> inner = lambda a, b: (a * b).sum("proj")
    >>> nss, sns, m = estimated_moments(x, xr.DataArray([1.0, 1.0], dims="example"), inner)
    >>> float(alpha(nss, sns, m))
    0.5
    """
    return _estimated_moments(vectors, weights, inner)


def estimated_gram(vectors, dim: str, layers=None):
    r"""Gram block x_i·x_j (…, example, example_) estimated from per-example estimate vectors.

    Parameters
    ----------
    vectors : xarray.DataArray
        Sampled coordinates (…, example, coord) or projections (…, example, layer, proj).
    dim : str
        The vector dimension summed over: ``"coord"`` or ``"proj"``.
    layers : xarray.DataArray, optional
        (coord, layer) one-hot of the layer of each coordinate: one Gram per layer, on a new
        ``layer`` dimension. Projections are already per layer.

    Examples
    --------
    >>> import xarray as xr
    >>> x = xr.DataArray([[1.0, 2.0], [3.0, 4.0]], dims=("example", "proj"))
    >>> estimated_gram(x, "proj").values.tolist()
    [[5.0, 11.0], [11.0, 25.0]]
    """
    return _estimated_gram(vectors, dim, layers)


#: the stored variables the weights-only quantities read (``docs/store-format.md``, per-parameter moments)
PARAM_MOMENTS = ("param_norm_sq_of_sum", "param_sum_of_norm_sq")


def has_param_moments(ds) -> bool:
    """Whether ``ds`` holds the per-parameter moments (stores written before them do not)."""
    return all(name in ds.variables for name in PARAM_MOMENTS) and "param" in ds.variables


def weight_moments(ds):
    r"""``m``, ``norm_sq_of_sum``, ``sum_of_norm_sq`` of each layer's **weights** alone (no biases).

    The weights of a layer are its parameters of dimension ≥ 2 (the shapes in the run's ``model``
    attribute: ``Linear``/``Conv`` weights, embeddings); parameters of dimension ≤ 1 (biases,
    BatchNorm/LayerNorm scales and shifts) are left out. Parameter blocks are disjoint, so the
    weights' moments are sums of the stored per-parameter moments over those parameters:
    ||Σ_i g_{W,i}||² = Σ_{p ∈ W} ||Σ_i g_{p,i}||² and Σ_i ||g_{W,i}||² = Σ_{p ∈ W} Σ_i ||g_{p,i}||²,
    as Making Coherence plots per-layer m-coherence of the weights.

    Parameters
    ----------
    ds : xarray.Dataset
        A run with ``param_norm_sq_of_sum`` and ``param_sum_of_norm_sq`` (step, sample, param).

    Returns
    -------
    xarray.Dataset
        (step, sample, layer), the whole model's weights appended as layer ``(model)``; lazy. A
        layer without weights has both sums 0, so its weights-only quantities are NaN.

    Raises
    ------
    StoreError
        If the run has no per-parameter moments (written before they were recorded).
    """
    from analysis.sources import require

    require(ds, [*PARAM_MOMENTS, "param"], "weights-only coherence")
    return _weight_moments(ds)


def weights_m_coherence(ds):
    r"""m-coherence of each layer's weights alone, ||Σ_i g_{W,i}||² / Σ_i ||g_{W,i}||².

    :func:`m_coherence` of :func:`weight_moments` (weights: parameters of dimension ≥ 2), per
    (step, sample, layer) with the whole model's weights as layer ``(model)``; NaN for a layer
    without weights. Raises :class:`StoreError` for a run without per-parameter moments.
    """
    mo = weight_moments(ds)
    return m_coherence(mo["norm_sq_of_sum"], mo["sum_of_norm_sq"], mo["m"])


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


# --- the registered metric ------------------------------------------------------------------

def _coherence_plots(results, folder):
    import numpy as np

    from analysis import plots

    files = []
    if "m_coherence" not in results or "source" not in results.dims:
        return files
    for sample in results.sample.values:
        for source in results.source.values:
            if np.isfinite(results.m_coherence.sel(source=source, sample=sample)).any():
                path = folder / f"m_coherence_{sample}_{source}.png"
                plots.coherence_plot(results, path, sample=str(sample), source=str(source))
                files.append(path)
    return files


@metric("coherence", inputs=("moments",), tables={"coherence": ("source", "step", "sample", "layer"),
                                                  "weights_coherence": ("step", "sample", "layer")},
        plot=_coherence_plots)
def coherence_metric(ctx):
    """alpha, m-coherence, gradient diversity per (source, step, sample, layer): exact and every estimate.

    With per-parameter moments in the store, also ``weights_m_coherence`` (step, sample, layer):
    the exact m-coherence of each layer's weights alone (:func:`weights_m_coherence`), in the table
    ``weights_coherence``; without them (stores written before), a note says it was left out.
    """
    import xarray as xr

    from analysis import sources

    found = sources.available_sources(ctx.ds, "norm_sq_of_sum")
    per_source = [coherence(sources.layer_moments(ctx.ds, s), source=s) for s in found]
    out = xr.concat(per_source, "source", join="outer", combine_attrs="drop").assign_coords(source=found)
    for name in out.data_vars:
        out[name].attrs["source"] = "see the source dimension: exact = stored moments, else an estimate"
    if has_param_moments(ctx.ds):
        out["weights_m_coherence"] = weights_m_coherence(ctx.ds)
        out["weights_m_coherence"].attrs.update(
            source="exact", description="m-coherence of each layer's weights alone (parameters of dimension >= 2)")
    else:
        ctx.note("coherence: weights-only m-coherence left out, the store has no per-parameter moments "
                 "(param_norm_sq_of_sum; stores written before they were recorded)")
    return out
