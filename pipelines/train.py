"""Seeded, resumable training with the measurements the papers need.

Step ``t`` means "after ``t`` parameter updates" (step 0 is the initial model). At every evaluation
step the trainer records train loss and accuracy on the training labels and on the true labels,
accuracy on pristine and on corrupt examples, test loss and accuracy, and per training example the
first step at which it was classified correctly (on its training label) and the start of its current
unbroken run of correct predictions (both at evaluation resolution; -1 = never / not now).

Observers (for example a :class:`gradstore.store.Recorder`) plug in through :class:`Observer`:
the trainer evaluates wherever an observer asks to run and hands it the model and the metrics.

With ``ddp=True`` (every rank of a ``torch.distributed`` process group, as under ``gradstore run
NAME --nproc N`` or ``torchrun``) training is DistributedDataParallel: every rank draws the same
global batch from the same seeded generator and trains on its contiguous slice, so the averaged
gradient, and the run, is the one-process run's (to floating-point rounding). Rank 0 alone
evaluates, keeps the history and saves checkpoints; on resume it sends the checkpoint's state to the
other ranks. What DDP cannot train like one process is refused (:func:`check_ddp`).

Checkpoints follow the commit order "store write, then checkpoint": before a checkpoint is saved,
every observer's recorded steps are made durable (:meth:`Observer.flush`), and the checkpoint keeps
what each observer had committed then (:func:`observer_state`). A checkpoint holds tensors and
plain containers only and is loaded with ``torch.load(..., weights_only=True)``; anything else is
refused, never executed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from gradstore.errors import GradstoreError, RunFolderError
from pipelines.data import MNIST, NoisyLabels, apply_label_noise


@dataclass(frozen=True)
class TrainData:
    """Tensors for one noise level: images as float (n, 1, 28, 28) in [0, 1]."""

    x_train: torch.Tensor
    y_train: torch.Tensor  # training labels (noisy)
    y_true: torch.Tensor
    corrupt: torch.Tensor  # bool
    train_ids: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    test_ids: torch.Tensor
    noise: NoisyLabels

    @classmethod
    def from_mnist(cls, mnist: MNIST, *, noise: float, seed: int, device: str | torch.device = "cpu") -> TrainData:
        noisy = apply_label_noise(mnist.train_labels, noise, seed)

        def images(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(a.astype(np.float32) / 255.0).unsqueeze(1).to(device)

        def ints(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a)).to(device)

        return cls(
            x_train=images(mnist.train_images),
            y_train=ints(noisy.train_labels),
            y_true=ints(noisy.true_labels),
            corrupt=ints(noisy.corrupt),
            train_ids=ints(mnist.train_ids),
            x_test=images(mnist.test_images),
            y_test=ints(mnist.test_labels),
            test_ids=ints(mnist.test_ids),
            noise=noisy,
        )


def per_example_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per example (reduction='none'): the ``loss_fn`` convention of gradstore.capture."""
    return F.cross_entropy(outputs, targets, reduction="none")


def _optimizers() -> dict[str, Callable[..., torch.optim.Optimizer]]:
    from pipelines import optim

    return {
        "sgd": lambda params, lr: torch.optim.SGD(params, lr=lr),
        "winsorized-sgd": lambda params, lr, c=0: optim.WinsorizedSGD(params, lr=lr, c=c),
        "m3": lambda params, lr: optim.M3(params, lr=lr),
        "rm3": lambda params, lr: optim.RM3(params, lr=lr),
        "ra3": lambda params, lr: optim.RA3(params, lr=lr),
    }


#: optimizer name -> factory(params, lr, **TrainConfig.optimizer_options) (see pipelines.optim).
#: An optimizer with ``needs_batch = True`` computes its own gradient in ``batch_gradient``.
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = _optimizers()


