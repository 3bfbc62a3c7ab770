"""The Recorder: a schedule, a run writer and a background executor around a :class:`StepCapture`.

A training loop calls :meth:`Recorder.maybe_record` every step (it captures on the schedule) or
:meth:`Recorder.record_now` to capture a step whatever the schedule says. The capture itself is a
:class:`~gradstore.record.step.StepCapture` combined through a reducer
(:mod:`gradstore.record.reduce`); the store is written by a
:class:`~gradstore.store.RunWriter` (numpy only), in a background thread by default.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext

import numpy as np
import torch

from gradstore.errors import CaptureError, StoreError
from gradstore.record.precision import autocast_forward
from gradstore.record.reduce import LocalReducer
from gradstore._nest import tensor_leaves
from gradstore.record.samples import Sample, check_ids, check_inputs, map_nest, to_device
from gradstore.record.step import MODES, StepCapture, sample_coords
from gradstore.record.tasks import Classification, resolve_task, scores_of
from gradstore.store.schedule import Schedule
from gradstore.store.schema import RunLayout
from gradstore.store.writer import check_step_number, create_run

_METRICS = ("lr", "train_loss", "train_acc", "test_loss", "test_acc")


def _check_labels(name: str, labels, n: int, n_classes: int) -> np.ndarray:
    """Clean labels (numpy or tensor): 1-d integers in [0, n_classes), or -1 where unknown."""
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


def _sample(prefix: str, inputs, targets, dataset, collate_fn, target_key, ids=None, *, ids_needed=False):
    """The Sample of one split from tensors or a Dataset (or None), refusing a split given in part."""
    if dataset is not None:
        extra = [name for name, value in ((f"{prefix}_inputs", inputs), (f"{prefix}_targets", targets))
                 if value is not None]
        if extra:
            raise StoreError(f"{prefix}_dataset given with {', '.join(extra)}; give the examples one way")
        if isinstance(dataset, Sample):
            return dataset
        if ids_needed and ids is None:
            raise StoreError(f"{prefix}_ids is missing; give one integer id per example of {prefix}_dataset")
        return Sample.from_dataset(dataset, name=prefix, collate_fn=collate_fn, target_key=target_key)
    parts = {f"{prefix}_inputs": inputs, f"{prefix}_targets": targets}
    if ids_needed:
        parts[f"{prefix}_ids"] = ids
    given = [name for name, value in parts.items() if value is not None]
    if given and len(given) != len(parts):
        missing = [name for name in parts if name not in given]
        raise StoreError(f"{', '.join(given)} given without {', '.join(missing)}; give all of "
                         f"{', '.join(parts)} or none (or {prefix}_dataset)")
    if not given:
        return None
    check_inputs(f"{prefix}_inputs", inputs)
    return Sample.from_tensors(inputs, targets, name=prefix)


def _refuse_train_mode(model) -> None:
    """Train-mode capture needs per-example gradients to exist: no BatchNorm, dropout only as nn.Dropout."""
    from torch.nn.modules.batchnorm import _BatchNorm
    from torch.nn.modules.dropout import _DropoutNd

    for path, module in model.named_modules():
        if isinstance(module, _BatchNorm):
            raise CaptureError(f"mode='train' is refused: BatchNorm {path!r} normalises each example with its "
                               "batch's statistics in train mode, which couples the examples, so per-example "
                               "gradients are not defined; use mode='eval' (with prime_batches to prime it)")
        if isinstance(module, (_DropoutNd, torch.nn.AlphaDropout, torch.nn.FeatureAlphaDropout)) \
                and type(module) is not torch.nn.Dropout:
            raise CaptureError(f"mode='train' supports nn.Dropout only (a seeded per-example mask); {path!r} is "
                               f"{type(module).__name__}: use mode='eval'")


def trained_module(model):
    """The module training updates, unwrapped: ``DistributedDataParallel.module`` and
    ``torch.compile``'s original module (capture runs the model's own forward, never a wrapper's)."""
    from torch.nn.parallel import DistributedDataParallel

    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


class _Follower:
    """What a rank other than 0 keeps of the store rank 0 writes: the committed count and the last step."""

    def __init__(self, committed: int, last_step):
        self.committed, self.last_step = committed, last_step

    def append_step(self, step: int, **_values) -> int:
        self.committed, self.last_step = self.committed + 1, step
        return self.committed

    def close(self) -> None:
        pass


