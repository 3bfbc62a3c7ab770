"""The Recorder: what a training loop calls every step; captures on a schedule and appends a step.

torch and :mod:`gradstore.capture` are imported when a Recorder is created, never at import time,
so ``import gradstore.store`` stays torch-free for the analysis side.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np

from gradstore.errors import CaptureError, StoreError
from gradstore.store.schedule import Schedule
from gradstore.store.schema import SAMPLES, RunLayout
from gradstore.store.writer import check_step_number, create_run

_METRICS = ("lr", "train_loss", "train_acc", "test_loss", "test_acc")


def sample_coords(params, layers, per_layer: int, seed: int):
    """Choose ``per_layer`` gradient coordinates of each layer uniformly without replacement.

    Parameters
    ----------
    params : sequence of (name, shape, layer)
        The model's trainable parameters in order.
    layers : sequence of str
        Layer names in order.
    per_layer : int
        Coordinates per layer (a layer with fewer values contributes all of them).
    seed : int
        Seed of the choice (numpy ``default_rng``); the same seed gives the same coordinates.

    Returns
    -------
    coord_layer, coord_param : tuple of str
    coord_index : ndarray of int64
        Flat index in the parameter; ordered by layer, then parameter, then index.
    """
    if per_layer < 0:
        raise StoreError(f"coords_per_layer must be >= 0, got {per_layer}")
    rng = np.random.default_rng(seed)
    out_layer, out_param, out_index = [], [], []
    for layer in layers:
        own = [(name, int(np.prod(shape, dtype=np.int64))) for name, shape, la in params if la == layer]
        sizes = np.array([size for _, size in own], dtype=np.int64)
        total = int(sizes.sum())
        chosen = np.sort(rng.choice(total, size=min(per_layer, total), replace=False))
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        which = np.searchsorted(starts, chosen, side="right") - 1
        for j, flat in zip(which, chosen):
            out_layer.append(layer)
            out_param.append(own[j][0])
            out_index.append(int(flat - starts[j]))
    return tuple(out_layer), tuple(out_param), np.array(out_index, dtype=np.int64)


def _cross_entropy(outputs, targets):
    import torch.nn.functional as F

    return F.cross_entropy(outputs, targets, reduction="none")


# ---------------------------------------------------------------- argument checks (before any store exists)
def _check_inputs(name: str, inputs, like=None):
    """A tensor of >= 1 examples, finite, shaped and typed like ``like`` (train_inputs) per example."""
    import torch

    if not isinstance(inputs, torch.Tensor):
        raise StoreError(f"{name} must be a torch.Tensor with the example axis first, got {type(inputs).__name__}; "
                         f"pass torch.as_tensor({name})")
    if inputs.dim() == 0 or inputs.shape[0] == 0:
        raise StoreError(f"{name} must hold at least one example (example axis first), got shape {tuple(inputs.shape)}")
    if like is not None and (inputs.shape[1:] != like.shape[1:] or inputs.dtype != like.dtype):
        raise StoreError(f"{name} has examples of shape {tuple(inputs.shape[1:])} and dtype {inputs.dtype}, "
                         f"train_inputs {tuple(like.shape[1:])} and {like.dtype}; give {name} examples like train_inputs")
    if inputs.is_floating_point() or inputs.is_complex():
        bad = ~torch.isfinite(inputs).reshape(len(inputs), -1).all(dim=1)
        if bool(bad.any()):
            rows = bad.nonzero().reshape(-1)
            raise StoreError(f"{name} holds non-finite values (NaN or inf) in {len(rows)} example(s), the first at "
                             f"row {int(rows[0])}; drop or repair those examples")
    return inputs


def _check_targets(name: str, targets, n: int, inputs_name: str, n_classes: int):
    """Class indices: a 1-d integer tensor of n values in [0, n_classes), returned as int64."""
    import torch

    if not isinstance(targets, torch.Tensor):
        raise StoreError(f"{name} must be a torch.Tensor of class indices, got {type(targets).__name__}; "
                         f"pass torch.as_tensor({name})")
    if targets.dim() != 1:
        raise StoreError(f"{name} must be 1-d, one class index per example, got shape {tuple(targets.shape)}; "
                         f"classification targets are a 1-d integer tensor")
    if targets.dtype == torch.bool or targets.is_floating_point() or targets.is_complex():
        raise StoreError(f"{name} must hold integer class indices, got {targets.dtype}; pass a 1-d integer "
                         f"tensor (e.g. {name}.long() if its values are whole class numbers)")
    if len(targets) != n:
        raise StoreError(f"{name} has {len(targets)} labels but {inputs_name} has {n} examples; "
                         "give one label per example")
    low, high = int(targets.min()), int(targets.max())
    if low < 0 or high >= n_classes:
        raise StoreError(f"{name} must lie in [0, {n_classes}) (the model outputs {n_classes} classes), "
                         f"got values from {low} to {high}; give class indices of this model")
    return targets.long()


def _check_labels(name: str, labels, n: int, n_classes: int) -> np.ndarray:
    """Clean labels (numpy or tensor): 1-d integers in [0, n_classes), or -1 where unknown."""
    import torch

    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    arr = np.asarray(labels)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise StoreError(f"{name} must be a 1-d array of integer labels, got shape {arr.shape} and dtype {arr.dtype}")
    if arr.size != n:
        raise StoreError(f"{name} has {arr.size} labels but train_inputs has {n} examples; give one per example")
    if arr.size and (int(arr.min()) < -1 or int(arr.max()) >= n_classes):
        raise StoreError(f"{name} must lie in [0, {n_classes}) (or be -1 where unknown), "
                         f"got values from {int(arr.min())} to {int(arr.max())}")
    return arr.astype(np.int64)


def _check_ids(name: str, ids, n: int, inputs_name: str) -> np.ndarray:
    """Example ids: n distinct integers (never cast from floats or strings), as int64."""
    import torch

    if ids is None:
        raise StoreError(f"{name} is missing; give one integer id per example of {inputs_name}")
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    arr = np.asarray(ids)
    if arr.dtype.kind not in "iu":
        raise StoreError(f"{name} must be integers, got dtype {arr.dtype}; give integer example ids "
                         "(float or string ids would be cast, and two examples could share one)")
    if arr.ndim != 1:
        raise StoreError(f"{name} must be 1-d, one id per example, got shape {arr.shape}")
    if arr.size != n:
        raise StoreError(f"{name} has {arr.size} ids but {inputs_name} has {n} examples; give one id per example")
    if arr.dtype.kind == "u" and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
        raise StoreError(f"{name} must fit in int64, got {int(arr.max())}")
    values, counts = np.unique(arr, return_counts=True)
    if (counts > 1).any():
        repeated = ", ".join(str(v) for v in values[counts > 1][:5])
        raise StoreError(f"{name} repeats the id(s) {repeated}; every tracked example needs an id of its own")
    return arr.astype(np.int64)


def _check_split(prefix: str, inputs, targets, ids) -> None:
    """A held-out or moments sample is given whole (inputs with targets, and ids where stored) or not at all."""
    parts = {f"{prefix}_inputs": inputs, f"{prefix}_targets": targets}
    if prefix == "test":
        parts["test_ids"] = ids
    given = [name for name, value in parts.items() if value is not None]
    if given and len(given) != len(parts):
        missing = [name for name in parts if name not in given]
        raise StoreError(f"{', '.join(given)} given without {', '.join(missing)}; give all of "
                         f"{', '.join(parts)} or none")


def _probe(model, plan_, loss_fn, inputs, autocast: str | None):
    """One forward pass of the first two train examples, model in eval mode, the run left untouched.

    Inputs the model cannot take are refused here, naming train_inputs, before any store exists.
    Returns the outputs, still attached to the graph, for :func:`_check_loss`.
    """
    import torch

    from gradstore.capture.engine import call_model
    from gradstore.capture.state import preserved_run

    device = next(model.parameters()).device
    x = inputs[:2].to(device)
    with preserved_run(model), torch.enable_grad(), autocast_forward(model, autocast):
        model.eval()
        outputs = call_model(model, x, plan_, "train_inputs", described=inputs)
    if not isinstance(outputs, torch.Tensor) or outputs.dim() != 2:
        shape = tuple(outputs.shape) if isinstance(outputs, torch.Tensor) else type(outputs).__name__
        raise CaptureError(f"the model returns {shape} for train_inputs; the Recorder needs class scores "
                           "of shape (examples, classes)")
    return outputs


def _check_loss(loss_fn, outputs, targets) -> None:
    """loss_fn on the probe's outputs: per-example losses that carry a gradient (see capture)."""
    import torch

    from gradstore.capture.engine import call_loss

    with torch.enable_grad():
        call_loss(loss_fn, outputs, targets[:len(outputs)].to(outputs.device), len(outputs), "train_targets")