@dataclass
class TrainConfig:
    """One training run. Defaults are Coherent Gradients §2: vanilla SGD, lr 0.1, batch 100."""

    model: str = "mlp-cg"
    noise: float = 0.0
    seed: int = 0
    lr: float = 0.1
    batch_size: int = 100
    steps: int = 300
    eval_every: int = 50
    optimizer: str = "sgd"
    device: str = "cpu"
    eval_batch: int = 2000
    optimizer_options: dict = field(default_factory=dict)  # e.g. {"c": 2} for winsorized-sgd
    #: evaluate (every training and test example) at each step an observer records, besides every
    #: ``eval_every`` steps and the last; False leaves a capture's metrics NaN where no evaluation falls
    evaluate_captures: bool = True

    def validate(self) -> None:
        if not 0.0 <= self.noise <= 1.0:
            raise GradstoreError(f"noise must be in [0, 1], got {self.noise}")
        for name in ("batch_size", "eval_every", "eval_batch"):
            if getattr(self, name) < 1:
                raise GradstoreError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.steps < 0:
            raise GradstoreError(f"steps must be >= 0, got {self.steps}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise GradstoreError(f"learning rate must be a positive number, got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            raise GradstoreError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(sorted(OPTIMIZERS))}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise GradstoreError("--device cuda was asked for but no CUDA device is available; use --device cpu")


class Observer(Protocol):
    """Something that watches training, e.g. a gradstore Recorder.

    Two methods are optional:

    ``flush() -> None``
        Make every step observed so far durable (a Recorder waits for its background store write
        and re-raises its error). The trainer calls it before every checkpoint, so a checkpoint is
        never ahead of what the observer recorded: a kill after the checkpoint loses no step.
    ``checkpoint_state() -> dict[str, int]``
        What is durable now, as plain ints, at least ``committed`` (steps committed; for a store
        also ``last_step``, -1 for none). Saved in the checkpoint; on resume the trainer refuses
        an observer that now holds fewer committed steps than the checkpoint recorded
        (:class:`gradstore.store.Recorder` has both).
    """

    def wants(self, step: int) -> bool:
        """Whether to be called at ``step`` (the trainer evaluates there too)."""

    def __call__(self, step: int, model: nn.Module, metrics: dict[str, float]) -> None:
        """Observe the model after ``step`` updates, with that step's evaluation metrics."""


def observer_state(observer) -> dict[str, int] | None:
    """What ``observer`` has made durable, as plain ints (None if it does not say).

    Its ``checkpoint_state()``, if it has one.
    """
    method = getattr(observer, "checkpoint_state", None)
    if not callable(method):
        return None
    return {str(key): int(value) for key, value in method().items()}


def flush_observers(observers: Sequence[Observer], step: int) -> None:
    """Make every observer's recorded steps durable (``flush()`` where offered) before a checkpoint."""
    for obs in observers:
        flush = getattr(obs, "flush", None)
        if callable(flush):
            with _recording_errors(step):
                flush()


@contextmanager
def _recording_errors(step: int):
    """Turn a file-system error of an observer's store write (a full disk) into one line."""
    try:
        yield
    except OSError as exc:
        raise RunFolderError.write_failed(f"writing the run store at step {step}", exc) from None


@dataclass
class LearnedTimes:
    """Per training example: first step classified correctly, and start of the current correct run."""

    first_learned: np.ndarray
    run_start: np.ndarray

    @classmethod
    def empty(cls, n: int) -> LearnedTimes:
        return cls(np.full(n, -1, np.int64), np.full(n, -1, np.int64))

    def update(self, step: int, correct: np.ndarray) -> None:
        self.first_learned[(self.first_learned < 0) & correct] = step
        self.run_start[~correct] = -1
        self.run_start[(self.run_start < 0) & correct] = step


@dataclass
class TrainResult:
    config: TrainConfig
    history: list[dict[str, float]] = field(default_factory=list)
    learned: LearnedTimes | None = None
    model: nn.Module | None = None
    examples: int = 0  # training examples this process trained on (its slices, under DDP)

    @property
    def final(self) -> dict[str, float]:
        return self.history[-1]


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([model(x[i : i + batch]) for i in range(0, len(x), batch)]) if len(x) else x.new_zeros(0, 10)


