"""Read a run store as a lazy :class:`xarray.Dataset` holding only its committed steps."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from gradstore.errors import StoreError
from gradstore.store._integrity import DIGEST, DIGESTED, damage_message
from gradstore.store._root import check_steps, located_problems, open_committed
from gradstore.store.schema import AUX_COORDS, array_specs

if TYPE_CHECKING:
    import xarray as xr

#: index coordinates, loaded eagerly (small)
_INDEX = ("step", "example", "example_", "layer", "sample", "coord", "proj", "param")
#: attributes that describe the on-disk state rather than the run
_INTERNAL_ATTRS = ("coordinates", "static_crc32c", "writer")
#: arrays of the integrity protocol, not of the run
_INTERNAL_ARRAYS = (DIGEST, DIGESTED)


def open_run(target, *, storage_options: dict | None = None, skip_steps=()) -> xr.Dataset:
    """Open a gradstore run store.

    Parameters
    ----------
    target : str, path or zarr store
        Local path, ``file://`` URL or any fsspec URL (``memory://``, ``s3://``...).
    storage_options : dict, optional
        Passed to fsspec for URLs.
    skip_steps : sequence of int
        Positions along ``step`` to leave out, e.g. the damaged steps
        :func:`gradstore.store.verify_run` found; a chunk missing at any other committed step is
        refused.

    Returns
    -------
    xarray.Dataset
        Dimensions ``step`` (committed steps only), ``example``, ``layer``, ``sample`` and, when
        recorded, ``coord``, ``proj``, ``example_``, ``param`` (per-parameter moments, stores
        with ``storage.param_moments``; older stores lack them). Per-step variables are lazy dask arrays with
        one chunk per stored chunk (one step per chunk for ``grad_coords``, ``grad_proj``,
        ``gram``). Run attributes (``config``, ``model``, ``seeds``...) are in ``attrs``.

    Raises
    ------
    StoreError
        If ``target`` is missing, not a gradstore run, of another schema version or damaged (an
        inconsistent commit record, or a chunk missing). Checksums are checked as chunks are read;
        :func:`gradstore.store.verify_run` reads every value back and checks its digest.

    Notes
    -----
    Steps appended while the dataset is open are not seen; open again to see them. Committed
    steps never change, so a dataset opened during a run stays valid.
    """
    import dask.array as da  # here, not at import: a writer process never needs them (1 s to import)
    import xarray as xr

    run = open_committed(target, storage_options)
    name, attrs, layout, committed, arrays = run.name, run.attrs, run.layout, run.committed, run.arrays
    skip = {int(i) for i in skip_steps}
    problems, steps = located_problems(run.store, layout, arrays, committed)
    problems = [p for p in problems if p.index not in skip]
    if problems:
        raise StoreError(damage_message(name, problems))
    steps = check_steps(arrays, attrs, committed, name, steps)
    specs = array_specs(layout)
    coords, data_vars = {}, {}
    for key, arr in arrays.items():
        spec = specs[key]
        if key in _INTERNAL_ARRAYS:
            continue
        if key == "step":
            data = steps
        elif spec.per_step:
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
    if skip:
        keep = [i for i in range(committed) if i not in skip]
        ds = ds.isel(step=keep)
        ds.attrs["skipped_steps"] = [int(steps[i]) for i in sorted(skip) if i < committed]
    return ds
