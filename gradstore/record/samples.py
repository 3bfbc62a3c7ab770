"""The examples a Recorder captures: from tensors or from a map-style Dataset, batched on demand.

A :class:`Sample` holds n examples and hands out ``(inputs, targets)`` batches of any rows.
Inputs may be a tensor, a tuple/list of tensors (unpacked into ``model(*inputs)``) or a dict of
tensors (passed as the capture engine passes dicts); every tensor has the example axis first. A
Dataset sample reads and collates only the rows asked for, so streaming moments over a large
Dataset holds one chunk at a time.
"""

from __future__ import annotations

import numpy as np
import torch

from gradstore._nest import tensor_leaves
from gradstore.errors import StoreError




def map_nest(fn, nest):
    """``nest`` with ``fn`` applied to every tensor (other values kept)."""
    if isinstance(nest, torch.Tensor):
        return fn(nest)
    if isinstance(nest, (tuple, list)):
        return type(nest)(map_nest(fn, item) for item in nest)
    if isinstance(nest, dict):
        return {key: map_nest(fn, value) for key, value in nest.items()}
    return nest


def cat_nests(nests: list):
    """Concatenate nests of the same structure along the example axis."""
    first = nests[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(nests)
    if isinstance(first, (tuple, list)):
        return type(first)(cat_nests([n[i] for n in nests]) for i in range(len(first)))
    if isinstance(first, dict):
        return {key: cat_nests([n[key] for n in nests]) for key in first}
    return first


def to_device(nest, device):
    return map_nest(lambda t: t.to(device), nest)


def structure(nest) -> str:
    """A description of a nest's structure and per-example shapes and dtypes (for comparisons)."""
    if isinstance(nest, torch.Tensor):
        return f"{tuple(nest.shape[1:])} {nest.dtype}"
    if isinstance(nest, (tuple, list)):
        return f"({', '.join(structure(i) for i in nest)})"  # a tuple or a list: both are unpacked
    if isinstance(nest, dict):
        return "{" + ", ".join(f"{k}: {structure(v)}" for k, v in nest.items()) + "}"
    return type(nest).__name__


def check_inputs(name: str, inputs, like=None) -> int:
    """Inputs of >= 1 examples (every tensor with the same number of rows), finite, shaped like ``like``.

    Returns the number of examples.
    """
    tensors = tensor_leaves(inputs)
    if not tensors or not isinstance(inputs, (torch.Tensor, tuple, list, dict)):
        raise StoreError(f"{name} must be a torch.Tensor with the example axis first (or a tuple or dict of them), "
                         f"got {type(inputs).__name__}; pass torch.as_tensor({name})")
    if tensors[0].dim() == 0 or tensors[0].shape[0] == 0:
        raise StoreError(f"{name} must hold at least one example (example axis first), got shape "
                         f"{tuple(tensors[0].shape)}")
    n = int(tensors[0].shape[0])
    for t in tensors[1:]:
        if t.dim() == 0 or t.shape[0] != n:
            raise StoreError(f"every tensor of {name} needs {n} rows (example axis first), got shape {tuple(t.shape)}")
    if like is not None and structure(inputs) != structure(like):
        if isinstance(inputs, torch.Tensor) and isinstance(like, torch.Tensor):
            raise StoreError(f"{name} has examples of shape {tuple(inputs.shape[1:])} and dtype {inputs.dtype}, "
                             f"train_inputs {tuple(like.shape[1:])} and {like.dtype}; give {name} examples like "
                             "train_inputs")
        raise StoreError(f"{name} has examples {structure(inputs)}, the train sample {structure(like)}; give "
                         f"{name} examples like the train sample")
    for t in tensors:
        if t.is_floating_point() or t.is_complex():
            bad = ~torch.isfinite(t).reshape(n, -1).all(dim=1)
            if bool(bad.any()):
                rows = bad.nonzero().reshape(-1)
                raise StoreError(f"{name} holds non-finite values (NaN or inf) in {len(rows)} example(s), the "
                                 f"first at row {int(rows[0])}; drop or repair those examples")
    return n


def _rows(nest, rows):
    return map_nest(lambda t: t[rows], nest)


class Sample:
    """n examples, batched on demand as ``(inputs, targets)``; build one with :meth:`from_tensors`
    or :meth:`from_dataset`.

    Attributes
    ----------
    name : str
        What the Recorder calls it in messages (``train``, ``test``, ``moments``).
    """

    def __init__(self, name: str, n: int, *, tensors=None, dataset=None, collate_fn=None, target_key=None):
        self.name, self.n = name, int(n)
        self._tensors, self._dataset = tensors, dataset
        self._collate, self._target_key = collate_fn, target_key

    @classmethod
    def from_tensors(cls, inputs, targets, *, name: str = "train") -> Sample:
        """Examples held as tensors: ``inputs`` (tensor, tuple or dict of tensors) and ``targets``."""
        n = check_inputs(f"{name}_inputs", inputs)
        return cls(name, n, tensors=(inputs, targets))

    @classmethod
    def from_dataset(cls, dataset, *, name: str = "train", collate_fn=None, target_key: str | None = None) -> Sample:
        """Examples of a map-style Dataset (``len`` and ``dataset[i]``), collated per batch.

        Parameters
        ----------
        dataset : map-style Dataset
            Item i is ``(inputs, target)`` or, with ``target_key``, a dict whose ``target_key``
            entry is the target and the rest the inputs. It must return the same item for the same
            index (no random augmentation): the tracked examples are fixed.
        collate_fn : callable, optional
            Turns a list of items into a batch of the same form, as a DataLoader's ``collate_fn``;
            default ``torch.utils.data.default_collate``.
        target_key : str, optional
            The target's key in dict items.
        """
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise StoreError(f"{name}_dataset must be a map-style Dataset (len(ds) and ds[i]), got "
                             f"{type(dataset).__name__}; an IterableDataset has no fixed examples to track")
        n = len(dataset)
        if n == 0:
            raise StoreError(f"{name}_dataset is empty; it must hold at least one example")
        return cls(name, n, dataset=dataset, collate_fn=collate_fn, target_key=target_key)

    @property
    def from_data(self) -> bool:
        return self._dataset is not None

    def __len__(self) -> int:
        return self.n

    def batch(self, rows: slice):
        """``(inputs, targets)`` of ``rows`` (a slice), on the CPU for a Dataset."""
        if self._tensors is not None:
            inputs, targets = self._tensors
            return _rows(inputs, rows), (targets[rows] if isinstance(targets, torch.Tensor) else targets)
        return self._collated(range(self.n)[rows])

    def whole(self):
        """``(inputs, targets)`` of every example, as given (tensors) or collated (a Dataset)."""
        return self._tensors if self._tensors is not None else self._collated(range(self.n))

    def chunks(self, rows: slice, size: int):
        """Batches of at most ``size`` examples covering ``rows``."""
        for start in range(rows.start, rows.stop, size):
            yield self.batch(slice(start, min(rows.stop, start + size)))

    def _collated(self, indices):
        from torch.utils.data import default_collate

        items = [self._dataset[i] for i in indices]
        try:
            batch = (self._collate or default_collate)(items)
        except (TypeError, RuntimeError, ValueError) as err:
            text = str(err).strip().splitlines()
            raise StoreError(f"{self.name}_dataset items {indices[0]}..{indices[-1]} cannot be collated into a "
                             f"batch ({type(err).__name__}: {text[0] if text else ''}); give items of one shape "
                             "or a collate_fn") from None
        return self._split(batch)

    def _split(self, batch):
        key = self._target_key
        if key is not None:
            if not isinstance(batch, dict) or key not in batch:
                got = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
                raise StoreError(f"{self.name}_dataset batches must be dicts with the target under {key!r}, got "
                                 f"{got}; give target_key the key of the target")
            return {k: v for k, v in batch.items() if k != key}, batch[key]
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            return batch[0], batch[1]
        what = f"a dict with keys {sorted(batch)}" if isinstance(batch, dict) else (
            f"a {type(batch).__name__} of {len(batch)}" if isinstance(batch, (tuple, list)) else type(batch).__name__)
        raise StoreError(f"{self.name}_dataset items must be (inputs, target) pairs, got {what}; return "
                         "(inputs, target) from __getitem__, or give target_key for dict items")

    def cpu(self) -> Sample:
        """The same sample with its tensors on the CPU (what is shipped to capture workers)."""
        if self._tensors is None:
            return self
        inputs, targets = self._tensors
        return Sample(self.name, self.n, tensors=(map_nest(lambda t: t.detach().cpu(), inputs),
                                                  map_nest(lambda t: t.detach().cpu(), targets)))

    def check_repeatable(self) -> None:
        """Refuse a Dataset that returns different values for the same index (random augmentation)."""
        if self._dataset is None:
            return
        one, two = self._collated([0]), self._collated([0])
        same = all(torch.equal(a, b) for a, b in zip(tensor_leaves(one), tensor_leaves(two)))
        if not same:
            raise StoreError(f"{self.name}_dataset returns different values for index 0 on two reads (random "
                             "augmentation?); tracked examples must be fixed: give a Dataset without random "
                             "transforms")


def check_ids(name: str, ids, n: int, inputs_name: str) -> np.ndarray:
    """Example ids: n distinct integers (never cast from floats or strings), as int64."""
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