def evaluate(model: nn.Module, data: TrainData, *, batch: int = 2000) -> tuple[dict[str, float], np.ndarray]:
    """Metrics of the model on the noisy training set and the test set, in eval mode (mode restored).

    Returns the metrics and the per-training-example correctness on the training labels.
    """
    was_training = model.training
    model.eval()
    try:
        out_tr = _predict(model, data.x_train, batch)
        out_te = _predict(model, data.x_test, batch)
    finally:
        model.train(was_training)
    pred_tr = out_tr.argmax(1)
    correct = pred_tr == data.y_train
    corrupt = data.corrupt

    def frac(mask: torch.Tensor) -> float:
        return float(mask.float().mean()) if mask.numel() else float("nan")

    metrics = {
        "train_loss": float(per_example_loss(out_tr, data.y_train).mean()),
        "train_acc": frac(correct),
        "train_true_acc": frac(pred_tr == data.y_true),
        "pristine_acc": frac(correct[~corrupt]),
        "corrupt_acc": frac(correct[corrupt]),
        "test_loss": float(per_example_loss(out_te, data.y_test).mean()),
        "test_acc": frac(out_te.argmax(1) == data.y_test),
    }
    return metrics, correct.cpu().numpy()


#: what :func:`train` stores in a checkpoint: key -> accepted types (all load with weights_only=True)
CHECKPOINT_KEYS: dict[str, tuple[type, ...]] = {
    "config": (dict,), "model": (dict,), "optimizer": (dict,), "generator": (torch.Tensor,),
    "order": (torch.Tensor,), "cursor": (int,), "step": (int,), "history": (list,),
    "first_learned": (torch.Tensor,), "run_start": (torch.Tensor,), "observers": (list,),
}
_FIX = "remove it (--resume then replays training from step 0; committed store steps are kept) or use a new --out"


