"""Additive per-layer quantities from a run, exact or estimated, with the whole model appended.

A *source* says where inner products of per-example gradients come from:

- ``"exact"``: the stored exact statistics (moments, ``sq_norm``, ``dot_with_sum``, ``gram``);
- ``"coords"``: estimated from ``grad_coords`` (the sampled coordinates of each layer);
- ``"proj"``: estimated from ``grad_proj`` (seeded random projections of each layer).

Every quantity here is a sum over parameters, so per-layer values add up to the whole model; the
whole model is appended to the ``layer`` dimension under the name :data:`MODEL`. Big arrays stay
lazy; only small static metadata (labels, splits, the layer of each coordinate) are read eagerly.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from analysis.coherence import estimated_gram, estimated_moments
from gradstore.errors import AnalysisError, StoreError

#: name of the whole model on the ``layer`` dimension of results (not a valid module name)
MODEL = "(model)"
#: the sources, in order of preference: exact first, then the estimates from coordinates, then projections
SOURCES = ("exact", "coords", "proj")
#: the stored variable each estimating source reads
ESTIMATE_VARIABLES = {"coords": "grad_coords", "proj": "grad_proj"}


def check_source(source: str) -> None:
    """Raise :class:`AnalysisError` unless ``source`` is one of :data:`SOURCES`."""
    if source not in SOURCES:
        raise AnalysisError(f"unknown source {source!r}; use one of {', '.join(SOURCES)}")


def available_sources(ds: xr.Dataset, exact: str) -> list[str]:
    """The sources ``ds`` can give a quantity from, in the order of :data:`SOURCES`.

    ``exact`` is the stored variable of the exact source (``"gram"``, ``"norm_sq_of_sum"``,
    ``"dot_with_sum"``); the estimating sources need their :data:`ESTIMATE_VARIABLES`.
    """
    variables = {"exact": exact, **ESTIMATE_VARIABLES}
    return [source for source in SOURCES if variables[source] in ds.variables]


def best_source(ds: xr.Dataset, exact: str) -> str | None:
    """The preferred source of a quantity (first of :func:`available_sources`), or None if none."""
    return next(iter(available_sources(ds, exact)), None)


def require(ds: xr.Dataset, names, why: str) -> None:
    """Raise :class:`StoreError` naming the variables of ``names`` that ``ds`` lacks."""
    missing = [n for n in names if n not in ds.variables]
    if missing:
        raise StoreError(f"{why} needs {', '.join(missing)}, which this run did not store; "
                         "capture it or choose another source/metric")


def with_model(da: xr.DataArray) -> xr.DataArray:
    """Append the whole model (the sum over ``layer``) as layer :data:`MODEL`."""
    total = da.sum("layer", skipna=False).expand_dims(layer=[MODEL])
    out = xr.concat([da, total], "layer", coords="minimal", compat="override", join="outer")
    if out.chunks:  # rechunk the data only: DataArray.chunk would make every coordinate a dask array too
        out = out.copy(data=out.variable.chunk({"layer": -1}).data)
    return out.assign_coords(layer=np.concatenate([da.layer.values.astype(object), [MODEL]]).astype(str))


def static(ds: xr.Dataset, name: str) -> np.ndarray:
    """Small static metadata (per example or per coordinate) as a NumPy array."""
    return np.asarray(ds[name].values)


def split_mask(ds: xr.Dataset, split: str = "train") -> xr.DataArray:
    """Boolean (example) mask of the tracked examples of ``split`` (all examples if no ``split``)."""
    if "split" not in ds.variables:
        return xr.DataArray(np.ones(ds.sizes["example"], bool), dims="example")
    return xr.DataArray(static(ds, "split").astype(str) == split, dims="example")


def _coord_onehot(ds: xr.Dataset) -> xr.DataArray:
    require(ds, ["coord_layer"], "estimating from grad_coords")
    coord_layer = static(ds, "coord_layer").astype(str)
    layers = ds.layer.values.astype(str) if "layer" in ds.coords else np.unique(coord_layer)
    onehot = coord_layer[:, None] == layers[None, :]
    return xr.DataArray(onehot.astype(np.float64), dims=("coord", "layer"), coords={"layer": layers})


def vectors(ds: xr.Dataset, source: str) -> xr.DataArray:
    """Per-example gradient estimates: ``grad_coords`` (step, example, coord) or ``grad_proj``."""
    name = ESTIMATE_VARIABLES[source]
    require(ds, [name], f"source {source!r}")
    return ds[name].astype(np.float64)


def layer_inner(a: xr.DataArray, b: xr.DataArray, ds: xr.Dataset, source: str) -> xr.DataArray:
    """Per-layer inner product Σ a·b over the coordinates (or projections) of each layer."""
    if source == "coords":
        return xr.dot(a * b, _coord_onehot(ds), dim="coord", optimize=True)
    return (a * b).sum("proj", skipna=False)


def layer_dot(x: xr.DataArray, v: xr.DataArray, ds: xr.Dataset, source: str) -> xr.DataArray:
    """Per-layer x_i · v for per-example vectors ``x`` and one vector ``v`` (no ``example`` dim).

    A matrix product per layer (no per-example temporaries the size of ``x``).
    """
    if source == "coords":
        return xr.dot(x, v * _coord_onehot(ds), dim="coord", optimize=True)
    return xr.dot(x, v, dim="proj", optimize=True)


def _split_sums(x: xr.DataArray, ds: xr.Dataset):
    train = split_mask(ds, "train")
    return train, xr.dot(x, train.astype(np.float64), dim="example", optimize=True), \
        xr.dot(x, (~train).astype(np.float64), dim="example", optimize=True)


def layer_gram(ds: xr.Dataset, source: str = "exact", *, examples=None) -> xr.DataArray:
    """Pairwise inner products g_i·g_j, (step, layer, example, example_), whole model appended.

    Parameters
    ----------
    ds : xarray.Dataset
        A run.
    source : {"exact", "coords", "proj"}
        The stored ``gram`` or an estimate from ``grad_coords``/``grad_proj``.
    examples : array_like of int or bool, optional
        Positions (or mask) of the examples to keep, e.g. the training examples.
    """
    check_source(source)
    if examples is not None:
        index = np.asarray(examples)
        index = np.flatnonzero(index) if index.dtype == bool else index
        ds = ds.isel(example=index, **({"example_": index} if "example_" in ds.dims else {}))
    if source == "exact":
        require(ds, ["gram"], "pairwise metrics from the exact gram")
        gram = ds["gram"].astype(np.float64)
    elif source == "proj":
        gram = estimated_gram(vectors(ds, "proj"), "proj")
    else:
        gram = estimated_gram(vectors(ds, "coords"), "coord", layers=_coord_onehot(ds))
    if "example_" not in gram.coords:
        gram = gram.assign_coords(example_=ds.example.values)
    return with_model(gram.transpose("step", "layer", "example", "example_"))


def layer_sq_norm(ds: xr.Dataset, source: str = "exact") -> xr.DataArray:
    """||g_i||² per (step, example, layer), whole model appended."""
    check_source(source)
    if source == "exact":
        require(ds, ["sq_norm"], "per-example norms")
        out = ds["sq_norm"].astype(np.float64)
    else:
        x = vectors(ds, source)
        out = layer_inner(x, x, ds, source)
    return with_model(out.transpose("step", "example", "layer"))


def layer_dot_with_sum(ds: xr.Dataset, source: str = "exact") -> xr.DataArray:
    """g_i · Σ_j g_j over the example's own split, per (step, example, layer), model appended."""
    check_source(source)
    if source == "exact":
        require(ds, ["dot_with_sum"], "the loss-reduction split")
        out = ds["dot_with_sum"].astype(np.float64)
    else:
        x = vectors(ds, source)
        train, train_sum, test_sum = _split_sums(x, ds)
        # each example against its own split's sum: one pass over the examples of each split
        train_idx, test_idx = np.flatnonzero(train.values), np.flatnonzero(~train.values)
        parts = [layer_dot(x.isel(example=idx), total, ds, source)
                 for idx, total in ((train_idx, train_sum), (test_idx, test_sum)) if idx.size]
        order = np.argsort(np.concatenate([train_idx, test_idx]), kind="stable")
        out = xr.concat(parts, "example")
        if (order != np.arange(order.size)).any():
            out = out.isel(example=order)
    return with_model(out.transpose("step", "example", "layer"))


