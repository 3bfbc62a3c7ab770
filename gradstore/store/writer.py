"""Write a run store: create it, append one captured step at a time, resume after a crash.

Commit protocol
---------------
An append (1) grows every per-step array to ``committed + 1`` steps, (2) writes the step's slot of
every array, and only then (3) rewrites the root attributes with ``committed_steps + 1``. Readers
trust only ``committed_steps``, so a step is visible once all its arrays are written. Every key is
replaced atomically on local filesystems (zarr's LocalStore writes a temporary file and renames
it) and by object stores, so ``kill -9`` at any moment leaves the committed steps intact.
Reopening for writing shrinks the per-step arrays back to ``committed_steps`` (dropping the
uncommitted leftovers) and deletes temporary files of interrupted writes.

The writer takes plain numpy arrays; it never imports torch.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import zarr
import zarr.errors
from zarr.codecs import BloscCodec, ZstdCodec

import gradstore
from gradstore.errors import StoreError
from gradstore.store import _location
from gradstore.store._root import CREATING, check_arrays, layout_from_store, open_root
from gradstore.store.schema import AUX_COORDS, COMMITTED, SAMPLES, SCHEMA_VERSION, RunLayout, array_specs, static_shape

#: arrays checked for NaN/inf to set the per-step ``nonfinite`` flag
_GRADIENT_STATS = ("m", "norm_sq_of_sum", "sum_of_norm_sq", "sq_norm", "dot_with_sum",
                   "grad_coords", "grad_proj", "gram")
_SCALARS = ("lr", "train_loss", "train_acc", "test_loss", "test_acc")


def _compressors(kind: str):
    if kind == "zstd":
        return [ZstdCodec(level=1)]
    if kind == "blosc":
        return [BloscCodec(cname="zstd", clevel=1, shuffle="shuffle")]
    return None


def code_version() -> str:
    """``gradstore <version>`` plus the git commit of the source tree when there is one."""
    text = f"gradstore {gradstore.__version__}"
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(gradstore.__file__).parent,
                             capture_output=True, text=True, timeout=5)
        if out.returncode == 0:
            text += f" (git {out.stdout.strip()})"
    except (OSError, subprocess.SubprocessError):
        pass
    return text


def _json_attr(name: str, value):
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as exc:
        raise StoreError(f"{name} must be JSON-serialisable (dicts, lists, str, numbers): {exc}") from exc


class RunWriter:
    """Appends captured steps to one run store; create it with :func:`create_run`.

    Attributes
    ----------
    layout : RunLayout
        What every step must match.
    committed : int
        Number of committed steps.
    last_step : int or None
        Training step number of the last committed step.
    """

    def __init__(self, group: zarr.Group, layout: RunLayout, name: str):
        self._group = group
        self.layout = layout
        self.name = name
        self._specs = array_specs(layout)
        self._arrays = {k: group[k] for k in self._specs}
        attrs = group.attrs.asdict()
        self.committed = int(attrs[COMMITTED])
        self.last_step = attrs.get("last_step")

    # ------------------------------------------------------------------ appending
    def append_step(self, step: int, *, loss, correct, sq_norm, dot_with_sum, m, norm_sq_of_sum,
                    sum_of_norm_sq, lr=math.nan, train_loss=math.nan, train_acc=math.nan,
                    test_loss=math.nan, test_acc=math.nan, grad_coords=None, grad_proj=None,
                    gram=None) -> int:
        """Write one captured step and commit it.

        Parameters
        ----------
        step : int
            Training step number; larger than every committed step.
        loss, correct : array, dims (example,)
            Per-example loss and whether the prediction equals the training label.
        sq_norm, dot_with_sum : array, dims (example, layer)
            ||g_i||² and g_i · Σ_j g_j (sum over the example's own tracked sample), per layer.
        m, norm_sq_of_sum, sum_of_norm_sq : array, dims (sample, layer)
            Coherence moments over each sample of ``SAMPLES`` (NaN where not computed).
        lr, train_loss, train_acc, test_loss, test_acc : float
            Scalars of the step (NaN when unknown).
        grad_coords : array, dims (example, coord), required when the layout has coordinates
        grad_proj : array, dims (example, layer, proj), required when the layout has projections
        gram : array, dims (layer, example, example_), required when the layout has Gram blocks

        Returns
        -------
        int
            Number of committed steps after this one.
        """
        step = int(step)
        if self.last_step is not None and step <= self.last_step:
            raise StoreError(f"step {step} is not after the last committed step {self.last_step} of "
                             f"{self.name!r}; steps must increase")
        given = dict(loss=loss, correct=correct, sq_norm=sq_norm, dot_with_sum=dot_with_sum, m=m,
                     norm_sq_of_sum=norm_sq_of_sum, sum_of_norm_sq=sum_of_norm_sq, grad_coords=grad_coords,
                     grad_proj=grad_proj, gram=gram, lr=lr, train_loss=train_loss, train_acc=train_acc,
                     test_loss=test_loss, test_acc=test_acc)
        values = {"step": np.int64(step)}
        for key, value in given.items():
            if key not in self._specs:
                if value is not None:
                    raise StoreError(f"{key} was given but the run {self.name!r} does not record it; "
                                     f"create the run with it enabled")
                continue
            if value is None:
                raise StoreError(f"{key} is required: the run {self.name!r} records it")
            values[key] = self._cast(key, value)
        values["nonfinite"] = np.bool_(any(not np.isfinite(values[k]).all() for k in _GRADIENT_STATS if k in values))
        self._write(values, step)
        return self.committed

    def _cast(self, key: str, value) -> np.ndarray:
        spec = self._specs[key]
        want = static_shape(spec, self.layout)[1:]
        arr = np.asarray(value)
        if arr.shape != want:
            raise StoreError(f"{key} has shape {arr.shape}; this run needs {want} for dims {spec.dims[1:]}")
        if spec.dtype == "bool":
            if arr.dtype != np.bool_:
                raise StoreError(f"{key} must be boolean, got dtype {arr.dtype}")
            return arr
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise StoreError(f"{key} must be numeric, got dtype {arr.dtype}")
        return arr.astype(spec.dtype, copy=False)

    def _write(self, values: dict, step: int) -> None:
        index = self.committed
        for key, spec in self._specs.items():
            if spec.per_step:
                arr = self._arrays[key]
                if arr.shape[0] != index + 1:
                    arr.resize((index + 1,) + tuple(arr.shape[1:]))
        for key, value in values.items():
            self._arrays[key][index] = value
        # the commit: one atomic rewrite of the root metadata, after every array is written
        self._group.attrs.update({COMMITTED: index + 1, "last_step": step})
        self.committed, self.last_step = index + 1, step

    def close(self) -> None:
        """Nothing is buffered; provided so the writer can be used as a context manager."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------------- creation / resume
def create_run(target, layout: RunLayout, *, config: dict | None = None, seeds: dict | None = None,
               code: str | None = None, overwrite: bool = False, resume: bool = True,
               storage_options: dict | None = None) -> RunWriter:
    """Create a run store, or reopen an existing one to append more steps.

    Parameters
    ----------
    target : str, path or zarr store
        Local path, ``file://`` or other fsspec URL (``memory://``, ``s3://``...).
    layout : RunLayout
        Layers, examples, coordinates, projections, Gram flag, dtype and compression of the run.
    config, seeds : dict, optional
        Run configuration and seeds, stored as JSON root attributes.
    code : str, optional
        Code version; default ``gradstore <version> (git <commit>)``.
    overwrite : bool
        Replace an existing run (or empty directory) at ``target``. Never deletes a directory
        that is not a zarr store.
    resume : bool
        If a run exists and ``overwrite`` is false, reopen it to append (it must match ``layout``);
        if false, an existing run is an error.

    Raises
    ------
    StoreError
        If ``target`` holds something else, or a run that does not match ``layout``.
    """
    name = _location.describe(target)
    store = _location.open_store(target, read_only=False, storage_options=storage_options)
    state = _existing(store, target)
    if state == "run" and not overwrite:
        if not resume:
            raise StoreError(f"a run already exists at {name!r}; pass overwrite=True to replace it or "
                             f"resume=True to append to it")
        return _resume(store, target, layout, name)
    if state == "foreign" and not overwrite:
        raise StoreError(f"{name!r} already holds a zarr store that is not a gradstore run; choose another path")
    if state == "other":
        raise StoreError(f"{name!r} exists and is not a zarr store; refusing to overwrite it, choose another path")
    return _create(store, layout, name, config=config, seeds=seeds, code=code)


def _existing(store, target) -> str:
    """``"none"`` (nothing or empty dir), ``"run"``, ``"creating"`` (interrupted creation),
    ``"foreign"`` (another zarr node) or ``"other"`` (non-zarr files)."""
    path = _location.local_path(target) if not isinstance(target, zarr.abc.store.Store) else None
    if path is not None:
        if not path.exists() or (path.is_dir() and not any(path.iterdir())):
            return "none"
        if not (path / "zarr.json").is_file():
            return "other"
    try:
        group = zarr.open_group(store, mode="r", zarr_format=3)
    except FileNotFoundError:
        return "none"
    except zarr.errors.NodeNotFoundError:
        return "none" if path is None else "other"
    except Exception:  # an array, or damaged metadata: not ours to delete without overwrite
        return "foreign"
    attrs = group.attrs.asdict()
    if "gradstore_schema" in attrs:
        return "run"
    if CREATING in attrs:
        return "creating"
    return "foreign"


def _create(store, layout: RunLayout, name: str, *, config, seeds, code) -> RunWriter:
    config = _json_attr("config", config or {})
    seeds = _json_attr("seeds", seeds or {})
    group = zarr.open_group(store, mode="w", zarr_format=3, attributes={CREATING: True})
    compressors = _compressors(layout.compression)
    specs = array_specs(layout)
    for key, spec in specs.items():
        dtype = str if spec.dtype == "str" else spec.dtype
        fill = math.nan if spec.dtype.startswith("float") else None
        group.create_array(key, shape=static_shape(spec, layout), dtype=dtype, chunks=spec.chunks,
                           shards=spec.shards, dimension_names=list(spec.dims),
                           compressors=compressors, fill_value=fill)
    n = layout.n_example
    group["example"][...] = layout.example_ids
    group["layer"][...] = np.array(layout.layers, dtype=object)
    group["sample"][...] = np.array(SAMPLES, dtype=object)
    group["true_label"][...] = layout.true_label
    group["train_label"][...] = layout.train_label
    group["corrupt"][...] = (layout.true_label != layout.train_label) & (layout.true_label >= 0)
    group["split"][...] = np.array(["train"] * layout.n_train + ["test"] * (n - layout.n_train), dtype=object)
    if layout.n_coord:
        group["coord"][...] = np.arange(layout.n_coord, dtype=np.int64)
        group["coord_layer"][...] = np.array(layout.coord_layer, dtype=object)
        group["coord_param"][...] = np.array(layout.coord_param, dtype=object)
        group["coord_index"][...] = layout.coord_index
    if layout.n_proj:
        group["proj"][...] = np.arange(layout.n_proj, dtype=np.int64)
    if layout.gram:
        group["example_"][...] = layout.example_ids
    present = [c for c in AUX_COORDS if c in specs]
    group.attrs.put({
        "gradstore_schema": SCHEMA_VERSION,
        "gradstore_version": gradstore.__version__,
        "code_version": code or code_version(),
        "config": config,
        "model": layout.model_description(),
        "seeds": seeds,
        "projection_seed": layout.projection_seed,
        "storage": layout.storage_description(),
        "coordinates": " ".join(present),
        COMMITTED: 0,
        "last_step": None,
    })
    return RunWriter(group, layout, name)


def _resume(store, target, layout: RunLayout, name: str) -> RunWriter:
    group, attrs = open_root(store, name, writable=True)
    stored = layout_from_store(group, attrs, name)
    _check_match(stored, layout, name)
    committed = attrs[COMMITTED]
    check_arrays(group, stored, committed, name)
    path = _location.local_path(target) if not isinstance(target, zarr.abc.store.Store) else None
    if path is not None:
        _location.remove_partial_files(path)
    for key, spec in array_specs(stored).items():
        arr = group[key]
        if spec.per_step and arr.shape[0] != committed:
            arr.resize((committed,) + tuple(arr.shape[1:]))
    return RunWriter(group, stored, name)


def _check_match(stored: RunLayout, new: RunLayout, name: str) -> None:
    def refuse(what: str):
        raise StoreError(f"cannot append to {name!r}: {what} differs from the stored run; write to "
                         f"another path or pass overwrite=True")

    if stored.model_description() != new.model_description():
        refuse("the model (parameter names, shapes or layers)")
    if not np.array_equal(stored.example_ids, new.example_ids) or stored.n_train != new.n_train:
        refuse("the tracked examples (ids or train/test split)")
    if not (np.array_equal(stored.true_label, new.true_label) and np.array_equal(stored.train_label, new.train_label)):
        refuse("the example labels")
    if (stored.coord_layer, stored.coord_param) != (new.coord_layer, new.coord_param) or not np.array_equal(
            stored.coord_index, new.coord_index):
        refuse("the sampled coordinate set")
    if (stored.n_proj, stored.projection_seed) != (new.n_proj, new.projection_seed):
        refuse("the projection (dimension or seed)")
    if stored.gram != new.gram:
        refuse("whether Gram blocks are stored")
    if stored.dtype != new.dtype:
        refuse(f"the storage dtype ({stored.dtype} stored, {new.dtype} given)")