def _save_checkpoint(path: Path, state: dict) -> None:
    """Write ``state`` to ``path`` atomically and durably: a temporary file, fsync, then rename.

    The state is serialized in memory first, so a failing write is a plain ``OSError`` (torch's
    own file writer reports a full disk as an unexplained ``RuntimeError``). A killed run leaves the
    previous checkpoint or the new one; a failed write (a full disk) removes the temporary file and
    raises one line.
    """
    import io

    tmp = path.with_name(path.name + ".tmp")
    try:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        with open(tmp, "wb") as fh:
            fh.write(buffer.getbuffer())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise RunFolderError.write_failed(f"saving checkpoint {path}", exc) from None
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (where the platform allows opening a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


#: TrainConfig fields added since checkpoints were first written, with the value older runs had
_CONFIG_ADDED = {"evaluate_captures": True}


def _load_checkpoint(path: Path, device: torch.device) -> dict:
    """The checkpoint at ``path``, loaded with ``weights_only=True``; one line for anything else.

    A pickle naming other objects than tensors and plain containers is refused by torch before
    anything in it runs; a damaged or truncated file, or a file of another layout, is refused too.
    """
    if not path.is_file():
        raise RunFolderError(f"checkpoint {path} is not a file; {_FIX}")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception:  # noqa: BLE001 - unpickling refused, zip damaged or truncated: one line, never the payload
        raise RunFolderError(f"checkpoint {path} cannot be loaded safely (damaged, truncated, not written by "
                             f"gradstore, or holding more than tensors and plain values); {_FIX}") from None
    problems = [key for key, kinds in CHECKPOINT_KEYS.items()
                if not isinstance(state, dict) or not isinstance(state.get(key), kinds)]
    if problems:
        raise RunFolderError(f"checkpoint {path} is not a gradstore checkpoint of this version "
                             f"(missing or wrong: {', '.join(problems)}); {_FIX}")
    return state


def _restore(path: Path, state: dict, *, model, optimizer, gen, n: int, steps: int) -> None:
    """Load ``state`` into the model, optimizer and generator; one line if it does not fit them."""
    order, step = state["order"], state["step"]
    if (order.dim() != 1 or len(order) != n or len(state["first_learned"]) != n or len(state["run_start"]) != n
            or not 0 <= state["cursor"] <= n or not 0 <= step <= steps):
        raise RunFolderError(f"checkpoint {path} belongs to another data set or run ({len(order)} training "
                             f"examples, step {step}); {_FIX}")
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"].cpu())
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RunFolderError(f"checkpoint {path} does not fit this model or optimizer ({first}); {_FIX}") from None


def _check_observers(path: Path, recorded: list, observers: Sequence[Observer]) -> None:
    """Refuse a resume where an observer (a run store) holds fewer committed steps than at the checkpoint.

    More steps are normal (committed after the checkpoint, before a kill): training replays from the
    checkpoint and the Recorder skips what it already holds.
    """
    for then, obs in zip(recorded, observers):
        now = observer_state(obs)
        if not isinstance(then, dict) or now is None or "committed" not in now:
            continue
        had = then.get("committed", 0)
        if now["committed"] < had:
            raise RunFolderError(
                f"the run store holds {now['committed']} committed steps, but checkpoint {path} was saved when "
                f"it held {had} (up to step {then.get('last_step', '?')}): steps were lost since; put the store "
                f"back, or remove {path.name} so that --resume replays training from step 0 and records them again")


def check_ddp(config: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer, size: int) -> None:
    """Refuse (one line) a training that DistributedDataParallel over ``size`` ranks would change.

    The global batch must split evenly over the ranks; an optimizer that computes its own gradient
    from the whole batch (``needs_batch``: winsorized SGD, M3) would see one slice; BatchNorm in
    training mode normalises each rank's slice (torch's SyncBatchNorm runs on GPUs only, and capture
    has no rule for it); dropout draws each rank's masks from its own generator.
    """
    if size < 2:
        return
    if config.batch_size % size:
        fits = [k for k in range(2, size + 1) if config.batch_size % k == 0]
        raise GradstoreError(f"batch_size {config.batch_size} does not split over --nproc {size} ranks (each trains "
                             f"on an equal slice of every batch); give a batch_size divisible by {size}"
                             + (f", or --nproc {fits[-1]}" if fits else ", or --nproc 1"))
    if getattr(optimizer, "needs_batch", False):
        raise GradstoreError(f"optimizer {config.optimizer!r} computes its own gradient from the whole batch, which "
                             f"--nproc {size} would split over the ranks; run it with --nproc 1")
    from torch.nn.modules.batchnorm import _BatchNorm
    from torch.nn.modules.dropout import _DropoutNd

    for path, module in model.named_modules():
        if isinstance(module, _BatchNorm):
            raise GradstoreError(f"model {config.model!r} has BatchNorm ({path!r}), which under --nproc {size} would "
                                 "normalise each rank's slice of the batch, not the batch (torch's SyncBatchNorm "
                                 "runs on GPUs only); run it with --nproc 1")
        if isinstance(module, (_DropoutNd, nn.AlphaDropout, nn.FeatureAlphaDropout)) and module.p > 0:
            raise GradstoreError(f"model {config.model!r} has dropout ({path!r}), whose masks each rank would draw "
                                 f"from its own generator under --nproc {size}; run it with --nproc 1")


def moved(obj, device: str | torch.device = "cpu"):
    """``obj`` (a checkpoint state, a list of batches) with every tensor moved to ``device``
    (the CPU: to send it to the other ranks)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to(device)
    if isinstance(obj, dict):
        return {k: moved(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(moved(v, device) for v in obj)
    return obj


def train(
    config: TrainConfig,
    data: TrainData,
    *,
    model: nn.Module | None = None,
    observers: Sequence[Observer] = (),
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 100,
    progress: Callable[[int], None] | None = None,
    ddp: bool = False,
) -> TrainResult:
    """Train ``config.model`` on ``data`` with ``config.optimizer``; resume from ``checkpoint`` if it exists.

    Deterministic on CPU for a given seed: the model is initialised from ``seed`` (unless a freshly
    built ``model`` is given, e.g. one a Recorder already watches), minibatches come from epoch-wise
    permutations drawn from a generator seeded from ``seed``.

    ``ddp``: called on every rank of the default process group, which trains the model with
    DistributedDataParallel, each rank on its slice of every global batch (see the module
    docstring). Only rank 0 evaluates, keeps the history, saves ``checkpoint`` and calls
    ``progress``; observers are called on every rank at the same steps. ``result.examples`` counts
    the training examples this rank trained on.
    """
    from pipelines.models import build_model

    config.validate()
    device = torch.device(config.device)
    if model is None:
        model = build_model(config.model, seed=config.seed)
    model = model.to(device)
    rank, size = 0, 1
    if ddp:
        import torch.distributed as dist

        rank, size = dist.get_rank(), dist.get_world_size()
    try:
        optimizer = OPTIMIZERS[config.optimizer](model.parameters(), config.lr, **config.optimizer_options)
    except TypeError as exc:
        raise GradstoreError(f"bad optimizer_options {config.optimizer_options} for {config.optimizer!r}: {exc}") from None
    check_ddp(config, model, optimizer, size)
    gen = torch.Generator().manual_seed(config.seed + 1)
    n = len(data.x_train)
    if n == 0:
        raise GradstoreError("the training set is empty; give a data set with training examples")
    result = TrainResult(config, learned=LearnedTimes.empty(n))
    order, cursor, start = torch.randperm(n, generator=gen), 0, 0

    ckpt_path = Path(checkpoint) if checkpoint is not None and rank == 0 else None
    state = None
    if ckpt_path is not None and (ckpt_path.exists() or ckpt_path.is_symlink()):
        state = _load_checkpoint(ckpt_path, device)
        if {**_CONFIG_ADDED, **state["config"]} != asdict(config):
            raise RunFolderError(f"checkpoint {ckpt_path} belongs to another configuration; use a new --out or drop --resume")
        _restore(ckpt_path, state, model=model, optimizer=optimizer, gen=gen, n=n, steps=config.steps)
        _check_observers(ckpt_path, state["observers"], observers)
    if size > 1:  # the other ranks continue from rank 0's checkpoint (or start afresh with it)
        from gradstore.record.messages import broadcast_message

        state = broadcast_message(moved(state)) if rank == 0 else broadcast_message()
        if rank != 0 and state is not None:
            _restore(Path("(rank 0's checkpoint)"), state, model=model, optimizer=optimizer, gen=gen, n=n,
                     steps=config.steps)
    if state is not None:
        order, cursor, start = state["order"].cpu(), state["cursor"], state["step"]
        result.history = state["history"]
        result.learned = LearnedTimes(state["first_learned"].cpu().numpy().astype(np.int64),
                                      state["run_start"].cpu().numpy().astype(np.int64))
    net, share = model, config.batch_size // size
    if size > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index if device.index is not None else
                                                         torch.cuda.current_device()] if device.type == "cuda" else None)

    def observe(step: int) -> None:
        wanted = [obs for obs in observers if obs.wants(step)]
        if rank != 0:  # the other ranks capture with rank 0 (the recorder's collectives), nothing else
            for obs in wanted:
                obs(step, model, {"step": step})
            return
        scheduled = step % config.eval_every == 0 or step == config.steps
        if not (wanted or scheduled):
            return
        metrics = {"step": step, "lr": config.lr}
        if scheduled or config.evaluate_captures:
            evaluated, correct = evaluate(model, data, batch=config.eval_batch)
            result.learned.update(step, correct)
            metrics.update(evaluated)
            result.history.append(metrics)
        for obs in wanted:
            with _recording_errors(step):
                obs(step, model, metrics)

    model.train()
    if start == 0:
        observe(0)
    for step in range(start + 1, config.steps + 1):
        if cursor + config.batch_size > n:  # new epoch; drop the ragged tail
            order, cursor = torch.randperm(n, generator=gen), 0
        idx = order[cursor : cursor + config.batch_size].to(device)
        cursor += config.batch_size
        idx = idx[rank * share:(rank + 1) * share]  # this rank's slice of the global batch (all of it on one)
        result.examples += len(idx)
        optimizer.zero_grad(set_to_none=True)
        if getattr(optimizer, "needs_batch", False):  # winsorized SGD, M3: their own gradient
            optimizer.batch_gradient(model, per_example_loss, data.x_train[idx], data.y_train[idx])
        else:
            loss = per_example_loss(net(data.x_train[idx]), data.y_train[idx]).mean()
            loss.backward()  # under DDP: the mean over the ranks' slices, i.e. over the global batch
        optimizer.step()
        observe(step)
        if progress is not None and rank == 0:
            progress(step)
        if ckpt_path is not None and (step % checkpoint_every == 0 or step == config.steps):
            flush_observers(observers, step)  # store write, then checkpoint
            _save_checkpoint(
                ckpt_path,
                {
                    "config": asdict(config),
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "generator": gen.get_state(),
                    "order": order,
                    "cursor": cursor,
                    "step": step,
                    "history": result.history,
                    "first_learned": torch.from_numpy(result.learned.first_learned.copy()),
                    "run_start": torch.from_numpy(result.learned.run_start.copy()),
                    "observers": [observer_state(obs) for obs in observers],
                },
            )
    result.model = model
    return result
