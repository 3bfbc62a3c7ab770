"""Open a run store's root group and check it against the schema (shared by reader and writer)."""

from __future__ import annotations

import numpy as np
import zarr
import zarr.errors

from gradstore.errors import StoreError
from gradstore.store.schema import COMMITTED, SCHEMA_VERSION, RunLayout, array_specs, static_shape

#: root attribute present while a run is being created (removed when creation completes)
CREATING = "gradstore_creating"


def open_root(store, name: str, *, writable: bool = False) -> tuple[zarr.Group, dict]:
    """Open the root group of a gradstore run and return it with its attributes.

    Raises
    ------
    StoreError
        If there is no store, it is not a zarr v3 group, not a gradstore run, of another schema
        version, or its root metadata is damaged.
    """
    try:
        group = zarr.open_group(store, mode="r+" if writable else "r", zarr_format=3)
    except zarr.errors.ContainsArrayError as exc:
        raise StoreError(f"{name!r} is a zarr array, not a gradstore run (a zarr group); check the path") from exc
    except (FileNotFoundError, zarr.errors.NodeNotFoundError) as exc:
        raise StoreError(f"{name!r} holds no zarr v3 group (no zarr.json), so it is not a gradstore run; "
                         f"check the path") from exc
    except (ValueError, TypeError, KeyError) as exc:
        raise StoreError(f"{name!r} has damaged root metadata (zarr.json: {exc}); the store cannot be read") from exc
    attrs = group.attrs.asdict()
    if "gradstore_schema" not in attrs:
        if CREATING in attrs:
            raise StoreError(f"{name!r} is a run whose creation was interrupted (no steps); record it again")
        raise StoreError(f"{name!r} is a zarr group but not a gradstore run (no 'gradstore_schema' attribute)")
    version = attrs["gradstore_schema"]
    if version != SCHEMA_VERSION:
        raise StoreError(f"{name!r} uses gradstore store schema {version!r}; this gradstore reads schema "
                         f"{SCHEMA_VERSION} only; use the gradstore version that wrote it")
    committed = attrs.get(COMMITTED)
    if not isinstance(committed, int) or isinstance(committed, bool) or committed < 0:
        raise StoreError(f"{name!r} is damaged: root attribute {COMMITTED!r} is {committed!r}, not a count")
    return group, attrs


def _array(group: zarr.Group, key: str, name: str) -> zarr.Array:
    try:
        node = group[key]
    except (KeyError, FileNotFoundError, ValueError, TypeError) as exc:
        raise StoreError(f"{name!r} is damaged: array {key!r} is missing or unreadable ({exc})") from exc
    if not isinstance(node, zarr.Array):
        raise StoreError(f"{name!r} is damaged: {key!r} is a group, expected an array")
    return node


def _values(group, key, name):
    try:
        return _array(group, key, name)[...]
    except StoreError:
        raise
    except Exception as exc:  # codec/IO errors of zarr have no common base class
        raise StoreError(f"{name!r} is damaged: cannot read array {key!r} ({exc})") from exc


def layout_from_store(group: zarr.Group, attrs: dict, name: str) -> RunLayout:
    """Rebuild the :class:`RunLayout` a store was created with, from its static arrays and attrs."""
    storage, model = attrs.get("storage"), attrs.get("model")
    if not isinstance(storage, dict) or not isinstance(model, dict):
        raise StoreError(f"{name!r} is damaged: root attributes 'storage'/'model' are missing")
    try:
        has_coords = "coord" in group
        layout = RunLayout(
            layers=tuple(str(s) for s in _values(group, "layer", name)),
            params=tuple((p["name"], tuple(p["shape"]), p["layer"]) for p in model["params"]),
            example_ids=_values(group, "example", name),
            n_train=int(storage["n_train"]),
            true_label=_values(group, "true_label", name),
            train_label=_values(group, "train_label", name),
            coord_layer=tuple(str(s) for s in _values(group, "coord_layer", name)) if has_coords else (),
            coord_param=tuple(str(s) for s in _values(group, "coord_param", name)) if has_coords else (),
            coord_index=_values(group, "coord_index", name) if has_coords else np.zeros(0, np.int64),
            n_proj=int(storage["n_proj"]),
            projection_seed=attrs.get("projection_seed"),
            gram=bool(storage["gram"]),
            dtype=storage["dtype"],
            compression=storage["compression"],
        )
    except (KeyError, TypeError) as exc:
        raise StoreError(f"{name!r} is damaged: root attributes are incomplete ({exc!r})") from exc
    return layout


def check_arrays(group: zarr.Group, layout: RunLayout, committed: int, name: str) -> dict[str, zarr.Array]:
    """Check every array of the schema is present with the right dims, dtype and shape.

    Per-step arrays may be longer than ``committed`` (an append in progress or interrupted).
    """
    arrays = {}
    for key, spec in array_specs(layout).items():
        arr = _array(group, key, name)
        dims = tuple(arr.metadata.dimension_names or ())
        if dims != spec.dims:
            raise StoreError(f"{name!r} is damaged: array {key!r} has dimensions {dims}, expected {spec.dims}")
        if spec.dtype != "str" and np.dtype(arr.dtype) != np.dtype(spec.dtype):
            raise StoreError(f"{name!r} is damaged: array {key!r} has dtype {arr.dtype}, expected {spec.dtype}")
        want = static_shape(spec, layout)
        shape = tuple(arr.shape)
        ok = shape[1:] == want[1:] and shape[0] >= committed if spec.per_step else shape == want
        if not ok:
            raise StoreError(f"{name!r} is damaged: array {key!r} has shape {shape}, expected {want} "
                             f"with at least {committed} steps")
        arrays[key] = arr
    return arrays
