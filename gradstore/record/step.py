"""One captured step: the tracked samples and the moments sample through the capture engine.

:class:`StepCapture` returns the typed numpy arrays of one step keyed by the store schema's names
(``gradstore.store.schema``; exactly what :meth:`gradstore.store.RunWriter.append_step` takes). It
captures the rows a reducer (:mod:`gradstore.record.reduce`) gives this process and sums through
it, so one process and a process group run the same code:

- Σ g over a tracked sample is reduced in float64 *before* the per-example pass when there are
  several processes, so ``dot_with_sum`` dots with the sum over the whole sample (one process gets
  it from the same pass);
- the moments (m, Σ g, Σ ||g||²) are sums, reduced in float64; per layer, and per parameter when the
  layout stores them (``param_norm_sq_of_sum``, ``param_sum_of_norm_sq``: the same sums before they
  are added over a layer's parameters);
- the per-example arrays are gathered to rank 0, which alone gets the step's arrays;
- Gram blocks need every pair of examples, so rank 0 computes them over the whole tracked sample.

A StepCapture holds no model and no torch state beyond its samples: it is pickled to capture
workers as it is.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager

import numpy as np
import torch

from gradstore.record.precision import autocast_forward
from gradstore.record.samples import cat_nests, to_device
from gradstore.store.schema import SAMPLES, RunLayout

#: the measurement modes (``docs/store-format.md``, "Measurement")
MODES = ("eval", "train")

#: sample codes of the dropout masks: tracked examples by id, moments examples by row
_TRACKED, _MOMENTS = 0, 1


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
    from gradstore.errors import StoreError

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


def dropout_mask(seed: int, step: int, sample: int, key: int, module: int, shape, p: float) -> torch.Tensor:
    """The kept-unit mask (bool, ``shape``) of one example at one ``nn.Dropout`` in train-mode capture.

    It depends only on (``seed``, ``step``, ``sample`` code, the example's ``key`` -- its id, or its
    row in the moments sample -- and the module's index among the model's Dropout modules), never on
    the batch or shard the example is captured in, so every example has a fixed per-example network
    and its gradient is defined. A unit is kept with probability 1 - p.
    """
    mixed = np.random.SeedSequence([int(seed), int(step), int(sample), int(key) & (2**63 - 1), int(module)])
    generator = torch.Generator().manual_seed(int(mixed.generate_state(1, np.uint64)[0] >> np.uint64(1)))
    return torch.rand(tuple(shape), generator=generator) >= p


@contextmanager
def seeded_dropout(model, *, seed: int, step: int, sample: int, keys):
    """Every ``nn.Dropout`` of ``model`` applies :func:`dropout_mask` of each example (rows ``keys``).

    A forward hook replaces the module's output (the identity in eval mode) by ``x * mask / (1 - p)``;
    hooks are removed on exit.
    """
    handles = []
    drops = [m for m in model.modules() if type(m) is torch.nn.Dropout]

    def hook_of(index, p):
        def hook(_module, args, _output):
            x = args[0]
            if p == 0:
                return x
            if p >= 1:
                return torch.zeros_like(x)
            masks = torch.stack([dropout_mask(seed, step, sample, k, index, x.shape[1:], p) for k in keys])
            return x * masks.to(device=x.device, dtype=x.dtype) / (1 - p)
        return hook

    try:
        for index, module in enumerate(drops):
            handles.append(module.register_forward_hook(hook_of(index, float(module.p))))
        yield model
    finally:
        for handle in handles:
            handle.remove()


def _np(tensor, dtype: str = "float64") -> np.ndarray:
    """A numpy copy on the CPU: float64 for exact statistics, the storage dtype for gradient values
    (cast by torch, much faster than numpy's float16 conversion)."""
    return tensor.detach().to(device="cpu", dtype=getattr(torch, dtype)).numpy()


class StepCapture:
    """The arrays of one step of a run, from the capture engine; see the module docstring.

    Parameters
    ----------
    layout : RunLayout
        The run's layout (layers, example ids, coordinates, projection, Gram, correctness kind).
    task : gradstore.record.tasks.Task
    train, test, moments : gradstore.record.samples.Sample or None
        The tracked train and test samples and the moments sample (checked by the Recorder).
    autocast : {None, "bfloat16", "float16"}
    mode : {"eval", "train"}
        ``"train"``: ``nn.Dropout`` applies a seeded per-example mask (:func:`dropout_mask`).
    dropout_seed : int
    moments_chunk : int
        Examples per pass over the moments sample (bounds its memory).
    """

    def __init__(self, layout: RunLayout, task, train, test=None, moments=None, *, autocast=None, mode="eval",
                 dropout_seed: int = 0, moments_chunk: int = 1024):
        self.layout, self.task = layout, task
        self.train, self.test, self.moments = train, test, moments
        self.autocast, self.mode, self.dropout_seed = autocast, mode, int(dropout_seed)
        self.moments_chunk = int(moments_chunk)
        self.coords: dict[str, list[int]] = {}
        for name, index in zip(layout.coord_param, layout.coord_index):
            self.coords.setdefault(name, []).append(int(index))
        self._projection = None
        self._fingerprint = None  # of the configuration, made on the first header

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_projection"] = None  # rebuilt from its seed where it is used
        return state

    def cpu(self) -> StepCapture:
        """A copy whose samples' tensors are on the CPU (what capture workers are sent)."""
        import copy

        out = copy.copy(self)
        out.train, out.test, out.moments = (None if s is None else s.cpu() for s in (self.train, self.test, self.moments))
        out._projection = None
        return out

    @property
    def projection(self):
        if self.layout.n_proj and self._projection is None:
            from gradstore.capture import Projection

            self._projection = Projection(self.layout.n_proj, seed=self.layout.projection_seed)
        return self._projection

    # ---------------------------------------------------------------- the step
    def __call__(self, model, reducer, step: int = 0) -> dict[str, np.ndarray] | None:
        """Capture this process's rows of every sample (collective over ``reducer``'s processes).

        Returns the step's arrays on rank 0, None on the other ranks.
        """
        from gradstore.record.reduce import CAPTURE

        if reducer.size > 1:  # the ranks agree, or all stop with the same line
            reducer.check_in(CAPTURE, step, **self.header(model))
        lay = self.layout
        nl, n_param = len(lay.layers), len(lay.params)
        m, norm_sq_of_sum, sum_of_norm_sq = (np.zeros((len(SAMPLES), nl)) for _ in range(3))
        param_nss, param_sns = (np.zeros((len(SAMPLES), n_param)) for _ in range(2))
        parts, gathered = [], None
        for row, (sample, offset) in enumerate(((self.train, 0), (self.test, lay.n_train))):
            if sample is None:
                continue
            rows = reducer.shard(len(sample))
            keys = lay.example_ids[offset + rows.start: offset + rows.stop]
            part, total = self._tracked(model, sample, rows, keys, step, reducer)
            gathered = reducer.gather(part)
            if gathered is not None:
                pieces = [p for p in gathered if p is not None]
                merged = {key: np.concatenate([p[key] for p in pieces]) for key in pieces[0]}
                m[row] = len(sample)
                param_nss[row] = self._by_param_sq(total)
                norm_sq_of_sum[row] = self._by_layer(param_nss[row])
                sum_of_norm_sq[row] = merged["sq_norm"].sum(axis=0)
                param_sns[row] = merged.pop("param_sq_norm").sum(axis=0)
                parts.append(merged)
        if self.moments is not None:
            moments = self._moments(model, step, reducer)
            if moments is not None:
                m[2], norm_sq_of_sum[2], sum_of_norm_sq[2], param_nss[2], param_sns[2] = moments
        if gathered is None:
            return None
        out = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
        out.update(m=m, norm_sq_of_sum=norm_sq_of_sum, sum_of_norm_sq=sum_of_norm_sq)
        if lay.param_moments:
            out.update(param_norm_sq_of_sum=param_nss, param_sum_of_norm_sq=param_sns)
        if lay.gram:
            out["gram"] = self._gram(model, step)
        return out

    def header(self, model) -> dict:
        """What every rank must agree on before a capture (:meth:`ProcessGroupReducer.check_in`):
        the samples' sizes, a fingerprint of the run's configuration, and (Σ w, Σ |w|) of the model's
        floating-point parameters and buffers, in float64."""
        from gradstore.record.reduce import fingerprint

        if self._fingerprint is None:
            lay = self.layout
            fields = [getattr(lay, f.name) for f in dataclasses.fields(lay)]
            self._fingerprint = fingerprint(*fields, self.autocast, self.mode, self.dropout_seed)
        sizes = tuple(-1 if s is None else len(s) for s in (self.train, self.test, self.moments))
        tensors = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
        sums = torch.zeros(2, dtype=torch.float64, device=tensors[0].device if tensors else "cpu")
        for t in tensors:
            values = t.detach().to(device=sums.device, dtype=torch.float64)
            sums[0] += values.sum()
            sums[1] += values.abs().sum()
        return {"sizes": sizes, "config": self._fingerprint, "weights": tuple(sums.tolist())}

    @contextmanager
    def _measured(self, model, step: int, sample: int, keys):
        """The capture forward as the run is measured: autocast, and seeded dropout in train mode."""
        with autocast_forward(model, self.autocast):
            if self.mode == "train":
                with seeded_dropout(model, seed=self.dropout_seed, step=step, sample=sample, keys=keys):
                    yield
            else:
                yield

    def _loss(self, outputs, targets):
        return self.task.loss(outputs, targets)

    def _batch(self, sample, rows, model):
        inputs, targets = sample.batch(rows)
        targets = self.task.convert(targets)
        device = next(model.parameters()).device
        return to_device(inputs, device), to_device(targets, device)

    def _tracked(self, model, sample, rows, keys, step, reducer):
        """Per-example arrays (numpy) of this process's rows of a tracked sample, and Σ g (flat float64)."""
        from gradstore.capture import capture, plan

        params = plan(model).params
        n = rows.stop - rows.start
        inputs = targets = None
        if n:
            inputs, targets = self._batch(sample, rows, model)
        if reducer.size == 1:
            with self._measured(model, step, _TRACKED, keys):
                res = capture(model, self._loss, inputs, targets, sq_norms=True, coords=self.coords or None,
                              projection=self.projection, dot_with="sum", grad_sum=True)
            return self._part(res, targets), _flat(res.grad_sum, params)
        grad_sum = {}
        if n:
            with self._measured(model, step, _TRACKED, keys):
                grad_sum = capture(model, self._loss, inputs, targets, sq_norms=False, grad_sum=True).grad_sum
        total = reducer.sum(_flat(grad_sum, params))  # Σ g over the whole tracked sample, float64
        if not n:
            return None, total
        vectors = {name: v.to(device=p.device, dtype=p.dtype) for (name, p), v in
                   zip(params.items(), _split(total, params))}
        with self._measured(model, step, _TRACKED, keys):
            res = capture(model, self._loss, inputs, targets, sq_norms=True, coords=self.coords or None,
                          projection=self.projection, dot_with=vectors)
        return self._part(res, targets), total

    def _part(self, res, targets) -> dict[str, np.ndarray]:
        lay = self.layout
        sq, dots = res.by_layer("sq_norms"), res.by_layer("dots")
        part = {
            "loss": _np(res.losses),
            "sq_norm": np.stack([_np(sq[layer]) for layer in lay.layers], axis=1),
            "dot_with_sum": np.stack([_np(dots[layer]) for layer in lay.layers], axis=1),
            # ||g_i||² per parameter (example, param), summed over the sample in __call__, never stored
            "param_sq_norm": np.stack([_np(res.sq_norms[name]) for name, _, _ in lay.params], axis=1),
        }
        if lay.correct is not None:
            correct = self.task.correct(res.outputs, targets)
            part["correct"] = (correct.cpu().numpy() if lay.correct == "bool" else _np(correct))
        if lay.n_coord:
            part["grad_coords"] = np.concatenate([_np(res.coords[name], lay.dtype) for name in self.coords], axis=1)
        if lay.n_proj:
            proj = {}
            for name, value in res.proj.items():
                layer = res.layer_of[name]
                proj[layer] = value if layer not in proj else proj[layer] + value
            part["grad_proj"] = np.stack([_np(proj[layer], lay.dtype) for layer in lay.layers], axis=1)
        return part

    def _by_param_sq(self, flat) -> list[float]:
        """||Σ g||² of each parameter (``layout.params`` order) from the flat float64 Σ g."""
        out, start = [], 0
        for _, shape, _ in self.layout.params:
            size = int(np.prod(shape, dtype=np.int64))
            block = flat[start:start + size]
            out.append(float((block * block).sum()))
            start += size
        return out

    def _by_layer(self, per_param) -> list[float]:
        """A per-parameter quantity summed over each layer's parameters (parameter blocks add)."""
        acc = dict.fromkeys(self.layout.layers, 0.0)
        for (_, _, layer), value in zip(self.layout.params, per_param):
            acc[layer] += float(value)
        return [acc[layer] for layer in self.layout.layers]

    def _moments(self, model, step, reducer):
        """(m, ||Σ g||², Σ ||g||²) per layer, then ||Σ g||² and Σ ||g||² per parameter, over the moments
        sample, streamed in chunks; rank 0 only."""
        from gradstore.capture import capture, plan

        params = plan(model).params
        sample = self.moments
        rows = reducer.shard(len(sample))
        device = next(model.parameters()).device
        sums = torch.zeros(sum(p.numel() for p in params.values()), dtype=torch.float64, device=device)
        sq = torch.zeros(len(params), dtype=torch.float64, device=device)
        for start in range(rows.start, rows.stop, self.moments_chunk):
            chunk = slice(start, min(rows.stop, start + self.moments_chunk))
            inputs, targets = self._batch(sample, chunk, model)
            with self._measured(model, step, _MOMENTS, range(chunk.start, chunk.stop)):
                res = capture(model, self._loss, inputs, targets, sq_norms=True, grad_sum=True)
            offset = 0
            for j, (name, p) in enumerate(params.items()):
                sums[offset:offset + p.numel()] += res.grad_sum[name].reshape(-1).to(torch.float64)
                sq[j] += res.sq_norms[name].sum(dtype=torch.float64)
                offset += p.numel()
        both = reducer.sum(torch.cat([sums, sq]).cpu())
        if reducer.rank != 0:
            return None
        total, sq = both[:-len(params)], both[-len(params):].tolist()
        param_nss = self._by_param_sq(total)
        return len(sample), self._by_layer(param_nss), self._by_layer(sq), param_nss, sq

    def _gram(self, model, step) -> np.ndarray:
        """Exact per-layer Gram blocks over every tracked example (train then test), one pass."""
        from gradstore.capture import capture

        lay = self.layout
        batches = [s.batch(slice(0, len(s))) for s in (self.train, self.test) if s is not None]
        inputs, targets = cat_nests([b[0] for b in batches]), self.task.convert(cat_nests([b[1] for b in batches]))
        device = next(model.parameters()).device
        with self._measured(model, step, _TRACKED, lay.example_ids):
            res = capture(model, self._loss, to_device(inputs, device), to_device(targets, device), sq_norms=False,
                          gram=True)
        by_layer = res.by_layer("gram")
        return np.stack([_np(by_layer[layer]) for layer in lay.layers])


def _flat(grad_sum: dict, params: dict):
    """Σ g of every parameter, flattened in order, float64 on the CPU (zeros where absent)."""
    if not grad_sum:
        return torch.zeros(sum(p.numel() for p in params.values()), dtype=torch.float64)
    return torch.cat([grad_sum[name].detach().to("cpu", torch.float64).reshape(-1) for name in params])


def _split(flat, params: dict) -> list:
    out, start = [], 0
    for p in params.values():
        out.append(flat[start:start + p.numel()].reshape(p.shape))
        start += p.numel()
    return out