class Recorder:
    """Capture per-example gradient statistics of a fixed tracked sample on a schedule.

    Use it as an observer of :func:`pipelines.train.train` (``wants(step)`` then
    ``recorder(step, model, metrics)``) or call :meth:`record` from any training loop.

    Parameters
    ----------
    target : str or path
        Run store (local path or fsspec URL); created, or resumed if it holds a matching run.
    model : torch.nn.Module
        The model being trained (its parameters define layers and coordinates).
    train_inputs, train_targets : Tensor
        Tracked training examples and their training labels (possibly corrupted).
    train_ids : array of int
        Stable ids of the tracked training examples.
    train_true : array of int, optional
        Clean labels of the tracked training examples (sets ``corrupt``).
    test_inputs, test_targets, test_ids : optional
        Tracked held-out examples (their true label is their label).
    moments_inputs, moments_targets : Tensor, optional
        A larger training sample for exact moments (``sample="moments_train"``).
    schedule : Schedule, default ``Schedule.every(100)``
    loss_fn : callable, default per-example cross entropy
        ``loss_fn(outputs, targets) -> (m,)`` losses.
    coords_per_layer : int, default 300
        Gradient coordinates stored per layer (0: none).
    coord_seed : int
        Seed of the coordinate choice.
    n_proj : int
        Random projection dimension per layer (0: none); ``projection_seed`` seeds it.
    gram : bool
        Store exact per-layer Gram blocks over all tracked examples (costs one more pass).
    dtype, compression :
        Storage options, see :class:`RunLayout`.
    config, seeds : dict, optional
        Stored as root attributes.
    overwrite, resume :
        See :func:`gradstore.store.create_run`.
    autocast : {None, "bfloat16", "float16"}
        Run the capture forward pass under ``torch.autocast`` (mixed precision on the model's device;
        CPU supports bfloat16). Per-example values carry the reduced precision of the activations;
        every sum over examples (moments, ``sum_of_norm_sq``) is accumulated in float64.
    background : bool, default True
        Write each step in a background thread while training goes on (at most one write in
        flight; the next capture waits for it). Call :meth:`close` (or use ``with``) to wait for
        the last write; a write error is raised by the next ``record``/``close``. A step becomes
        visible to readers when its write commits, exactly as with ``background=False``.

    Raises
    ------
    StoreError, CaptureError
        Before any store is created, one line naming the argument: inputs that are not finite
        tensors or that the model cannot take (checked by one forward pass of two train examples in
        eval mode, the run left untouched), targets that are not a 1-d integer tensor in
        [0, n_classes) (the width of the model's output), a ``loss_fn`` that does not return
        per-example losses carrying a gradient, ids that are not distinct integers (test ids
        included), a test or moments sample given in part, lengths that differ, or a model without
        trainable parameters.
    """

    def __init__(self, target, model, *, train_inputs, train_targets, train_ids, train_true=None,
                 test_inputs=None, test_targets=None, test_ids=None, moments_inputs=None,
                 moments_targets=None, schedule: Schedule | None = None, loss_fn=None,
                 coords_per_layer: int = 300, coord_seed: int = 0, n_proj: int = 0,
                 projection_seed: int = 0, gram: bool = False, dtype: str = "float32",
                 compression: str = "zstd", config: dict | None = None, seeds: dict | None = None,
                 overwrite: bool = False, resume: bool = True, storage_options: dict | None = None,
                 background: bool = True, autocast: str | None = None):
        from gradstore.capture import Projection, plan
        from gradstore.capture.engine import require_trainable

        if autocast not in (None, "bfloat16", "float16"):
            raise StoreError(f"autocast must be None, 'bfloat16' or 'float16', got {autocast!r}")
        self.autocast = autocast
        self.schedule = schedule if schedule is not None else Schedule.every(100)
        self.loss_fn = loss_fn or _cross_entropy
        pl = plan(model)
        require_trainable(model, pl)
        layer_of = pl.layer_of
        layers = tuple(dict.fromkeys(layer_of[name] for name in pl.params))
        params = tuple((name, tuple(p.shape), layer_of[name]) for name, p in pl.params.items())
        self._train, self._test, self._moments, ids, true_train = self._checked_samples(
            model, pl, train_inputs, train_targets, train_ids, train_true, test_inputs, test_targets, test_ids,
            moments_inputs, moments_targets)
        n_train = int(self._train[1].shape[0])
        train_label = [self._train[1].cpu().numpy()]
        true_label = [true_train if true_train is not None else train_label[0]]
        if self._test is not None:
            train_label.append(self._test[1].cpu().numpy())
            true_label.append(train_label[-1])
        coord_layer, coord_param, coord_index = sample_coords(params, layers, coords_per_layer, coord_seed)
        self.layout = RunLayout(
            layers=layers, params=params, example_ids=ids, n_train=n_train,
            true_label=np.concatenate(true_label), train_label=np.concatenate(train_label),
            coord_layer=coord_layer, coord_param=coord_param, coord_index=coord_index,
            n_proj=n_proj, projection_seed=projection_seed if n_proj else None, gram=gram,
            dtype=dtype, compression=compression)
        self._coords = {}
        for name, index in zip(coord_param, coord_index):
            self._coords.setdefault(name, []).append(int(index))
        self._projection = Projection(n_proj, seed=projection_seed) if n_proj else None
        self._layer_of = layer_of
        self.writer = create_run(target, self.layout, config=config, seeds=seeds, overwrite=overwrite,
                                 resume=resume, storage_options=storage_options)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="gradstore-writer") if background else None
        self._pending = None  # (step, Future) of the write in flight

    def _checked_samples(self, model, pl, train_inputs, train_targets, train_ids, train_true, test_inputs,
                         test_targets, test_ids, moments_inputs, moments_targets):
        """Validate every sample argument (one forward pass of two examples); return what __init__ keeps.

        Returns (train, test, moments) as (inputs, int64 targets) pairs (None where not given), the
        example ids (train then test, int64) and the clean train labels (None: the targets).
        """
        _check_split("test", test_inputs, test_targets, test_ids)
        _check_split("moments", moments_inputs, moments_targets, None)
        _check_inputs("train_inputs", train_inputs)
        n = len(train_inputs)
        outputs = _probe(model, pl, self.loss_fn, train_inputs, self.autocast)
        n_classes = int(outputs.shape[1])
        train = (train_inputs, _check_targets("train_targets", train_targets, n, "train_inputs", n_classes))
        _check_loss(self.loss_fn, outputs, train[1])
        ids = [_check_ids("train_ids", train_ids, n, "train_inputs")]
        true = None if train_true is None else _check_labels("train_true", train_true, n, n_classes)
        test = moments = None
        if test_inputs is not None:
            _check_inputs("test_inputs", test_inputs, like=train_inputs)
            m = len(test_inputs)
            test = (test_inputs, _check_targets("test_targets", test_targets, m, "test_inputs", n_classes))
            ids.append(_check_ids("test_ids", test_ids, m, "test_inputs"))
            shared = np.intersect1d(ids[0], ids[1])
            if shared.size:
                raise StoreError(f"test_ids {', '.join(str(i) for i in shared[:5])} are also train_ids; "
                                 "every tracked example needs an id of its own")
        if moments_inputs is not None:
            _check_inputs("moments_inputs", moments_inputs, like=train_inputs)
            moments = (moments_inputs, _check_targets("moments_targets", moments_targets, len(moments_inputs),
                                                      "moments_inputs", n_classes))
        return train, test, moments, np.concatenate(ids), true

    # ---------------------------------------------------------------- the training-loop side
    @property
    def committed(self) -> int:
        """Number of committed steps in the store."""
        return self.writer.committed

    def checkpoint_state(self) -> dict[str, int]:
        """What the store holds durably: ``committed`` steps and the ``last_step`` (-1: none).

        Observer protocol of :func:`pipelines.train.train` (saved in each checkpoint, after
        :meth:`flush`); call :meth:`flush` first to include the write in flight.
        """
        last = self.writer.last_step
        return {"committed": self.writer.committed, "last_step": -1 if last is None else int(last)}

    def wants(self, step: int) -> bool:
        """Whether ``step`` is scheduled and not already committed (a resumed run skips those)."""
        last = self._last_step()
        return step in self.schedule and (last is None or step > last)

    def _last_step(self):
        return self._pending[0] if self._pending is not None else self.writer.last_step

    def __call__(self, step: int, model, metrics: dict | None = None) -> None:
        """Observer protocol of :func:`pipelines.train.train`: record ``step`` if wanted."""
        if self.wants(step):
            self.record(step, model, **{k: v for k, v in (metrics or {}).items() if k in _METRICS})

    def record(self, step: int, model, *, lr=math.nan, train_loss=math.nan, train_acc=math.nan,
               test_loss=math.nan, test_acc=math.nan) -> None:
        """Capture the tracked sample now and append it as ``step`` (regardless of the schedule)."""
        step = check_step_number(step)  # before the capture, not after it
        last = self._last_step()
        if last is not None and step <= last:
            raise StoreError(f"step {step} is not after the last recorded step {last}; steps must increase")
        values = self.capture_step(model)
        self.flush()
        scalars = dict(lr=lr, train_loss=train_loss, train_acc=train_acc, test_loss=test_loss, test_acc=test_acc)
        if self._executor is None:
            self.writer.append_step(step, **scalars, **values)
        else:
            self._pending = (step, self._executor.submit(self.writer.append_step, step, **scalars, **values))

    def flush(self) -> None:
        """Wait for the write in flight (if any); re-raise its error."""
        if self._pending is not None:
            future = self._pending[1]
            self._pending = None
            future.result()

    # ---------------------------------------------------------------- the capture side
    def capture_step(self, model) -> dict[str, np.ndarray]:
        """Run the capture engine on the tracked sample; return the arrays of one step (numpy)."""
        from gradstore.capture import capture, coherence_moments

        lay = self.layout
        nl = len(lay.layers)
        parts = [self._capture_split(model, *self._train)]
        if self._test is not None:
            parts.append(self._capture_split(model, *self._test))
        out = {key: np.concatenate([p[key] for p in parts]) for key in parts[0] if key != "moments"}
        m = np.zeros((len(SAMPLES), nl))
        norm_sq_of_sum = np.zeros((len(SAMPLES), nl))
        sum_of_norm_sq = np.zeros((len(SAMPLES), nl))
        for row, part in enumerate(parts):
            m[row], norm_sq_of_sum[row], sum_of_norm_sq[row] = part["moments"]
        if self._moments is not None:
            with autocast_forward(model, self.autocast):
                mom = coherence_moments(model, self.loss_fn, *self._moments)
            nss, son = mom.norm_sq_of_sum(by="layer"), mom.sum_of_norm_sq(by="layer")
            m[2] = mom.m
            norm_sq_of_sum[2] = [nss[layer] for layer in lay.layers]
            sum_of_norm_sq[2] = [son[layer] for layer in lay.layers]
        out.update(m=m, norm_sq_of_sum=norm_sq_of_sum, sum_of_norm_sq=sum_of_norm_sq)
        if lay.gram:
            device = next(model.parameters()).device
            inputs, targets = (t.to(device) for t in self._all_tracked())
            with autocast_forward(model, self.autocast):
                res = capture(model, self.loss_fn, inputs, targets, sq_norms=False, gram=True)
            by_layer = res.by_layer("gram")
            out["gram"] = np.stack([_np(by_layer[layer]) for layer in lay.layers])
        return out

    def _capture_split(self, model, inputs, targets) -> dict:
        """Per-example arrays of one tracked sample and its moments."""
        part, grad_sum = self._split_part(model, inputs, targets)
        nss = {}
        for name, g in grad_sum.items():
            layer = self._layer_of[name]
            nss[layer] = nss.get(layer, 0.0) + float((g.double() ** 2).sum())
        part["moments"] = (part["sq_norm"].shape[0], [nss[layer] for layer in self.layout.layers],
                           part["sq_norm"].sum(axis=0))
        return part

    def _split_part(self, model, inputs, targets, vectors=None):
        """Capture ``inputs``; return the per-example arrays (numpy) and Σ g per parameter.

        ``vectors`` (parameter name -> tensor) is what ``dot_with_sum`` dots with; default the sum
        over these same examples (a distributed capture passes the sum over every rank's shard).
        """
        from gradstore.capture import capture

        lay = self.layout
        device = next(model.parameters()).device
        inputs, targets = inputs.to(device), targets.to(device)
        with autocast_forward(model, self.autocast):
            res = capture(model, self.loss_fn, inputs, targets, sq_norms=True, coords=self._coords or None,
                          projection=self._projection, dot_with="sum" if vectors is None else vectors,
                          grad_sum=vectors is None)
        self._layer_of = res.layer_of
        sq = res.by_layer("sq_norms")
        dots = res.by_layer("dots")
        part = {
            "loss": _np(res.losses),
            "correct": (res.outputs.argmax(1) == targets).cpu().numpy(),
            "sq_norm": np.stack([_np(sq[layer]) for layer in lay.layers], axis=1),
            "dot_with_sum": np.stack([_np(dots[layer]) for layer in lay.layers], axis=1),
        }
        if lay.n_coord:
            part["grad_coords"] = np.concatenate([_np(res.coords[name], lay.dtype) for name in self._coords], axis=1)
        if lay.n_proj:
            proj = {}
            for name, value in res.proj.items():
                layer = res.layer_of[name]
                proj[layer] = value if layer not in proj else proj[layer] + value
            part["grad_proj"] = np.stack([_np(proj[layer], lay.dtype) for layer in lay.layers], axis=1)
        return part, res.grad_sum

    def _all_tracked(self):
        import torch

        if self._test is None:
            return self._train
        return torch.cat([self._train[0], self._test[0]]), torch.cat([self._train[1], self._test[1]])

    def close(self) -> None:
        """Wait for the last write and release the writer thread."""
        try:
            self.flush()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
            self.writer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@contextmanager
