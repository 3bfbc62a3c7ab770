"""What the model's outputs and the loss mean: the task of a recorded run (an extension point).

A task turns ``(outputs, targets)`` into per-example losses and (optionally) per-example
correctness, checks that the outputs and targets fit it, and says which labels the store keeps.
The stored fields follow the task (``docs/store-format.md``, "Tasks"):

============== ============================== ============================ ======================
task           loss (per example)             ``correct``                  ``train_label``
============== ============================== ============================ ======================
classification cross entropy (or ``loss_fn``) bool: argmax == target       the class index
sequence       mean token cross entropy over  float64: token accuracy over -1 (no class)
               the non-padding tokens         the non-padding tokens
regression     mean squared error (or         bool ``|out - y| <= threshold`` -1 (no class)
               ``loss_fn``)                   everywhere; absent without one
custom         ``loss_fn``                    ``correct_fn``'s bool or     -1 (no class)
                                              fraction; absent without one
============== ============================== ============================ ======================

Add a task with one file: subclass :class:`Task` and decorate it with :func:`register_task`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gradstore.errors import CaptureError, StoreError

#: name -> Task subclass (:func:`register_task`)
TASKS: dict[str, type] = {}

#: what ``correct`` holds: a bool per example, or a fraction in [0, 1] (float64); None: not stored
CORRECT_KINDS = ("bool", "fraction")


def register_task(cls):
    """Class decorator: make ``cls`` (a :class:`Task` subclass with a unique ``name``) selectable by name."""
    if cls.name in TASKS:
        raise StoreError(f"a task named {cls.name!r} is already registered ({TASKS[cls.name].__name__})")
    TASKS[cls.name] = cls
    return cls


def resolve_task(task, loss_fn=None) -> Task:
    """A :class:`Task` from a Task, a registered name or None (classification); ``loss_fn`` overrides its loss."""
    if isinstance(task, Task):
        if loss_fn is not None:
            raise StoreError("give loss_fn to the task (e.g. Classification(loss_fn=...)), not both to the "
                             "Recorder and a task object")
        return task
    name = "classification" if task is None else task
    if name not in TASKS:
        raise StoreError(f"unknown task {task!r}; use one of {', '.join(sorted(TASKS))} or a gradstore.record.Task")
    if name == "custom":
        if loss_fn is None:
            raise StoreError("task='custom' needs loss_fn(outputs, targets) -> per-example losses")
        return TASKS[name](loss_fn)
    return TASKS[name](loss_fn=loss_fn)


def _shape(value) -> str:
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__


class Task:
    """The meaning of a model's outputs: per-example loss, correctness and stored labels.

    Subclasses set ``name`` and ``correct_kind`` (one of :data:`CORRECT_KINDS` or None) and
    implement :meth:`loss`; the checks and :meth:`correct` have defaults that accept anything
    and store no correctness.
    """

    name = ""
    correct_kind: str | None = None

    def loss(self, outputs, targets):
        """Per-example losses of shape (m,), carrying a gradient."""
        raise NotImplementedError

    def correct(self, outputs, targets):
        """Per-example correctness (bool, or float64 in [0, 1]) of shape (m,); None when not stored."""
        return None

    def check_outputs(self, outputs, name: str) -> None:
        """Refuse, in one line, model outputs on ``name`` that do not fit the task."""

    def check_targets(self, name: str, targets, n: int, outputs):
        """Refuse, in one line, targets that do not fit the task; return them as the loss takes them."""
        return targets

    def convert(self, targets):
        """Targets of a batch as the loss takes them (after :meth:`check_targets` accepted their kind)."""
        return targets

    def labels(self, targets):
        """The stored ``train_label`` of each example (int64 numpy), or None: -1, no class."""
        return None

    def describe(self) -> dict:
        """JSON options of the task, stored in the root attribute ``task_options``."""
        return {}

    def __call__(self, outputs, targets):  # the engine's loss_fn(outputs, targets)
        return self.loss(outputs, targets)


def scores_of(outputs):
    """The score tensor of a model output: the tensor itself, or its ``.logits`` (Hugging Face outputs)."""
    return outputs if isinstance(outputs, torch.Tensor) else getattr(outputs, "logits", outputs)


def _integer_tensor(name: str, targets, what: str):
    if not isinstance(targets, torch.Tensor):
        raise StoreError(f"{name} must be a torch.Tensor of {what}, got {type(targets).__name__}; "
                         f"pass torch.as_tensor({name})")
    if targets.dtype == torch.bool or targets.is_floating_point() or targets.is_complex():
        raise StoreError(f"{name} must hold integer {what}, got {targets.dtype}; pass an integer tensor "
                         f"(e.g. {name}.long() if its values are whole numbers)")


def _per_example_cross_entropy(outputs, targets):
    return F.cross_entropy(outputs, targets, reduction="none")


@register_task
class Classification(Task):
    """One class per example: ``outputs`` (examples, classes) (or an output with such ``.logits``),
    ``targets`` 1-d class indices.

    Parameters
    ----------
    loss_fn : callable, optional
        ``loss_fn(outputs, targets) -> (m,)``; default per-example cross entropy.
    """

    name = "classification"
    correct_kind = "bool"

    def __init__(self, loss_fn=None):
        self.loss_fn = loss_fn or _per_example_cross_entropy

    def loss(self, outputs, targets):
        return self.loss_fn(outputs if self.loss_fn is not _per_example_cross_entropy else scores_of(outputs), targets)

    def correct(self, outputs, targets):
        return scores_of(outputs).argmax(1) == targets

    def check_outputs(self, outputs, name: str) -> None:
        outputs = scores_of(outputs)
        if not isinstance(outputs, torch.Tensor) or outputs.dim() != 2:
            raise CaptureError(f"the model returns {_shape(outputs)} for {name}; the classification task needs "
                               "class scores of shape (examples, classes) (task='sequence' for per-token "
                               "scores, 'regression' or 'custom' otherwise)")

    def check_targets(self, name: str, targets, n: int, outputs):
        n_classes = int(scores_of(outputs).shape[1])
        _integer_tensor(name, targets, "class indices")
        if targets.dim() != 1:
            raise StoreError(f"{name} must be 1-d, one class index per example, got shape {tuple(targets.shape)}; "
                             f"classification targets are a 1-d integer tensor (task='sequence' for token targets)")
        if len(targets) != n:
            raise StoreError(f"{name} has {len(targets)} labels but its inputs have {n} examples; "
                             "give one label per example")
        low, high = int(targets.min()), int(targets.max())
        if low < 0 or high >= n_classes:
            raise StoreError(f"{name} must lie in [0, {n_classes}) (the model outputs {n_classes} classes), "
                             f"got values from {low} to {high}; give class indices of this model")
        return targets.long()

    def convert(self, targets):
        return targets.long() if isinstance(targets, torch.Tensor) else targets

    def labels(self, targets):
        return targets.detach().cpu().numpy()


@register_task
class Sequence(Task):
    """Sequence / language modelling: per-token scores, per-sequence losses.

    ``outputs`` are scores of shape (examples, positions, vocabulary) (or an object with a
    ``logits`` attribute of that shape, as Hugging Face models return); ``targets`` (examples,
    positions) hold the token each position predicts (shift them yourself for next-token
    prediction) and ``ignore_index`` where a position does not count (padding). An example's loss
    is the mean cross entropy over its counted tokens; its ``correct`` is the fraction of those
    tokens whose highest score is the target (token accuracy). Every sequence needs at least one
    counted token.

    Parameters
    ----------
    ignore_index : int, default -100
        Target value of positions that do not count (the value torch and Hugging Face use).
    loss_fn : callable, optional
        Per-token losses ``loss_fn(scores (N, V), targets (N,)) -> (N,)``; default cross entropy.
        Positions at ``ignore_index`` are left out of the mean whatever it returns there.
    """

    name = "sequence"
    correct_kind = "fraction"

    def __init__(self, ignore_index: int = -100, loss_fn=None):
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise StoreError(f"ignore_index must be an integer, got {ignore_index!r}")
        self.ignore_index = ignore_index
        self.loss_fn = loss_fn

    @staticmethod
    def scores(outputs):
        """The (examples, positions, vocabulary) scores of ``outputs`` (a tensor or ``.logits``)."""
        return scores_of(outputs)

    def loss(self, outputs, targets):
        scores = self.scores(outputs)
        m, t, v = scores.shape
        keep = targets != self.ignore_index
        flat = targets.reshape(-1).where(keep.reshape(-1), 0)  # any index: masked out below
        if self.loss_fn is None:
            per_token = F.cross_entropy(scores.reshape(m * t, v), flat, reduction="none")
        else:
            per_token = self.loss_fn(scores.reshape(m * t, v), flat)
        per_token = per_token.reshape(m, t) * keep
        return per_token.sum(1) / keep.sum(1).to(per_token.dtype)

    def correct(self, outputs, targets):
        keep = targets != self.ignore_index
        hits = (self.scores(outputs).argmax(-1) == targets) & keep
        return hits.sum(1).double() / keep.sum(1).double()

    def check_outputs(self, outputs, name: str) -> None:
        scores = self.scores(outputs)
        if not isinstance(scores, torch.Tensor) or scores.dim() != 3:
            raise CaptureError(f"the model returns {_shape(scores)} for {name}; the sequence task needs token "
                               "scores of shape (examples, positions, vocabulary), or an output with such .logits")

    def check_targets(self, name: str, targets, n: int, outputs):
        scores = self.scores(outputs)
        _integer_tensor(name, targets, "token ids")
        if targets.dim() != 2 or len(targets) != n:
            raise StoreError(f"{name} must have shape (examples, positions) = ({n}, T), got {tuple(targets.shape)}; "
                             "give the token each position predicts, ignore_index at padding")
        if targets.shape[1] != scores.shape[1]:
            raise StoreError(f"{name} has {targets.shape[1]} positions but the model scores {scores.shape[1]}; "
                             "give one target per scored position (ignore_index where it does not count)")
        vocab = int(scores.shape[2])
        keep = targets != self.ignore_index
        empty = (~keep.any(1)).nonzero().reshape(-1)
        if empty.numel():
            raise StoreError(f"{name} row {int(empty[0])} has no counted token (every target is ignore_index "
                             f"{self.ignore_index}), so its loss is undefined; drop that sequence")
        counted = targets[keep]
        low, high = int(counted.min()), int(counted.max())
        if low < 0 or high >= vocab:
            raise StoreError(f"{name} must lie in [0, {vocab}) (the model scores {vocab} tokens) or equal "
                             f"ignore_index {self.ignore_index}, got values from {low} to {high}")
        return targets.long()

    def convert(self, targets):
        return targets.long() if isinstance(targets, torch.Tensor) else targets

    def describe(self) -> dict:
        return {"ignore_index": self.ignore_index, "loss": "mean over counted tokens",
                "correct": "token accuracy over counted tokens"}


def _mean_squared_error(outputs, targets):
    return ((outputs - targets) ** 2).reshape(len(outputs), -1).mean(1)


@register_task
class Regression(Task):
    """Real-valued targets shaped like the outputs; no classes.

    Parameters
    ----------
    loss_fn : callable, optional
        Default: per-example mean squared error over the output's values.
    threshold : float, optional
        Store ``correct`` as ``|outputs - targets| <= threshold`` at every output value; without
        one, ``correct`` is not stored.
    """

    name = "regression"

    def __init__(self, loss_fn=None, threshold: float | None = None):
        if threshold is not None and (isinstance(threshold, bool) or not float(threshold) >= 0):
            raise StoreError(f"threshold must be a number >= 0, got {threshold!r}")
        self.loss_fn = loss_fn or _mean_squared_error
        self.threshold = None if threshold is None else float(threshold)
        self.correct_kind = None if threshold is None else "bool"

    def loss(self, outputs, targets):
        return self.loss_fn(outputs, targets)

    def correct(self, outputs, targets):
        if self.threshold is None:
            return None
        return ((outputs - targets).abs() <= self.threshold).reshape(len(outputs), -1).all(1)

    def check_outputs(self, outputs, name: str) -> None:
        if not isinstance(outputs, torch.Tensor) or outputs.dim() == 0 or not outputs.is_floating_point():
            raise CaptureError(f"the model returns {_shape(outputs)} for {name}; the regression task needs a "
                               "floating-point tensor with the example axis first")

    def check_targets(self, name: str, targets, n: int, outputs):
        if not isinstance(targets, torch.Tensor) or not targets.is_floating_point():
            got = targets.dtype if isinstance(targets, torch.Tensor) else type(targets).__name__
            raise StoreError(f"{name} must be a floating-point torch.Tensor for regression, got {got}")
        if len(targets) != n or tuple(targets.shape[1:]) != tuple(outputs.shape[1:]):
            raise StoreError(f"{name} has shape {tuple(targets.shape)}; regression targets need the model's "
                             f"output shape per example, ({n}, {', '.join(str(s) for s in outputs.shape[1:])})")
        bad = ~torch.isfinite(targets).reshape(n, -1).all(1)
        if bool(bad.any()):
            raise StoreError(f"{name} holds non-finite values, the first at row {int(bad.nonzero()[0])}")
        return targets.to(outputs.dtype)

    def describe(self) -> dict:
        return {"threshold": self.threshold}


@register_task
class Custom(Task):
    """Any model: a ``loss_fn`` and an optional correctness function.

    Parameters
    ----------
    loss_fn : callable
        ``loss_fn(outputs, targets) -> (m,)`` per-example losses carrying a gradient.
    correct_fn : callable, optional
        ``correct_fn(outputs, targets) -> (m,)`` per-example correctness: bools
        (``correct="bool"``) or fractions in [0, 1] (``correct="fraction"``). Not stored without one.
    correct : {"bool", "fraction"}
    """

    name = "custom"

    def __init__(self, loss_fn, correct_fn=None, correct: str = "bool"):
        if not callable(loss_fn):
            raise StoreError("the custom task needs loss_fn(outputs, targets) -> per-example losses")
        if correct not in CORRECT_KINDS:
            raise StoreError(f"correct must be one of {CORRECT_KINDS}, got {correct!r}")
        self.loss_fn, self.correct_fn = loss_fn, correct_fn
        self.correct_kind = None if correct_fn is None else correct

    def loss(self, outputs, targets):
        return self.loss_fn(outputs, targets)

    def correct(self, outputs, targets):
        if self.correct_fn is None:
            return None
        value = self.correct_fn(outputs, targets)
        if not isinstance(value, torch.Tensor) or value.dim() != 1:
            raise CaptureError(f"correct_fn must return a 1-d tensor, one value per example, got {_shape(value)}")
        if self.correct_kind == "bool" and value.dtype != torch.bool:
            raise CaptureError(f"correct_fn must return bools (correct='bool'), got {value.dtype}; or pass "
                               "correct='fraction' for values in [0, 1]")
        if self.correct_kind == "fraction":
            value = value.double()
            if value.numel() and not bool(((value >= 0) & (value <= 1)).all()):
                raise CaptureError("correct_fn returned values outside [0, 1]; correct='fraction' stores "
                                   "fractions")
        return value

    def describe(self) -> dict:
        return {"correct": self.correct_kind}
