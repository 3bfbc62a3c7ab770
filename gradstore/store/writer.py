"""Write a run store: create it, append one captured step at a time, resume after a crash.

Commit protocol (``docs/store-format.md``, "Commit protocol")
-------------------------------------------------------------
An append (1) grows every per-step array to ``committed + 1`` steps, (2) writes the step's slot of
every array and its digests (``step_crc32c``), and only then (3) replaces the root ``zarr.json`` in
one atomic write holding ``committed_steps + 1``, ``last_step`` and the consolidated metadata of
every array *at its committed length*. Readers see the store through that root document only, so a
reader opening at any moment, gradstore or plain ``xarray.open_zarr``, sees whole committed steps
and every array the same length. ``kill -9`` at any moment leaves at most one uncommitted step
behind; reopening for writing removes it (and ``*.partial`` files of interrupted writes) and
refuses, changing nothing, any store a crash cannot have produced.

One writer at a time: a store is locked for the writer's lifetime (:mod:`._lock`): a local one by
the kernel, one on ``s3://`` by a lease object renewed with conditional writes, which the writer checks
before every step and before every commit; writing to other fsspec protocols is refused.

The writer takes plain numpy arrays; it never imports torch.
"""

from __future__ import annotations

import asyncio
import json
import math
import numbers
import subprocess
from pathlib import Path

import numpy as np
import zarr
import zarr.errors
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

import gradstore
from gradstore.errors import StoreError
from gradstore.store import _location
from gradstore.store._integrity import DIGEST, DIGESTED, crc32_of, damage_message
from gradstore.store._lock import WriterLock, holder, object_lock
from gradstore.store._root import (CREATING, check_arrays, check_steps, layout_from_store, missing_chunks, open_root,
                                   with_step_numbers)
from gradstore.store.schema import (AUX_COORDS, COMMITTED, PARAM_MOMENTS, SAMPLES, SCHEMA_VERSION, RunLayout,
                                    array_specs, digested_arrays, every_array_name, static_shape)
from gradstore.store.verify import check_step

#: arrays checked for NaN/inf to set the per-step ``nonfinite`` flag
_GRADIENT_STATS = ("m", "norm_sq_of_sum", "sum_of_norm_sq", *PARAM_MOMENTS, "sq_norm", "dot_with_sum",
                   "grad_coords", "grad_proj", "gram")
_SCALARS = ("lr", "train_loss", "train_acc", "test_loss", "test_acc")
#: zarr runtime option: write every chunk, even one of fill values, so a missing chunk is damage
_ARRAY_CONFIG = {"write_empty_chunks": True}


def _compressors(kind: str, checksums: bool):
    """The bytes-to-bytes codecs of every array: the compressor, then a checksum of each chunk.

    zstd frames carry their own content checksum (XXH64, verified on decompression, computed inside
    zstd at no measurable cost); ``blosc`` and ``none`` get the ``crc32c`` codec after them.
    """
    if kind == "zstd":
        return [ZstdCodec(level=1, checksum=checksums)]
    out = [BloscCodec(cname="zstd", clevel=1, shuffle="shuffle")] if kind == "blosc" else []
    if checksums:
        out.append(Crc32cCodec())
    return out or None


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
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise StoreError(f"{name} must be JSON-serialisable (dicts, lists, str, finite numbers): {exc}") from exc


def check_step_number(step) -> int:
    """``step`` as an int: a training step number is an integer >= 0 (not a bool, float or string)."""
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
        raise StoreError(f"step must be an integer >= 0 (the training step number), got {step!r}")
    return int(step)


def _metadata_document(arr: zarr.Array) -> dict:
    """The JSON document of an array's ``zarr.json`` (as zarr itself encodes it)."""
    return json.loads(arr.metadata.to_buffer_dict(default_buffer_prototype())["zarr.json"].to_bytes())


def _put(store, key: str, document: dict) -> None:
    """Replace ``key`` with a JSON document in one write (atomic on local disks and object stores)."""
    data = json.dumps(document, separators=(",", ":"), allow_nan=False).encode()
    sync(store.set(key, default_buffer_prototype().buffer.from_bytes(data)))


