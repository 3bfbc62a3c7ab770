"""The run-store schema: array names, dimensions, dtypes, chunking and the run layout.

One place defines what a gradstore run holds (``docs/store-format.md`` documents it). The writer
creates arrays from :func:`array_specs`; the reader checks a store against the same specs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from gradstore.errors import StoreError
from gradstore.store._integrity import DIGEST, DIGESTED

#: version of the on-disk layout new stores are written with (docs/store-format.md, "Versioning"):
#: 3 adds the per-parameter moments (``storage.param_moments``) to 2
SCHEMA_VERSION = 3
#: versions this gradstore reads (and appends to, keeping the store's own version); others are refused
READABLE_SCHEMAS = (2, 3)

#: root attribute holding the number of committed steps (written last by every append)
COMMITTED = "committed_steps"

#: the example sets coherence moments are computed over (dimension ``sample``)
SAMPLES = ("tracked_train", "tracked_test", "moments_train")

#: steps per chunk of the small per-step arrays (one chunk is rewritten whole at each append)
STEP_BLOCK = 64

#: target size in bytes of an inner chunk of the large per-step arrays
INNER_CHUNK_BYTES = 1 << 20

#: most bytes of one chunk of the per-example arrays (loss, correct, sq_norm, dot_with_sum): fewer
#: than STEP_BLOCK steps per chunk when the examples x layers of one step are large (m = 50,000)
PER_EXAMPLE_CHUNK_BYTES = 16 << 20

STORAGE_DTYPES = ("float32", "float16")
COMPRESSIONS = ("zstd", "blosc", "none")

#: what a run's ``task`` root attribute may say (``docs/store-format.md``, "Tasks"); absent: classification
TASK_NAMES = ("classification", "sequence", "regression", "custom")

#: what ``correct`` (step, example) holds: a bool, or a fraction in [0, 1] (float64); None: no ``correct``
CORRECT_KINDS = ("bool", "fraction")

#: static coordinates attached to ``example`` and ``coord`` (listed in the root ``coordinates`` attr)
AUX_COORDS = ("true_label", "train_label", "corrupt", "split", "coord_layer", "coord_param", "coord_index",
              "param_layer")

#: the per-parameter coherence moments (dims (step, sample, param)), stored when ``RunLayout.param_moments``
PARAM_MOMENTS = ("param_norm_sq_of_sum", "param_sum_of_norm_sq")


@dataclass(frozen=True)
class ArraySpec:
    """One array of the store.

    Attributes
    ----------
    name : str
        Array name (and xarray variable name).
    dims : tuple of str
        ``dimension_names`` of the array.
    dtype : str
        numpy dtype name, or ``"str"`` for variable-length UTF-8 strings.
    chunks, shards : tuple of int or None
        Zarr chunk (inner chunk when sharded) and shard shapes; ``None`` shards: unsharded.
    """

    name: str
    dims: tuple[str, ...]
    dtype: str
    chunks: tuple[int, ...]
    shards: tuple[int, ...] | None = None

    @property
    def per_step(self) -> bool:
        return bool(self.dims) and self.dims[0] == "step"


@dataclass(frozen=True, eq=False)
class RunLayout:
    """What a run records: the fixed part every appended step must match.

    Parameters
    ----------
    layers : tuple of str
        Layer names (qualified name of the module owning parameters), in model order.
    params : tuple of (name, shape, layer)
        Every trainable parameter: name as in ``model.named_parameters()``, shape, owning layer.
    example_ids : ndarray of int64, shape (example,)
        Stable ids of the tracked examples: train examples first, then test examples.
    true_label, train_label : ndarray of int64, shape (example,), optional
        Clean label and the (possibly corrupted) label trained on; -1 where unknown.
    n_train : int
        How many of ``example_ids`` are tracked train examples (the rest are test examples).
    coord_layer, coord_param : tuple of str
        For each sampled gradient coordinate, its layer and parameter (empty: no coordinates).
    coord_index : ndarray of int64
        Flat index of each sampled coordinate inside its parameter.
    n_proj : int
        Random projection dimension per layer (0: no projections).
    projection_seed : int or None
        Seed of the projection matrices (required when ``n_proj > 0``).
    gram : bool
        Whether exact per-layer Gram blocks are stored.
    dtype : {"float32", "float16"}
        Storage dtype of ``grad_coords`` and ``grad_proj``.
    compression : {"zstd", "blosc", "none"}
        Compressor of every array (not checked on resume).
    checksums : bool, default True
        Store a CRC32C checksum with every chunk and a CRC32C digest of every step's values, so
        damage is detected (``docs/store-format.md``, "Integrity"). False only to measure what they
        cost (``gradstore bench store``): such a store cannot tell damaged values from good ones.
    task : str, default "classification"
        What the outputs mean (one of :data:`TASK_NAMES`); stored as the root attribute ``task``.
    correct : {"bool", "fraction"} or None, default "bool"
        What ``correct`` holds per example (None: the run stores no ``correct``).
    task_options : dict
        JSON options of the task (root attribute ``task_options``).
    measurement : dict or None
        How gradients were measured, ``{"mode": "eval" | "train", "bn_priming": ...}`` (root
        attribute ``measurement``, written by the Recorder); None: not recorded (a writer that does
        not know, or a store written before it was recorded), and the attribute is left out.
    param_moments : bool, default False
        Also store the coherence moments of every parameter, :data:`PARAM_MOMENTS` (step, sample,
        param), with the static ``param`` and ``param_layer`` arrays (``storage.param_moments``; the
        Recorder stores them). False: a store without them, as every store written before them.
    """

    layers: tuple[str, ...]
    params: tuple[tuple[str, tuple[int, ...], str], ...]
    example_ids: np.ndarray
    n_train: int
    true_label: np.ndarray | None = None
    train_label: np.ndarray | None = None
    coord_layer: tuple[str, ...] = ()
    coord_param: tuple[str, ...] = ()
    coord_index: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    n_proj: int = 0
    projection_seed: int | None = None
    gram: bool = False
    dtype: str = "float32"
    compression: str = "zstd"
    checksums: bool = True
    task: str = "classification"
    correct: str | None = "bool"
    task_options: dict = field(default_factory=dict)
    measurement: dict | None = None
    param_moments: bool = False

    def __post_init__(self):
        ids = np.asarray(self.example_ids)
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise StoreError("example_ids must be a 1-d integer array; pass the stable example ids")
        unique, counts = np.unique(ids, return_counts=True)
        if unique.size != ids.size:
            raise StoreError(f"example_ids must be unique (train and test ids together); "
                             f"{unique[counts > 1][:5].tolist()} occur more than once")
        object.__setattr__(self, "example_ids", ids.astype(np.int64))
        for name in ("true_label", "train_label"):
            value = getattr(self, name)
            value = np.full(ids.size, -1, np.int64) if value is None else np.asarray(value).astype(np.int64)
            if value.shape != ids.shape:
                raise StoreError(f"{name} has shape {value.shape}; it needs one label per example {ids.shape}")
            object.__setattr__(self, name, value)
        idx = np.asarray(self.coord_index, dtype=np.int64).reshape(-1)
        object.__setattr__(self, "coord_index", idx)
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "params", tuple((str(n), tuple(int(s) for s in sh), str(la)) for n, sh, la in self.params))
        object.__setattr__(self, "coord_layer", tuple(self.coord_layer))
        object.__setattr__(self, "coord_param", tuple(self.coord_param))
        if not self.layers:
            raise StoreError("a run needs at least one layer; the model has no trainable parameters")
        if len(set(self.layers)) != len(self.layers):
            raise StoreError(f"layer names must be unique, got {list(self.layers)}")
        if not 0 <= self.n_train <= ids.size:
            raise StoreError(f"n_train={self.n_train} must lie between 0 and the number of examples ({ids.size})")
        if len({len(self.coord_layer), len(self.coord_param), idx.size}) != 1:
            raise StoreError("coord_layer, coord_param and coord_index must have the same length")
        if self.n_proj < 0 or (self.n_proj > 0 and self.projection_seed is None):
            raise StoreError("projections need n_proj > 0 and a projection_seed")
        if self.dtype not in STORAGE_DTYPES:
            raise StoreError(f"dtype must be one of {STORAGE_DTYPES}, got {self.dtype!r}")
        if self.compression not in COMPRESSIONS:
            raise StoreError(f"compression must be one of {COMPRESSIONS}, got {self.compression!r}")
        if self.task not in TASK_NAMES:
            raise StoreError(f"task must be one of {TASK_NAMES}, got {self.task!r}")
        if self.correct is not None and self.correct not in CORRECT_KINDS:
            raise StoreError(f"correct must be one of {CORRECT_KINDS} or None, got {self.correct!r}")
        object.__setattr__(self, "param_moments", bool(self.param_moments))
        if self.param_moments:
            names = [n for n, _, _ in self.params]
            if not names or len(set(names)) != len(names):
                raise StoreError(f"per-parameter moments need unique parameter names, got {names[:5]}")
            stray = sorted({la for _, _, la in self.params} - set(self.layers))
            if stray:
                raise StoreError(f"per-parameter moments: parameters name layers {stray[:5]} that are not in "
                                 f"layers; give every parameter's owning layer")

    @property
    def n_example(self) -> int:
        return int(self.example_ids.size)

    @property
    def n_coord(self) -> int:
        return int(self.coord_index.size)

    def model_description(self) -> dict:
        """JSON description of the model stored as the root attribute ``model``."""
        return {
            "layers": list(self.layers),
            "params": [{"name": n, "shape": list(s), "layer": la} for n, s, la in self.params],
        }

    def storage_description(self) -> dict:
        """JSON description of the storage options stored as the root attribute ``storage``."""
        return {"dtype": self.dtype, "compression": self.compression, "n_train": self.n_train,
                "n_proj": self.n_proj, "gram": self.gram, "checksums": self.checksums,
                "param_moments": self.param_moments}

    def task_attrs(self) -> dict:
        """The root attributes that say what the run measures: ``task``, ``task_options``, ``measurement``."""
        attrs = {"task": self.task, "task_options": dict(self.task_options)}
        if self.measurement is not None:
            attrs["measurement"] = dict(self.measurement)
        return attrs

    def replace(self, **changes) -> RunLayout:
        return dataclasses.replace(self, **changes)


def _rows(row_bytes: int, n_rows: int) -> int:
    """Rows per inner chunk so that one inner chunk is about ``INNER_CHUNK_BYTES``."""
    return int(max(1, min(n_rows, INNER_CHUNK_BYTES // max(1, row_bytes))))


def _steps(step_bytes: int) -> int:
    """Steps per chunk of a per-example array: ``STEP_BLOCK``, fewer if that passes ``PER_EXAMPLE_CHUNK_BYTES``."""
    return int(max(1, min(STEP_BLOCK, PER_EXAMPLE_CHUNK_BYTES // max(1, step_bytes))))


def _padded(rows: int, n: int) -> int:
    """Smallest multiple of ``rows`` covering ``n`` (a shard must hold whole inner chunks)."""
    return -(-n // rows) * rows


def array_specs(layout: RunLayout) -> dict[str, ArraySpec]:
    """Every array of a run with this layout, by name.

    Static arrays are one chunk. Small per-step arrays hold ``STEP_BLOCK`` steps per chunk (the
    per-example ones fewer when that would pass ``PER_EXAMPLE_CHUNK_BYTES``). The
    large arrays (``grad_coords``, ``grad_proj``, ``gram``) hold one step per shard, written whole.
    """
    n, nl, ns = max(layout.n_example, 1), len(layout.layers), len(SAMPLES)
    nc, k = max(layout.n_coord, 1), max(layout.n_proj, 1)
    specs = [
        ArraySpec("step", ("step",), "int64", (STEP_BLOCK,)),
        ArraySpec("example", ("example",), "int64", (n,)),
        ArraySpec("layer", ("layer",), "str", (nl,)),
        ArraySpec("sample", ("sample",), "str", (ns,)),
        ArraySpec("true_label", ("example",), "int64", (n,)),
        ArraySpec("train_label", ("example",), "int64", (n,)),
        ArraySpec("corrupt", ("example",), "bool", (n,)),
        ArraySpec("split", ("example",), "str", (n,)),
    ]
    for name in ("lr", "train_loss", "train_acc", "test_loss", "test_acc"):
        specs.append(ArraySpec(name, ("step",), "float64", (STEP_BLOCK,)))
    specs.append(ArraySpec("nonfinite", ("step",), "bool", (STEP_BLOCK,)))
    for name in ("m", "norm_sq_of_sum", "sum_of_norm_sq"):
        specs.append(ArraySpec(name, ("step", "sample", "layer"), "float64", (STEP_BLOCK, ns, nl)))
    if layout.param_moments:
        n_param = len(layout.params)
        specs += [ArraySpec("param", ("param",), "str", (n_param,)),
                  ArraySpec("param_layer", ("param",), "str", (n_param,))]
        for name in PARAM_MOMENTS:
            specs.append(ArraySpec(name, ("step", "sample", "param"), "float64", (STEP_BLOCK, ns, n_param)))
    specs.append(ArraySpec("loss", ("step", "example"), "float64", (_steps(n * 8), n)))
    if layout.correct == "bool":
        specs.append(ArraySpec("correct", ("step", "example"), "bool", (_steps(n), n)))
    elif layout.correct == "fraction":
        specs.append(ArraySpec("correct", ("step", "example"), "float64", (_steps(n * 8), n)))
    for name in ("sq_norm", "dot_with_sum"):
        specs.append(ArraySpec(name, ("step", "example", "layer"), "float64", (_steps(n * nl * 8), n, nl)))
    item = np.dtype(layout.dtype).itemsize
    r_coord, r_proj, r_gram = _rows(nc * item, n), _rows(nl * k * item, n), _rows(n * 8, n)
    if layout.n_coord:
        specs += [
            ArraySpec("coord", ("coord",), "int64", (nc,)),
            ArraySpec("coord_layer", ("coord",), "str", (nc,)),
            ArraySpec("coord_param", ("coord",), "str", (nc,)),
            ArraySpec("coord_index", ("coord",), "int64", (nc,)),
            ArraySpec("grad_coords", ("step", "example", "coord"), layout.dtype,
                      (1, r_coord, nc), (1, _padded(r_coord, n), nc)),
        ]
    if layout.n_proj:
        specs += [
            ArraySpec("proj", ("proj",), "int64", (k,)),
            ArraySpec("grad_proj", ("step", "example", "layer", "proj"), layout.dtype,
                      (1, r_proj, nl, k), (1, _padded(r_proj, n), nl, k)),
        ]
    if layout.gram:
        specs.append(ArraySpec("example_", ("example_",), "int64", (n,)))
        specs.append(ArraySpec("gram", ("step", "layer", "example", "example_"), "float64",
                               (1, 1, r_gram, n), (1, nl, _padded(r_gram, n), n)))
    if layout.checksums:
        digested = [s.name for s in specs if s.per_step]
        specs.append(ArraySpec(DIGESTED, (DIGESTED,), "str", (len(digested),)))
        specs.append(ArraySpec(DIGEST, ("step", DIGESTED), "uint32", (STEP_BLOCK, len(digested))))
    return {s.name: s for s in specs}


def digested_arrays(layout: RunLayout) -> tuple[str, ...]:
    """The per-step arrays whose slots ``step_crc32c`` digests, in the order of its ``stored`` axis."""
    return tuple(k for k, s in array_specs(layout).items() if s.per_step and k != DIGEST)


def every_array_name() -> frozenset[str]:
    """Every array name a run of any layout may hold (what ``overwrite`` may delete)."""
    full = RunLayout(layers=("a",), params=(("a.w", (1,), "a"),), example_ids=np.arange(1), n_train=1,
                     coord_layer=("a",), coord_param=("a.w",), coord_index=np.zeros(1, np.int64), n_proj=1,
                     projection_seed=0, gram=True, param_moments=True)
    return frozenset(array_specs(full))


def static_shape(spec: ArraySpec, layout: RunLayout) -> tuple[int, ...]:
    """Shape of ``spec`` for a run of ``layout`` with zero steps."""
    sizes = {"step": 0, "example": layout.n_example, "example_": layout.n_example,
             "layer": len(layout.layers), "sample": len(SAMPLES), "coord": layout.n_coord,
             "proj": layout.n_proj, "param": len(layout.params), DIGESTED: len(digested_arrays(layout)) if DIGESTED in spec.dims else 0}
    return tuple(sizes[d] for d in spec.dims)
