"""Open a run store's root group and check it against the schema (shared by reader and writer)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import numpy as np
import zarr
import zarr.errors
from zarr.core.sync import sync

from gradstore.errors import StoreError
from gradstore.store import _location
from gradstore.store._integrity import Problem, damage_message, expected_chunks
from gradstore.store.schema import COMMITTED, READABLE_SCHEMAS, RunLayout, array_specs, static_shape

#: root attribute present while a run is being created (removed when creation completes)
CREATING = "gradstore_creating"


def open_root(store, name: str, *, writable: bool = False) -> tuple[zarr.Group, dict]:
    """Open the root group of a gradstore run and return it with its attributes.

    A reader (``writable=False``) sees the arrays as the root's consolidated metadata records them
    at the last commit: every per-step array exactly ``committed_steps`` long, whatever an append in
    progress has done to the arrays' own metadata. A writer sees the arrays' own metadata.

    Raises
    ------
    StoreError
        If there is no store, it is not a zarr v3 group, not a gradstore run, of another schema
        version, or its root metadata is damaged.
    """
    try:
        group = zarr.open_group(store, mode="r+" if writable else "r", zarr_format=3,
                                use_consolidated=False if writable else None)
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
    if version not in READABLE_SCHEMAS:
        raise StoreError(f"{name!r} uses gradstore store schema {version!r}; this gradstore reads schemas "
                         f"{', '.join(map(str, READABLE_SCHEMAS))} only; use the gradstore version that wrote it")
    if version == 2 and isinstance(attrs.get("storage"), dict) and attrs["storage"].get("param_moments"):
        raise StoreError(f"{name!r} is damaged: schema 2 has no per-parameter moments, but its 'storage' "
                         "attribute says it stores them")
    committed = attrs.get(COMMITTED)
    if not isinstance(committed, int) or isinstance(committed, bool) or committed < 0:
        raise StoreError(f"{name!r} is damaged: root attribute {COMMITTED!r} is {committed!r}, not a count")
    if not writable and group.metadata.consolidated_metadata is None:
        raise StoreError(f"{name!r} is damaged: its root zarr.json has no consolidated metadata (the commit "
                         f"record of every array's committed length)")
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
        arr = _array(group, key, name)
        absent = [c for c in expected_chunks(key, arr.shape, arr.chunks) if not _has(group.store, c)]
        if absent:
            raise StoreError(damage_message(name, [_static_missing(key, c) for c in absent]))
        return arr[...]
    except StoreError:
        raise
    except Exception as exc:  # codec/IO errors of zarr have no common base class
        raise StoreError(f"{name!r} is damaged: cannot read array {key!r} ({exc})") from exc


def _has(store, key: str) -> bool:
    return bool(sync(store.exists(key)))


def _static_missing(key: str, chunk: str) -> Problem:
    return Problem(key, chunk, None, None, "chunk missing (would read as fill values)")


def _correct_kind(group: zarr.Group):
    """What the store's ``correct`` holds: "bool", "fraction" (float64) or None (no such array)."""
    if "correct" not in group:
        return None
    return "bool" if group["correct"].dtype == np.bool_ else "fraction"


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
            checksums=bool(storage.get("checksums", False)),
            task=attrs.get("task", "classification"),  # stores written before tasks: classification
            correct=_correct_kind(group),
            task_options=dict(attrs.get("task_options", {})),
            measurement=attrs.get("measurement"),
            param_moments=bool(storage.get("param_moments", False)),  # absent: a store without them
        )
    except (KeyError, TypeError) as exc:
        raise StoreError(f"{name!r} is damaged: root attributes are incomplete ({exc!r})") from exc
    except StoreError as exc:  # a layout the writer would never have made
        raise StoreError(f"{name!r} is damaged: {exc}") from None
    return layout


def check_arrays(group: zarr.Group, layout: RunLayout, committed: int, name: str, *,
                 uncommitted: int | None = 0) -> dict[str, zarr.Array]:
    """Check every array of the schema is present with the right dims, dtype and shape.

    Per-step arrays must hold ``committed`` steps, plus at most ``uncommitted`` more (1 for a writer:
    the one step an interrupted append can leave). Anything else is damage: a crash cannot make it.
    ``uncommitted=None`` does not check the number of steps (a reader checking the arrays' own
    metadata, which a concurrent append may be changing).
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
        if spec.per_step:
            if shape[1:] != want[1:]:
                raise StoreError(f"{name!r} is damaged: array {key!r} has shape {shape}, expected "
                                 f"{(committed,) + want[1:]}")
            if uncommitted is not None and not committed <= shape[0] <= committed + uncommitted:
                raise StoreError(f"{name!r} is damaged: array {key!r} holds {shape[0]} steps but the commit "
                                 f"record says {committed} committed (a crash leaves at most one more); "
                                 f"nothing was changed: run `gradstore inspect --verify` on it")
        elif shape != want:
            raise StoreError(f"{name!r} is damaged: array {key!r} has shape {shape}, expected {want}")
        arrays[key] = arr
    return arrays


@dataclass(frozen=True)
class Committed:
    """A run store opened for reading through its commit record, its metadata checked."""

    name: str
    store: object
    attrs: dict
    layout: RunLayout
    committed: int
    arrays: dict


def open_committed(target, storage_options: dict | None = None) -> Committed:
    """Open ``target`` for reading: the commit record, the layout and every array, checked against
    the schema and against the arrays' own metadata (no data read but the static arrays)."""
    if not isinstance(target, (str, os.PathLike, zarr.abc.store.Store)):
        raise StoreError(f"a run store is a path or URL (str or path), got {type(target).__name__}")
    name = _location.describe(target)
    store = _location.open_store(target, read_only=True, storage_options=storage_options)
    group, attrs = open_root(store, name)
    layout = layout_from_store(group, attrs, name)
    committed = attrs[COMMITTED]
    arrays = check_arrays(group, layout, committed, name)
    own_metadata(store, layout, committed, name)
    return Committed(name, store, attrs, layout, committed, arrays)