class RunWriter:
    """Appends captured steps to one run store; create it with :func:`create_run`.

    Holds the store's writer lock (local stores) until :meth:`close`; use it as a context manager.

    Attributes
    ----------
    layout : RunLayout
        What every step must match.
    committed : int
        Number of committed steps.
    last_step : int or None
        Training step number of the last committed step.
    """

    def __init__(self, store, group: zarr.Group, layout: RunLayout, name: str, attrs: dict,
                 lock: WriterLock | None, *, ignored: tuple[str, ...] = ()):
        self._store = store
        self._ignored = frozenset(ignored)  # optional arrays a store created without them does not take
        self.layout = layout
        self.name = name
        self._lock = lock
        self._specs = array_specs(layout)
        self._arrays = {k: group[k].with_config(_ARRAY_CONFIG) for k in self._specs}
        self._documents = {k: _metadata_document(a) for k, a in self._arrays.items()}
        self._digested = digested_arrays(layout) if layout.checksums else ()
        self._attrs = {**attrs, "writer": holder()}
        self.committed = int(attrs[COMMITTED])
        self.last_step = attrs.get("last_step")
        self._commit(self.committed, self.last_step)  # records this writer; changes no data

    # ------------------------------------------------------------------ appending
    def append_step(self, step: int, *, loss, sq_norm, dot_with_sum, m, norm_sq_of_sum,
                    sum_of_norm_sq, correct=None, lr=math.nan, train_loss=math.nan, train_acc=math.nan,
                    test_loss=math.nan, test_acc=math.nan, grad_coords=None, grad_proj=None,
                    gram=None, param_norm_sq_of_sum=None, param_sum_of_norm_sq=None) -> int:
        """Write one captured step and commit it.

        Parameters
        ----------
        step : int
            Training step number (an integer >= 0); larger than every committed step.
        loss, correct : array, dims (example,)
            Per-example loss and correctness (bool, or a fraction for ``layout.correct ==
            "fraction"``; required unless the layout stores no ``correct``).
        sq_norm, dot_with_sum : array, dims (example, layer)
            ||g_i||² and g_i · Σ_j g_j (sum over the example's own tracked sample), per layer.
        m, norm_sq_of_sum, sum_of_norm_sq : array, dims (sample, layer)
            Coherence moments over each sample of ``SAMPLES`` (NaN where not computed).
        lr, train_loss, train_acc, test_loss, test_acc : float
            Scalars of the step (NaN when unknown).
        grad_coords : array, dims (example, coord), required when the layout has coordinates
        grad_proj : array, dims (example, layer, proj), required when the layout has projections
        gram : array, dims (layer, example, example_), required when the layout has Gram blocks
        param_norm_sq_of_sum, param_sum_of_norm_sq : array, dims (sample, param)
            ||Σ g||² and Σ ||g||² of each parameter (``layout.params`` order), required when the
            layout has ``param_moments``. A run created without them and resumed with a layout that
            has them keeps its own layout: they are not stored (the store says so,
            ``storage.param_moments`` false).

        Returns
        -------
        int
            Number of committed steps after this one.
        """
        if self._store is None:
            raise StoreError(f"the writer of {self.name!r} is closed; open the run again to append")
        step = check_step_number(step)
        if self.last_step is not None and step <= self.last_step:
            raise StoreError(f"step {step} is not after the last committed step {self.last_step} of "
                             f"{self.name!r}; steps must increase")
        given = dict(loss=loss, correct=correct, sq_norm=sq_norm, dot_with_sum=dot_with_sum, m=m,
                     norm_sq_of_sum=norm_sq_of_sum, sum_of_norm_sq=sum_of_norm_sq, grad_coords=grad_coords,
                     grad_proj=grad_proj, gram=gram, param_norm_sq_of_sum=param_norm_sq_of_sum,
                     param_sum_of_norm_sq=param_sum_of_norm_sq, lr=lr, train_loss=train_loss, train_acc=train_acc,
                     test_loss=test_loss, test_acc=test_acc)
        values = {"step": np.int64(step)}
        for key, value in given.items():
            if key not in self._specs:
                if value is not None and key not in self._ignored:
                    raise StoreError(f"{key} was given but the run {self.name!r} does not record it; "
                                     f"create the run with it enabled")
                continue
            if value is None:
                raise StoreError(f"{key} is required: the run {self.name!r} records it")
            values[key] = self._cast(key, value)
        if self._lock is not None:
            self._lock.check()  # an object-store lease can be lost (taken over after it expired)
        values["nonfinite"] = np.bool_(any(not np.isfinite(values[k]).all() for k in _GRADIENT_STATS if k in values))
        try:
            self._write(values, step)
        except OSError as exc:  # a full disk, a lost mount...: this step is not committed, the others are
            raise StoreError(f"writing step {step} to {self.name!r} failed ({exc.strerror or exc}); it was not "
                             f"committed and the {self.committed} committed step(s) are intact: fix the cause "
                             f"(e.g. free disk space), then resume (--resume on the command line)") from None
        return self.committed

    def _cast(self, key: str, value) -> np.ndarray:
        spec = self._specs[key]
        want = static_shape(spec, self.layout)[1:]
        try:
            arr = np.asarray(value)
        except (TypeError, ValueError) as exc:
            raise StoreError(f"{key} must be a numeric array of shape {want}: {exc}") from None
        if arr.shape != want:
            raise StoreError(f"{key} has shape {arr.shape}; this run needs {want} for dims {spec.dims[1:]}")
        if spec.dtype == "bool":
            if arr.dtype != np.bool_:
                raise StoreError(f"{key} must be boolean, got dtype {arr.dtype}")
            return arr
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise StoreError(f"{key} must be numeric, got dtype {arr.dtype}")
        return arr.astype(spec.dtype, copy=False)

    def _digests(self, values: dict) -> np.ndarray:
        """The step's ``step_crc32c`` row: the CRC32C of every digested array's slot, as written."""
        return np.array([crc32_of(values[k], self._specs[k].dtype) for k in self._digested], dtype=np.uint32)

    def _write(self, values: dict, step: int) -> None:
        index = self.committed
        arrays = {key: self._arrays[key].async_array for key in self._specs if self._specs[key].per_step}

        async def digest_then_write():
            # hashed in a thread while zarr compresses the other arrays in its own
            await arrays[DIGEST].setitem(index, await asyncio.to_thread(self._digests, values))

        async def grow_then_write():
            # (1) grow every per-step array (readers keep seeing the committed length: the root)
            await asyncio.gather(*(a.resize((index + 1,) + tuple(a.shape[1:])) for a in arrays.values()
                                   if a.shape[0] != index + 1))
            # (2) every slot of the step, concurrently (zarr batches the I/O), and its digests
            writes = [arrays[key].setitem(index, value) for key, value in values.items()]
            await asyncio.gather(*writes, *([digest_then_write()] if self._digested else []))

        sync(grow_then_write())
        if self._lock is not None:
            self._lock.check()  # never commit without holding the lock (object stores: a fresh lease)
        # (3) the commit, after every write above has completed: one atomic replace of the root
        self._commit(index + 1, step)

    def _commit(self, committed: int, last_step) -> None:
        """Replace the root ``zarr.json``: attributes and every array's metadata at ``committed`` steps."""
        members = {}
        for key, doc in self._documents.items():
            if self._specs[key].per_step:
                doc = {**doc, "shape": [committed] + list(doc["shape"][1:])}
            members[key] = doc
        self._attrs.update({COMMITTED: committed, "last_step": last_step})
        _put(self._store, "zarr.json", {
            "zarr_format": 3, "node_type": "group", "attributes": self._attrs,
            "consolidated_metadata": {"kind": "inline", "must_understand": False, "metadata": members}})
        self.committed, self.last_step = committed, last_step

    def close(self) -> None:
        """Release the store's writer lock; nothing is buffered (every append is committed)."""
        if self._lock is not None:
            self._lock.release()
        self._store = None

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
        Local path, ``file://``, ``memory://`` or ``s3://`` URL (other fsspec protocols are refused:
        no writer lock can be held there; see ``docs/object-storage.md``).
    layout : RunLayout
        Layers, examples, coordinates, projections, Gram flag, dtype and compression of the run.
    config, seeds : dict, optional
        Run configuration and seeds, stored as JSON root attributes.
    code : str, optional
        Code version; default ``gradstore <version> (git <commit>)``.
    overwrite : bool
        Replace an existing run at ``target``. Deletes only what a run store owns (its root
        ``zarr.json`` and the schema's arrays); refuses, deleting nothing, when ``target`` holds
        anything else.
    resume : bool
        If a run exists and ``overwrite`` is false, reopen it to append (it must match ``layout``);
        if false, an existing run is an error.

    Raises
    ------
    StoreError
        If ``target`` holds something else, a run that does not match ``layout`` or is damaged, or
        another writer holds it.
    """
    if not isinstance(layout, RunLayout):
        raise StoreError(f"layout must be a gradstore.store.RunLayout, got {type(layout).__name__}")
    try:
        return _create_or_resume(target, layout, config=config, seeds=seeds, code=code, overwrite=overwrite,
                                 resume=resume, storage_options=storage_options)
    except OSError as exc:  # a full disk, a read-only folder...: committed steps of a resumed run are intact
        raise StoreError(f"cannot write the run store {_location.describe(target)!r} "
                         f"({exc.strerror or exc}); fix the cause (free disk space, permissions) and run "
                         f"again") from None


def _create_or_resume(target, layout, *, config, seeds, code, overwrite, resume, storage_options) -> RunWriter:
    name = _location.describe(target)
    store = _location.open_store(target, read_only=False, storage_options=storage_options)
    path = _location.local_path(target) if not isinstance(target, zarr.abc.store.Store) else None
    _refuse_existing(_existing(store, path), name, overwrite=overwrite, resume=resume)
    lock = None
    if path is not None:
        lock = WriterLock(path, name, recorded=lambda: _recorded_writer(store))
    elif not isinstance(target, zarr.abc.store.Store):  # a zarr store object given: the caller's to guard
        lock = object_lock(store, name)
    try:
        state = _existing(store, path)  # again, under the lock
        _refuse_existing(state, name, overwrite=overwrite, resume=resume)
        if state == "run" and not overwrite:
            return _resume(store, path, layout, name, lock)
        if state != "none":
            _remove_owned(store, name)
        return _create(store, layout, name, config=config, seeds=seeds, code=code, lock=lock)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _refuse_existing(state: str, name: str, *, overwrite: bool, resume: bool) -> None:
    if state == "run" and not overwrite and not resume:
        raise StoreError(f"a run already exists at {name!r}; continue it (--resume on the command line, "
                         f"resume=True in Python) or write to another path")
    if state == "foreign" and not overwrite:
        raise StoreError(f"{name!r} already holds a zarr store that is not a gradstore run; choose another path")
    if state == "damaged":
        raise StoreError(f"{name!r} has a damaged root zarr.json; nothing was changed: repair or move it, "
                         f"or write to another path")
    if state == "other":
        raise StoreError(f"{name!r} exists and is not a zarr store; refusing to overwrite it, choose another path")


def _recorded_writer(store):
    try:
        return zarr.open_group(store, mode="r", zarr_format=3, use_consolidated=False).attrs.get("writer")
    except Exception:  # whatever the root holds, the lock message just has no name then
        return None


def _existing(store, path: Path | None) -> str:
    """``"none"`` (nothing or an empty dir), ``"run"``, ``"creating"`` (interrupted creation),
    ``"foreign"`` (another zarr node), ``"damaged"`` (unreadable root) or ``"other"`` (non-zarr files)."""
    if path is not None:
        if path.exists() and not path.is_dir():
            return "other"
        if not path.exists() or not any(p for p in path.iterdir() if not p.name.endswith(".partial")):
            return "none"
        if not (path / "zarr.json").is_file():
            return "other"
    try:
        group = zarr.open_group(store, mode="r", zarr_format=3, use_consolidated=False)
    except FileNotFoundError:  # no root zarr.json: an object-store prefix may hold other objects
        return "other" if path is None and _has_entries(store) else "none"
    except zarr.errors.NodeNotFoundError:
        return "other" if path is not None or _has_entries(store) else "none"
    except zarr.errors.ContainsArrayError:
        return "foreign"
    except Exception:  # damaged metadata: not ours to delete
        return "damaged"
    attrs = group.attrs.asdict()
    if "gradstore_schema" in attrs:
        return "run"
    if CREATING in attrs:
        return "creating"
    return "foreign"


def _has_entries(store) -> bool:
    """Whether a store (an object-store prefix) holds any key at all."""
    async def first():
        async for _ in store.list_dir(""):
            return True
        return False

    return sync(first())


def _remove_owned(store, name: str) -> None:
    """Delete what a run store owns (root ``zarr.json``, the schema's arrays, ``*.partial`` files).

    Refuses, deleting nothing, if the store holds any other entry. The root is first replaced by a
    "creating" marker, so an interrupted removal leaves a store the next writer recreates.
    """
    async def entries():
        return [k async for k in store.list_dir("")]

    arrays = every_array_name()
    found = sync(entries())
    foreign = sorted(k for k in found if k not in arrays and k != "zarr.json" and not k.endswith(".partial"))
    if foreign:
        raise StoreError(f"{name!r} holds entries that are not part of a gradstore run ({', '.join(foreign[:5])}); "
                         f"nothing was deleted: move them away or write to another path")
    _mark_creating(store)
    for key in found:
        if key in arrays:
            sync(store.delete_dir(key))
        elif key.endswith(".partial"):
            sync(store.delete(key))


def _mark_creating(store) -> None:
    """Make the root a run being created (no steps): what an interrupted creation or removal leaves."""
    _put(store, "zarr.json", {"zarr_format": 3, "node_type": "group", "attributes": {CREATING: True}})


def _create(store, layout: RunLayout, name: str, *, config, seeds, code, lock) -> RunWriter:
    config = _json_attr("config", config or {})
    seeds = _json_attr("seeds", seeds or {})
    _mark_creating(store)
    group = zarr.open_group(store, mode="r+", zarr_format=3, use_consolidated=False)
    compressors = _compressors(layout.compression, layout.checksums)
    specs = array_specs(layout)
    arrays = {}
    for key, spec in specs.items():
        dtype = str if spec.dtype == "str" else spec.dtype
        fill = math.nan if spec.dtype.startswith("float") else None
        arrays[key] = group.create_array(key, shape=static_shape(spec, layout), dtype=dtype, chunks=spec.chunks,
                                         shards=spec.shards, dimension_names=list(spec.dims),
                                         compressors=compressors, fill_value=fill, config=_ARRAY_CONFIG)
    n = layout.n_example
    static = {
        "example": layout.example_ids,
        "layer": np.array(layout.layers, dtype=object),
        "sample": np.array(SAMPLES, dtype=object),
        "true_label": layout.true_label,
        "train_label": layout.train_label,
        "corrupt": (layout.true_label != layout.train_label) & (layout.true_label >= 0),
        "split": np.array(["train"] * layout.n_train + ["test"] * (n - layout.n_train), dtype=object),
    }
    if layout.n_coord:
        static.update(coord=np.arange(layout.n_coord, dtype=np.int64),
                      coord_layer=np.array(layout.coord_layer, dtype=object),
                      coord_param=np.array(layout.coord_param, dtype=object), coord_index=layout.coord_index)
    if layout.n_proj:
        static["proj"] = np.arange(layout.n_proj, dtype=np.int64)
    if layout.gram:
        static["example_"] = layout.example_ids
    if layout.param_moments:
        static.update(param=np.array([p for p, _, _ in layout.params], dtype=object),
                      param_layer=np.array([la for _, _, la in layout.params], dtype=object))
    if layout.checksums:
        static[DIGESTED] = np.array(digested_arrays(layout), dtype=object)
    for key, value in static.items():
        arrays[key][...] = value
    present = [c for c in AUX_COORDS if c in specs]
    attrs = {
        "gradstore_schema": SCHEMA_VERSION,
        "gradstore_version": gradstore.__version__,
        "code_version": code or code_version(),
        "config": config,
        "model": layout.model_description(),
        "seeds": seeds,
        "projection_seed": layout.projection_seed,
        "storage": layout.storage_description(),
        **{key: _json_attr(key, value) for key, value in layout.task_attrs().items()},
        "coordinates": " ".join(present),
        "static_crc32c": ({k: crc32_of(v, specs[k].dtype) for k, v in static.items()} if layout.checksums else {}),
        COMMITTED: 0,
        "last_step": None,
    }
    return RunWriter(store, group, layout, name, attrs, lock)


def _resume(store, path: Path | None, layout: RunLayout, name: str, lock) -> RunWriter:
    """Reopen a run to append: check it is what a crash can leave, then drop the uncommitted step."""
    group, attrs = open_root(store, name, writable=True)
    stored = layout_from_store(group, attrs, name)
    _check_match(stored, layout, name)
    committed = attrs[COMMITTED]
    arrays = check_arrays(group, stored, committed, name, uncommitted=1)
    steps = check_steps(arrays, attrs, committed, name)
    problems = with_step_numbers(missing_chunks(store, stored, arrays, committed), steps)
    if not problems and committed and stored.checksums:  # the last committed step, read back
        problems = check_step(arrays, stored, committed - 1, steps)
    if problems:
        raise StoreError(damage_message(name, problems, skip_hint=False) + "; nothing was changed")
    if path is not None:
        _location.remove_partial_files(path)
    for key, spec in array_specs(stored).items():
        arr = arrays[key]
        if spec.per_step and arr.shape[0] != committed:  # the one uncommitted step
            arr.resize((committed,) + tuple(arr.shape[1:]))
    # a run created before per-parameter moments (or without them) keeps its layout when resumed
    ignored = PARAM_MOMENTS if layout.param_moments and not stored.param_moments else ()
    return RunWriter(store, group, stored, name, attrs, lock, ignored=ignored)


def _check_match(stored: RunLayout, new: RunLayout, name: str) -> None:
    def refuse(what: str):
        raise StoreError(f"cannot append to {name!r}: {what} differs from the stored run; write to "
                         f"another path (or replace the run: overwrite=True in Python)")

    if stored.model_description() != new.model_description():
        refuse("the model (parameter names, shapes or layers)")
    if not np.array_equal(stored.example_ids, new.example_ids) or stored.n_train != new.n_train:
        refuse("the tracked examples (ids or train/test split)")
    if (stored.task, stored.correct, stored.task_options) != (new.task, new.correct, new.task_options):
        refuse(f"the task ({stored.task} stored, {new.task} given) or its options")
    if not (np.array_equal(stored.true_label, new.true_label) and np.array_equal(stored.train_label, new.train_label)):
        refuse("the example labels")
    if (stored.coord_layer, stored.coord_param) != (new.coord_layer, new.coord_param) or not np.array_equal(
            stored.coord_index, new.coord_index):
        refuse("the sampled coordinate set")
    if (stored.n_proj, stored.projection_seed) != (new.n_proj, new.projection_seed):
        refuse("the projection (dimension or seed)")
    if stored.gram != new.gram:
        refuse("whether Gram blocks are stored")
    if stored.param_moments and not new.param_moments:
        refuse("whether per-parameter moments are stored (the run stores them)")
    if stored.measurement is not None and stored.measurement != new.measurement:
        refuse(f"the measurement ({stored.measurement} stored, {new.measurement} given)")
    if stored.dtype != new.dtype:
        refuse(f"the storage dtype ({stored.dtype} stored, {new.dtype} given)")