def autocast_forward(model, dtype: str | None):
    """Run ``model``'s forward passes under ``torch.autocast(dtype)`` with float32 capture factors.

    The matrix products of the forward and backward passes run in ``dtype``; the inputs and outputs
    of every module with parameters are cast to float32 around it, so the capture engine records
    float32 activations and output gradients and forms every per-example product in float32 (the
    model output is float32 too). ``None`` does nothing. Hooks are removed on exit.
    """
    if dtype is None:
        yield model
        return
    import torch

    from gradstore.capture import plan

    device = next(model.parameters()).device.type
    contexts = []

    def up(value):
        return value.float() if isinstance(value, torch.Tensor) and value.is_floating_point() else value

    def enter(_module, _args):
        ctx = torch.autocast(device_type=device, dtype=getattr(torch, dtype))
        ctx.__enter__()
        contexts.append(ctx)

    def leave(_module, _args, output):
        contexts.pop().__exit__(None, None, None)
        return up(output)

    # registered before capture's own hooks, so those see the float32 values
    handles = [model.register_forward_pre_hook(enter), model.register_forward_hook(leave)]
    for module in plan(model).modules.values():
        handles.append(module.register_forward_pre_hook(lambda _m, args: tuple(up(a) for a in args)))
        handles.append(module.register_forward_hook(lambda _m, _a, output: up(output)))
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()
        while contexts:  # a forward that raised never reached ``leave``
            contexts.pop().__exit__(None, None, None)


def _np(tensor, dtype: str = "float64") -> np.ndarray:
    """A numpy copy on the CPU: float64 for exact statistics, the storage dtype for gradient values
    (cast by torch, much faster than numpy's float16 conversion)."""
    import torch

    return tensor.detach().to(device="cpu", dtype=getattr(torch, dtype)).numpy()