def check_on_capture(hook):
    """``hook`` itself if it is None or callable; else a one-line StoreError."""
    if hook is not None and not callable(hook):
        raise StoreError(f"on_capture must be a callable on_capture(step, values), got {type(hook).__name__}")
    return hook


class Recorder:
    """Capture per-example gradient statistics of a fixed tracked sample on a schedule.

    Call :meth:`maybe_record` every training step (it captures on the schedule) or
    :meth:`record_now` to capture a step regardless of it; as an observer of
    :func:`pipelines.train.train` it is called as ``recorder(step, model, metrics)``.

    Parameters
    ----------
    target : str or path
        Run store (local path or fsspec URL); created, or resumed if it holds a matching run.
    model : torch.nn.Module
        The model being trained (its parameters define layers and coordinates).
    train_inputs, train_targets : Tensor (inputs: or a tuple or dict of tensors)
        Tracked training examples (example axis first) and their training targets.
    train_dataset : map-style Dataset, optional
        Instead of ``train_inputs``/``train_targets``: item i is ``(inputs, target)`` (or a dict,
        with ``target_key``), collated by ``collate_fn`` (default ``default_collate``). Read again
        at every capture, so it must return the same item for the same index.
    train_ids : array of int
        Stable ids of the tracked training examples.
    train_true : array of int, optional
        Clean labels of the tracked training examples (classification; sets ``corrupt``).
    test_inputs, test_targets, test_ids, test_dataset : optional
        Tracked held-out examples (their true label is their label).
    moments_inputs, moments_targets, moments_dataset : optional
        A larger training sample for exact moments (``sample="moments_train"``), streamed in
        chunks of ``moments_chunk`` examples (memory bounded by the chunk).
    collate_fn, target_key :
        How Dataset items become batches, see :meth:`gradstore.record.Sample.from_dataset`.
    task : str or gradstore.record.Task, default "classification"
        What the outputs mean: ``"classification"``, ``"sequence"``, ``"regression"``, or a task
        object (``Sequence(ignore_index=...)``, ``Regression(threshold=...)``,
        ``Custom(loss_fn, correct_fn)``). The stored label and correctness fields follow it.
    loss_fn : callable, optional
        ``loss_fn(outputs, targets) -> (m,)`` losses for a task given by name (default: the task's).
    mode : {"eval", "train"}, default "eval"
        How gradients are measured. ``"eval"`` (the papers' choice): the model in eval mode.
        ``"train"``: ``nn.Dropout`` active with a seeded per-example mask (``dropout_seed``),
        refused for models with BatchNorm (which couples the examples of a batch in train mode).
    prime_batches : sequence of inputs, optional
        BatchNorm priming (eval mode): before each capture, BatchNorm running statistics are
        recomputed from these training batches (forward passes, no update; reset and averaged
        equally when ``prime_reset``), then restored after the capture.
    schedule : Schedule, default ``Schedule.every(100)``
    coords_per_layer, coord_seed, n_proj, projection_seed, gram :
        Gradient coordinates per layer (0: none), random projections (0: none), exact Gram blocks.
    dtype, compression :
        Storage options, see :class:`gradstore.store.RunLayout`.
    config, seeds : dict, optional
        Stored as root attributes.
    overwrite, resume, storage_options :
        See :func:`gradstore.store.create_run`.
    autocast : {None, "bfloat16", "float16"}
        Capture forward under ``torch.autocast``; every sum over examples is float64.
    background : bool, default True
        Write each step in a background thread while training goes on (at most one write in
        flight). Call :meth:`close` (or use ``with``) to wait for the last write.
    reducer : optional
        How the capture is combined across processes (:mod:`gradstore.record.reduce`); default one
        process. ``ProcessGroupReducer()`` on every rank of a process group where every rank trains
        (DDP under ``torchrun``): each rank captures its shard of every sample, sums are reduced in
        float64, and rank 0 alone writes (create the Recorder and call it on every rank, at the same
        steps). :func:`gradstore.record.distributed.DistributedRecorder` passes capture workers.
    on_capture : callable, optional
        ``on_capture(step, values)`` after each capture, on rank 0, once the step's write is under
        way: ``values`` are the step's arrays as the store gets them (numpy, keyed by the schema's
        names: ``m``, ``norm_sq_of_sum``, ``sum_of_norm_sq`` by sample and layer, ``sq_norm``, ...);
        read them, do not change them (the callbacks' TensorBoard scalars use it).

    Raises
    ------
    StoreError, CaptureError
        Before any store is created, one line naming the argument (see ``docs/own-loop.md``).
    """

    def __init__(self, target, model, *, train_inputs=None, train_targets=None, train_ids=None, train_true=None,
                 test_inputs=None, test_targets=None, test_ids=None, moments_inputs=None, moments_targets=None,
                 train_dataset=None, test_dataset=None, moments_dataset=None, collate_fn=None, target_key=None,
                 task=None, loss_fn=None, mode: str = "eval", prime_batches=None, prime_reset: bool = True,
                 dropout_seed: int = 0, moments_chunk: int = 1024, schedule: Schedule | None = None,
                 coords_per_layer: int = 300, coord_seed: int = 0, n_proj: int = 0, projection_seed: int = 0,
                 gram: bool = False, dtype: str = "float32", compression: str = "zstd", config: dict | None = None,
                 seeds: dict | None = None, overwrite: bool = False, resume: bool = True,
                 storage_options: dict | None = None, background: bool = True, autocast: str | None = None,
                 reducer=None, on_capture=None):
        from gradstore.capture import plan
        from gradstore.capture.engine import require_trainable

        model = trained_module(model)
        if autocast not in (None, "bfloat16", "float16"):
            raise StoreError(f"autocast must be None, 'bfloat16' or 'float16', got {autocast!r}")
        if mode not in MODES:
            raise StoreError(f"mode must be one of {MODES}, got {mode!r}")
        if not isinstance(moments_chunk, int) or isinstance(moments_chunk, bool) or moments_chunk < 1:
            raise StoreError(f"moments_chunk must be a positive integer, got {moments_chunk!r}")
        self.task = resolve_task(task, loss_fn)
        self.schedule = schedule if schedule is not None else Schedule.every(100)
        self.autocast, self.mode = autocast, mode
        self.reducer = reducer if reducer is not None else LocalReducer()
        self.on_capture = check_on_capture(on_capture)
        pl = plan(model)
        require_trainable(model, pl)
        if mode == "train":
            _refuse_train_mode(model)
            if prime_batches is not None:
                raise StoreError("prime_batches primes BatchNorm for mode='eval'; mode='train' has no BatchNorm")
        self._prime = self._checked_priming(prime_batches)
        self._prime_reset = bool(prime_reset)
        train = _sample("train", train_inputs, train_targets, train_dataset, collate_fn, target_key)
        if train is None:
            raise StoreError("the tracked train sample is missing; give train_inputs and train_targets, or "
                             "train_dataset")
        test = _sample("test", test_inputs, test_targets, test_dataset, collate_fn, target_key, test_ids,
                       ids_needed=True)
        moments = _sample("moments", moments_inputs, moments_targets, moments_dataset, collate_fn, target_key)
        labels, ids, true_train = self._checked(model, pl, train, test, moments, train_ids, train_true, test_ids)
        layer_of = pl.layer_of
        layers = tuple(dict.fromkeys(layer_of[name] for name in pl.params))
        params = tuple((name, tuple(p.shape), layer_of[name]) for name, p in pl.params.items())
        coord_layer, coord_param, coord_index = sample_coords(params, layers, coords_per_layer, coord_seed)
        measurement = {"mode": mode, "bn_priming": None if self._prime is None else
                       {"batches": len(self._prime), "reset": self._prime_reset}}
        if mode == "train":
            measurement["dropout_seed"] = int(dropout_seed)
        n_train = len(train)
        true_label = train_label = None
        if labels is not None:
            train_label = np.concatenate(labels)
            true_label = np.concatenate([true_train if true_train is not None else labels[0], *labels[1:]])
        self.layout = RunLayout(
            layers=layers, params=params, example_ids=ids, n_train=n_train, true_label=true_label,
            train_label=train_label, coord_layer=coord_layer, coord_param=coord_param, coord_index=coord_index,
            n_proj=n_proj, projection_seed=projection_seed if n_proj else None, gram=gram, dtype=dtype,
            compression=compression, task=self.task.name, correct=self.task.correct_kind,
            task_options=self.task.describe(), measurement=measurement, param_moments=True)
        self.step_capture = StepCapture(self.layout, self.task, train, test, moments, autocast=autocast, mode=mode,
                                        dropout_seed=dropout_seed, moments_chunk=moments_chunk)
        self.writer = self._open_writer(target, model, config=config, seeds=seeds, overwrite=overwrite, resume=resume,
                                        storage_options=storage_options)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="gradstore-writer") if background else None
        self._pending = None  # (step, Future) of the write in flight
        try:
            if hasattr(self.reducer, "open"):
                self.reducer.open(self.step_capture, model)
        except BaseException:
            self.close()
            raise

    def _open_writer(self, target, model, **options):
        """Rank 0 opens the store; with several training ranks, the others learn its state (or its failure)."""
        share = getattr(self.reducer, "share", None)
        if share is not None and self.reducer.size > 1:  # every rank runs this Recorder: they agree on it first
            from gradstore.record.reduce import OPEN

            self.reducer.check_in(OPEN, None, **self.step_capture.header(model))
        if self.reducer.rank != 0:
            status, committed, last = share([0, 0, 0])
            if status:
                raise StoreError("rank 0 could not open the run store (its error says why); stopping this rank too")
            return _Follower(committed, None if last < 0 else last)
        try:
            writer = create_run(target, self.layout, **options)
        except BaseException:
            if share is not None:
                share([1, 0, 0])
            raise
        if share is not None:
            share([0, writer.committed, -1 if writer.last_step is None else int(writer.last_step)])
        return writer

    # ---------------------------------------------------------------- argument checks (before any store exists)
    @staticmethod
    def _checked_priming(batches):
        if batches is None:
            return None
        batches = list(batches)
        if not batches:
            raise StoreError("prime_batches is empty; give at least one batch of training inputs, or None")
        for i, batch in enumerate(batches):
            check_inputs(f"prime_batches[{i}]", batch)
        return batches

    def _checked(self, model, pl, train, test, moments, train_ids, train_true, test_ids):
        """Validate the samples (one forward pass of two train examples); return labels, ids, clean labels."""
        for sample in (train, test):
            if sample is not None:
                sample.check_repeatable()
        n = len(train)
        inputs, targets = train.whole()
        if train.from_data:
            check_inputs("train_dataset inputs", inputs)
        outputs = self._probe(model, pl, inputs, "train_inputs" if not train.from_data else "train_dataset inputs")
        name = "train_targets" if not train.from_data else "train_dataset targets"
        targets = self._checked_targets(name, targets, n, outputs)
        from gradstore.capture.engine import call_loss

        with torch.enable_grad():
            call_loss(self.task.loss, outputs, _rows(targets, len(_first(outputs))), len(_first(outputs)), name)
        ids = [check_ids("train_ids", train_ids, n, "train_inputs" if not train.from_data else "train_dataset")]
        first_label = self.task.labels(targets)
        labels = None if first_label is None else [first_label]
        true = None
        if train_true is not None:
            if not isinstance(self.task, Classification):
                raise StoreError(f"train_true gives clean class labels, which the {self.task.name} task does not "
                                 "have; leave it out")
            true = _check_labels("train_true", train_true, n, int(scores_of(outputs).shape[1]))
        if test is not None:
            m = len(test)
            t_inputs, t_targets = test.whole()
            where = "test_inputs" if not test.from_data else "test_dataset inputs"
            check_inputs(where, t_inputs, like=inputs)
            t_targets = self._checked_targets("test_targets" if not test.from_data else "test_dataset targets",
                                              t_targets, m, outputs)
            ids.append(check_ids("test_ids", test_ids, m, "test_inputs" if not test.from_data else "test_dataset"))
            if labels is not None:
                labels.append(self.task.labels(t_targets))
            shared = np.intersect1d(ids[0], ids[1])
            if shared.size:
                raise StoreError(f"test_ids {', '.join(str(i) for i in shared[:5])} are also train_ids; "
                                 "every tracked example needs an id of its own")
        if moments is not None:
            rows = slice(0, len(moments) if not moments.from_data else min(len(moments), 2))
            m_inputs, m_targets = moments.whole() if not moments.from_data else moments.batch(rows)
            where = "moments_inputs" if not moments.from_data else "moments_dataset inputs"
            check_inputs(where, m_inputs, like=inputs)
            self._checked_targets("moments_targets" if not moments.from_data else "moments_dataset targets",
                                  m_targets, rows.stop, outputs)
        return labels, np.concatenate(ids), true

    def _checked_targets(self, name, targets, n, outputs):
        """The task's target check; targets that are a nest of tensors are passed to the loss as they are."""
        if isinstance(targets, torch.Tensor) or not tensor_leaves(targets):
            return self.task.check_targets(name, targets, n, outputs)
        return targets

    def _probe(self, model, pl, inputs, name: str):
        """One forward pass of the first two train examples, model as measured, the run left untouched.

        Inputs the model cannot take, and outputs that do not fit the task, are refused here.
        Returns the outputs, still attached to the graph.
        """
        from gradstore.capture.engine import call_model
        from gradstore.capture.state import preserved_run

        device = next(model.parameters()).device
        x = to_device(map_nest(lambda t: t[:2], inputs), device)
        with preserved_run(model), torch.enable_grad(), autocast_forward(model, self.autocast):
            model.eval()
            outputs = call_model(model, x, pl, name, described=inputs)
        self.task.check_outputs(outputs, name)
        return outputs

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

    def maybe_record(self, step: int, model, **metrics) -> bool:
        """Capture ``step`` if the schedule wants it (and it is not already stored); return whether it did.

        Call it every training step, after the optimizer step that produced the model at ``step``
        (or before the first one, for step 0). ``metrics``: ``lr``, ``train_loss``, ``train_acc``,
        ``test_loss``, ``test_acc`` (others are ignored).
        """
        if not self.wants(step):
            return False
        self.record_now(step, model, **{k: v for k, v in metrics.items() if k in _METRICS})
        return True

    def __call__(self, step: int, model, metrics: dict | None = None) -> None:
        """Observer protocol of :func:`pipelines.train.train`: :meth:`maybe_record`."""
        self.maybe_record(step, model, **{k: v for k, v in (metrics or {}).items() if k in _METRICS})

    def record_now(self, step: int, model, *, lr=math.nan, train_loss=math.nan, train_acc=math.nan,
                   test_loss=math.nan, test_acc=math.nan) -> None:
        """Capture the tracked sample now and append it as ``step``, whatever the schedule says.

        ``step`` must be after every recorded step. The write runs in the background (see
        ``background``); its error, if any, is raised by the next call or :meth:`close`.
        """
        step = check_step_number(step)  # before the capture, not after it
        last = self._last_step()
        if last is not None and step <= last:
            raise StoreError(f"step {step} is not after the last recorded step {last}; steps must increase")
        values = self.capture_step(model, step) or {}  # {} on a rank other than 0: rank 0 writes
        self.flush()
        scalars = dict(lr=lr, train_loss=train_loss, train_acc=train_acc, test_loss=test_loss, test_acc=test_acc)
        if self._executor is None:
            self.writer.append_step(step, **scalars, **values)
        else:
            self._pending = (step, self._executor.submit(self.writer.append_step, step, **scalars, **values))
        if values and self.on_capture is not None:
            self.on_capture(step, values)

    #: the unscheduled call under its earlier name (kept for existing loops): :meth:`record_now`
    record = record_now

    def capture_step(self, model, step: int = 0) -> dict[str, np.ndarray]:
        """The arrays of one step (numpy, keyed by the schema's names), primed as configured; nothing written.

        Collective when the reducer spans several processes; None on ranks other than 0."""
        from gradstore.capture import bn_priming

        model = trained_module(model)
        priming = (bn_priming(model, self._prime, reset=self._prime_reset) if self._prime is not None
                   else nullcontext())
        with priming:
            if hasattr(self.reducer, "sync"):
                self.reducer.sync(model, step)
            return self.step_capture(model, self.reducer, step)

    def flush(self) -> None:
        """Wait for the write in flight (if any); re-raise its error."""
        if self._pending is not None:
            future = self._pending[1]
            self._pending = None
            future.result()

    def close(self) -> None:
        """Wait for the last write and release the writer thread (and any capture workers)."""
        try:
            self.flush()
        finally:
            try:
                if self._executor is not None:
                    self._executor.shutdown(wait=True)
                self.writer.close()
            finally:
                if hasattr(self.reducer, "close"):
                    self.reducer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _first(outputs):
    """The tensor whose rows are the examples of a model output (a tensor, ``.logits`` or the first item)."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    if hasattr(outputs, "logits"):
        return outputs.logits
    return tensor_leaves(outputs)[0]


def _rows(targets, n: int):
    return map_nest(lambda t: t[:n], targets) if not isinstance(targets, torch.Tensor) else targets[:n]