def layer_moments(ds: xr.Dataset, source: str = "exact") -> xr.Dataset:
    """``m``, ``norm_sq_of_sum``, ``sum_of_norm_sq`` per (step, sample, layer), model appended.

    ``"exact"`` reads the stored moments (every stored sample); an estimate covers the samples of
    the tracked examples, ``tracked_train`` and ``tracked_test``.
    """
    check_source(source)
    names = ["m", "norm_sq_of_sum", "sum_of_norm_sq"]
    if source == "exact":
        require(ds, names, "coherence from moments")
        out = ds[names].astype(np.float64)
    else:
        x = vectors(ds, source)
        parts = []
        for split in ("train", "test"):
            norm_sq_of_sum, sum_of_norm_sq, m = estimated_moments(
                x, split_mask(ds, split).astype(np.float64), lambda a, b: layer_inner(a, b, ds, source))
            parts.append(xr.Dataset({
                "m": xr.zeros_like(ds.step, dtype=np.float64) + m,
                "norm_sq_of_sum": norm_sq_of_sum,
                "sum_of_norm_sq": sum_of_norm_sq,
            }))
        out = xr.concat(parts, "sample").assign_coords(sample=["tracked_train", "tracked_test"])
        out["m"] = out["m"].broadcast_like(out["norm_sq_of_sum"])
    result = {n: with_model(out[n]) for n in names[1:]}
    # the count is the same in every layer: the whole model has the first layer's count
    result["m"] = with_model(out["m"]).where(lambda m: m.layer != MODEL, out["m"].isel(layer=0, drop=True))
    return xr.Dataset({n: result[n].transpose("step", "sample", "layer") for n in names})
