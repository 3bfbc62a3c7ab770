"""The Recorder: what a training loop calls every step; captures on a schedule and appends a step.

torch and :mod:`gradstore.capture` are imported when a Recorder is created, never at import time,
so ``import gradstore.store`` stays torch-free for the analysis side.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np

from gradstore.errors import StoreError
from gradstore.store.schedule import Schedule
from gradstore.store.schema import SAMPLES, RunLayout
from gradstore.store.writer import create_run

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
    """

    def __init__(self, target, model, *, train_inputs, train_targets, train_ids, train_true=None,
                 test_inputs=None, test_targets=None, test_ids=None, moments_inputs=None,
                 moments_targets=None, schedule: Schedule | None = None, loss_fn=None,
                 coords_per_layer: int = 300, coord_seed: int = 0, n_proj: int = 0,
                 projection_seed: int = 0, gram: bool = False, dtype: str = "float32",
                 compression: str = "zstd", config: dict | None = None, seeds: dict | None = None,
                 overwrite: bool = False, resume: bool = True, storage_options: dict | None = None,
                 background: bool = True, autocast: str | None = None):
        import torch

        from gradstore.capture import Projection, plan

        if autocast not in (None, "bfloat16", "float16"):
            raise StoreError(f"autocast must be None, 'bfloat16' or 'float16', got {autocast!r}")
        self.autocast = autocast
        self.schedule = schedule if schedule is not None else Schedule.every(100)
        self.loss_fn = loss_fn or _cross_entropy
        pl = plan(model)
        layer_of = pl.layer_of
        layers = tuple(dict.fromkeys(layer_of[name] for name in pl.params))
        params = tuple((name, tuple(p.shape), layer_of[name]) for name, p in pl.params.items())
        self._train = (train_inputs, torch.as_tensor(train_targets))
        n_train = int(self._train[1].shape[0])
        self._test = None
        if test_inputs is not None:
            self._test = (test_inputs, torch.as_tensor(test_targets))
        self._moments = None if moments_inputs is None else (moments_inputs, torch.as_tensor(moments_targets))
        ids = [np.asarray(train_ids, dtype=np.int64).reshape(-1)]
        train_label = [self._train[1].cpu().numpy()]
        true_label = [np.asarray(train_true if train_true is not None else train_label[0]).reshape(-1)]
        if self._test is not None:
            ids.append(np.asarray(test_ids, dtype=np.int64).reshape(-1))
            train_label.append(self._test[1].cpu().numpy())
            true_label.append(train_label[-1])
        coord_layer, coord_param, coord_index = sample_coords(params, layers, coords_per_layer, coord_seed)
        self.layout = RunLayout(
            layers=layers, params=params, example_ids=np.concatenate(ids), n_train=n_train,
            true_label=np.concatenate(true_label), train_label=np.concatenate(train_label),
            coord_layer=coord_layer, coord_param=coord_param, coord_index=coord_index,
            n_proj=n_proj, projection_seed=projection_seed if n_proj else None, gram=gram,
            dtype=dtype, compression=compression)
        if self.layout.example_ids.size != self.layout.train_label.size:
            raise StoreError("example ids and targets differ in length; give one id per tracked example")
        self._coords = {}
        for name, index in zip(coord_param, coord_index):
            self._coords.setdefault(name, []).append(int(index))
        self._projection = Projection(n_proj, seed=projection_seed) if n_proj else None
        self._layer_of = layer_of
        self.writer = create_run(target, self.layout, config=config, seeds=seeds, overwrite=overwrite,
                                 resume=resume, storage_options=storage_options)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="gradstore-writer") if background else None
        self._pending = None  # (step, Future) of the write in flight

    # ---------------------------------------------------------------- the training-loop side
    @property
    def committed(self) -> int:
        """Number of committed steps in the store."""
        return self.writer.committed

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
        step = int(step)
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
