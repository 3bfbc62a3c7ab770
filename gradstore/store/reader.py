"""Read a run store as a lazy :class:`xarray.Dataset` holding only its committed steps."""

from __future__ import annotations

import dask.array as da
import numpy as np
import xarray as xr

from gradstore.store import _location
from gradstore.store._root import check_arrays, layout_from_store, open_root
from gradstore.store.schema import AUX_COORDS, COMMITTED, array_specs

#: index coordinates, loaded eagerly (small)
_INDEX = ("step", "example", "example_", "layer", "sample", "coord", "proj")
#: attributes that describe the on-disk state rather than the run
_INTERNAL_ATTRS = ("coordinates",)


def open_run(target, *, storage_options: dict | None = None) -> xr.Dataset:
    """Open a gradstore run store.

    Parameters
    ----------
    target : str, path or zarr store
        Local path, ``file://`` URL or any fsspec URL (``memory://``, ``s3://``...).
    storage_options : dict, optional
        Passed to fsspec for URLs.

    Returns
    -------
    xarray.Dataset
        Dimensions ``step`` (committed steps only), ``example``, ``layer``, ``sample`` and, when
        recorded, ``coord``, ``proj``, ``example_``. Per-step variables are lazy dask arrays with
        one chunk per stored chunk (one step per chunk for ``grad_coords``, ``grad_proj``,
        ``gram``). Run attributes (``config``, ``model``, ``seeds``...) are in ``attrs``.

    Raises
    ------
    StoreError
        If ``target`` is missing, not a gradstore run, of another schema version or damaged.

    Notes
    -----
    Steps appended while the dataset is open are not seen; open again to see them. Committed
    steps never change, so a dataset opened during a run stays valid.
    """
    name = _location.describe(target)
    store = _location.open_store(target, read_only=True, storage_options=storage_options)
    group, attrs = open_root(store, name)
    layout = layout_from_store(group, attrs, name)
    committed = attrs[COMMITTED]
    arrays = check_arrays(group, layout, committed, name)
    specs = array_specs(layout)
    coords, data_vars = {}, {}
    for key, arr in arrays.items():
        spec = specs[key]
        if spec.per_step:
            chunks = tuple(min(c, max(n, 1)) for c, n in zip(spec.shards or spec.chunks, arr.shape))
            data = da.from_zarr(arr, chunks=chunks, inline_array=True)[:committed]
        else:
            data = arr[...]
            if spec.dtype == "str":
                data = np.asarray(data, dtype=object).astype(str)
        if key in _INDEX or key in AUX_COORDS:
            coords[key] = (spec.dims, np.asarray(data))
        else:
            data_vars[key] = (spec.dims, data)
    ds = xr.Dataset(data_vars, coords=coords)
    ds.attrs = {k: v for k, v in attrs.items() if k not in _INTERNAL_ATTRS}
    return ds