def own_metadata(store, layout: RunLayout, committed: int, name: str) -> None:
    """Check the arrays' own ``zarr.json`` agree with the commit record (present, dims, dtype, shape)."""
    try:
        group = zarr.open_group(store, mode="r", zarr_format=3, use_consolidated=False)
    except Exception as exc:  # the root was readable a moment ago: damaged or replaced
        raise StoreError(f"{name!r} is damaged: its root group cannot be opened ({_short(exc)})") from None
    check_arrays(group, layout, committed, name, uncommitted=None)


def check_steps(arrays: dict[str, zarr.Array], attrs: dict, committed: int, name: str,
                steps: np.ndarray | None = None) -> np.ndarray:
    """The committed ``step`` values (read unless given), checked: strictly increasing and ending at
    ``last_step``."""
    if steps is None:
        try:
            steps = np.asarray(arrays["step"][:committed])
        except Exception as exc:  # codec/IO errors of zarr have no common base class
            raise StoreError(f"{name!r} is damaged: cannot read array 'step' ({_short(exc)}); run "
                             f"`gradstore inspect --verify` on it") from None
    last = attrs.get("last_step")
    if committed and (np.any(np.diff(steps) <= 0)):
        bad = int(np.flatnonzero(np.diff(steps) <= 0)[0]) + 1
        raise StoreError(f"{name!r} is damaged: step numbers do not increase at index {bad} "
                         f"({steps[bad - 1]} then {steps[bad]})")
    if (last is None) != (committed == 0) or (committed and last != int(steps[-1])):
        raise StoreError(f"{name!r} is damaged: root attribute 'last_step' is {last!r} but the last committed "
                         f"step is {int(steps[-1]) if committed else None}")
    return steps


def missing_chunks(store, layout: RunLayout, arrays: dict[str, zarr.Array], committed: int) -> list[Problem]:
    """Every chunk (shard) the committed steps and the static arrays need but the store lacks
    (steps named by position; :func:`with_step_numbers` adds their numbers).

    Zarr reads a missing chunk as fill values; a run store writes every chunk it covers (even one
    of fill values), so a missing one is damage.
    """
    async def keys(prefix):
        return {k async for k in store.list_prefix(prefix)}

    problems = []
    for key, spec in array_specs(layout).items():
        shape = (committed,) + tuple(arrays[key].shape[1:]) if spec.per_step else tuple(arrays[key].shape)
        grid = spec.shards or spec.chunks
        have = sync(keys(f"{key}/c"))
        for chunk in expected_chunks(key, shape, grid):
            if chunk not in have:
                if spec.per_step:
                    first = int(chunk.split("/")[2]) * grid[0]
                    problems += [Problem(key, chunk, index, None, "chunk missing (would read as fill values)")
                                 for index in range(first, min(first + grid[0], committed))]
                else:
                    problems.append(_static_missing(key, chunk))
    return problems


def located_problems(store, layout: RunLayout, arrays: dict[str, zarr.Array], committed: int) -> tuple[list, object]:
    """:func:`missing_chunks`, with step numbers where the ``step`` array is intact; and those steps
    (None when ``step`` cannot be read)."""
    problems = missing_chunks(store, layout, arrays, committed)
    steps = None
    if not any(p.array == "step" for p in problems):
        try:
            steps = np.asarray(arrays["step"][:committed])
        except Exception:  # a damaged step chunk: steps are then named by position
            steps = None
        if steps is not None and np.any(np.diff(steps) <= 0):  # fill values: not step numbers
            steps = None
    return with_step_numbers(problems, steps), steps


def with_step_numbers(problems: list[Problem], steps: np.ndarray | None) -> list[Problem]:
    """``problems`` with the training step number of each damaged position (``steps``: the committed
    ``step`` values, or None when they cannot be trusted)."""
    if steps is None:
        return problems
    return [dataclasses.replace(p, step=int(steps[p.index])) if p.index is not None and p.array != "step" else p
            for p in problems]


def _short(exc: BaseException) -> str:
    """The first line of an exception's message (codec errors can be long)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__
