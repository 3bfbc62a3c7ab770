"""Synthetic runs in the store layout (docs/store-format.md), for tests and benchmarks.

The "gradient" of example i at step t is a vector over ``n_coords`` coordinates split among the
layers; every other stored quantity (moments, ``sq_norm``, ``dot_with_sum``, ``gram``,
``grad_proj``) is derived from it exactly, so on a synthetic run the estimates from ``grad_coords``
equal the exact quantities. Values at a step depend only on ``(seed, step)``, never on chunking.

Each gradient is ``a(t) u_{train label} + b(t) w + c v_i + noise``: a class direction shared by
examples with the same training label, a direction shared by all, a fixed per-example direction
(memorization) and fresh noise; coherence decays over training. Pristine examples are learned
early, corrupt ones late (the ``correct`` history).
"""

from __future__ import annotations

import dask.array as da
import numpy as np
import xarray as xr

from gradstore.store import SAMPLES


def _layer_sizes(layers, n_coords):
    sizes = np.full(len(layers), n_coords // len(layers))
    sizes[: n_coords % len(layers)] += 1
    return sizes


def _step_block(step_idx, *, seed, labels, n_coords, n_steps, structure):
    """Gradients (len(step_idx), example, coord) float32, each step from rng((seed, step))."""
    n_ex = labels.shape[0]
    fixed = np.random.default_rng([seed, 0xC0DE])
    classes = fixed.standard_normal((int(labels.max()) + 1, n_coords), dtype=np.float32)
    shared = fixed.standard_normal(n_coords, dtype=np.float32)
    own = fixed.standard_normal((n_ex, n_coords), dtype=np.float32)
    out = np.empty((len(step_idx), n_ex, n_coords), np.float32)
    for k, t in enumerate(step_idx):
        rng = np.random.default_rng([seed, int(t)])
        decay = structure * np.exp(-3.0 * t / max(n_steps, 1))
        g = rng.standard_normal((n_ex, n_coords), dtype=np.float32)
        g += 0.5 * own
        g += np.float32(decay) * (classes[labels] + 0.5 * shared)
        out[k] = g / np.sqrt(n_coords)
    return out


def synthetic_run(
    *,
    n_steps: int = 8,
    n_train: int = 24,
    n_test: int = 8,
    n_coords: int = 64,
    n_proj: int = 16,
    layers: tuple[str, ...] = ("fc1", "fc2"),
    n_classes: int = 3,
    corrupt_fraction: float = 0.25,
    structure: float = 1.0,
    seed: int = 0,
    step_chunk: int = 1,
    gram: bool = True,
    proj: bool = True,
) -> xr.Dataset:
    """A lazy (dask) Dataset in the run-store layout with known internal consistency.

    Parameters
    ----------
    n_steps, n_train, n_test : int
        Captured steps; tracked train and test examples.
    n_coords : int
        Sampled coordinates (all of the synthetic "gradient"), divided among ``layers``.
    n_proj : int
        Projection size per layer.
    structure : float
        Strength of the shared directions (0: pure noise, no group structure at all).
    step_chunk : int
        Steps per dask chunk.
    gram, proj : bool
        Include the optional ``gram`` and ``grad_proj`` variables.

    Returns
    -------
    xarray.Dataset
        Variables and dimensions as in docs/store-format.md; ``grad_coords`` float32, moments and
        per-example statistics float64.
    """
    rng = np.random.default_rng([seed, 1])
    n_ex = n_train + n_test
    true_label = rng.integers(0, n_classes, n_ex)
    corrupt = np.zeros(n_ex, bool)
    corrupt[:n_train] = rng.random(n_train) < corrupt_fraction
    shift = rng.integers(1, n_classes, n_ex) if n_classes > 1 else np.zeros(n_ex, int)
    train_label = np.where(corrupt, (true_label + shift) % n_classes, true_label)
    split = np.array(["train"] * n_train + ["test"] * n_test)
    sizes = _layer_sizes(layers, n_coords)
    coord_layer = np.repeat(np.array(layers), sizes)
    coord_index = np.concatenate([np.arange(s) for s in sizes])

    steps = np.arange(n_steps, dtype=np.int64) * 10
    step_idx = da.from_array(np.arange(n_steps), chunks=step_chunk)
    x = da.map_blocks(
        _step_block, step_idx, dtype=np.float32, new_axis=[1, 2],
        chunks=(step_idx.chunks[0], (n_ex,), (n_coords,)),
        seed=seed, labels=train_label, n_coords=n_coords, n_steps=n_steps, structure=structure,
    )
    coords_da = xr.DataArray(x, dims=("step", "example", "coord"))
    onehot = xr.DataArray((coord_layer[:, None] == np.array(layers)[None, :]).astype(np.float64),
                          dims=("coord", "layer"))
    xd = coords_da.astype(np.float64)
    train = xr.DataArray(split == "train", dims="example")
    sums = xr.concat([xd.where(train, 0).sum("example"), xd.where(~train, 0).sum("example")], "part")
    own_sum = xr.where(train, sums.isel(part=0), sums.isel(part=1))  # the example's own split's sum
    ds = xr.Dataset(
        {
            "grad_coords": coords_da,
            "sq_norm": xr.dot(xd**2, onehot, dim="coord", optimize=True),
            "dot_with_sum": xr.dot(xd * own_sum, onehot, dim="coord", optimize=True),
        }
    )
    nss = xr.dot(sums**2, onehot, dim="coord", optimize=True)
    sns = xr.concat([ds.sq_norm.where(train, 0).sum("example"), ds.sq_norm.where(~train, 0).sum("example")], "part")
    pick = xr.DataArray([0, 1, 0], dims="sample")
    ds["norm_sq_of_sum"] = nss.isel(part=pick).transpose("step", "sample", "layer")
    ds["m"] = xr.DataArray(np.array([n_train, n_test, n_train], float), dims="sample").broadcast_like(
        ds.norm_sq_of_sum)
    ds["sum_of_norm_sq"] = sns.isel(part=pick).transpose("step", "sample", "layer")

    n_steps_f = max(n_steps, 1)
    learned = np.where(corrupt, rng.uniform(0.5, 1.4, n_ex), rng.uniform(0.0, 0.6, n_ex)) * n_steps_f
    correct = (np.arange(n_steps)[:, None] >= learned[None, :]) ^ (rng.random((n_steps, n_ex)) < 0.05)
    ds["correct"] = xr.DataArray(da.from_array(correct, chunks=(step_chunk, n_ex)), dims=("step", "example"))
    ds["loss"] = xr.DataArray(da.from_array(np.where(correct, 0.1, 2.0) + rng.random((n_steps, n_ex)),
                                            chunks=(step_chunk, n_ex)), dims=("step", "example"))
    if gram:
        grams = [xr.dot(xd.where(xr.DataArray(coord_layer == name, dims="coord"), 0),
                        xd.rename(example="example_"), dim="coord", optimize=True) for name in layers]
        ds["gram"] = xr.concat(grams, "layer").transpose("step", "layer", "example", "example_")
    if proj:
        pr = np.random.default_rng([seed, 0x9E0]).standard_normal((n_coords, n_proj)) / np.sqrt(n_proj)
        proj_mat = xr.DataArray(pr, dims=("coord", "proj")) * onehot
        ds["grad_proj"] = xr.dot(xd, proj_mat, dim="coord", optimize=True).transpose("step", "example", "layer", "proj")
    full = {d: -1 for d in ("example", "example_", "coord", "layer", "proj", "sample")}
    for name in list(ds.data_vars):
        ds[name] = ds[name].chunk({"step": step_chunk, **{d: c for d, c in full.items() if d in ds[name].dims}})
    ds = ds.assign_coords(
        step=steps, example=np.arange(n_ex, dtype=np.int64) + 1000, layer=np.array(layers),
        coord=np.arange(n_coords), proj=np.arange(n_proj), sample=np.array(SAMPLES),
        coord_layer=("coord", coord_layer), coord_index=("coord", coord_index),
        coord_param=("coord", np.char.add(coord_layer, ".weight")),
    )
    if gram:
        ds = ds.assign_coords(example_=ds.example.values)
    ds["true_label"] = ("example", true_label)
    ds["train_label"] = ("example", train_label)
    ds["corrupt"] = ("example", corrupt)
    ds["split"] = ("example", split)
    ds["lr"] = ("step", np.full(n_steps, 0.1))
    ds["nonfinite"] = ("step", np.zeros(n_steps, bool))
    ds.attrs.update(gradstore_schema=1, gradstore_version="synthetic", projection_seed=seed,
                    config={"synthetic": True, "seed": seed}, seeds={"seed": seed},
                    model={"layers": list(layers)})  # dicts, as a real run's store attributes
    return ds


def write_synthetic_store(path, ds: xr.Dataset | None = None, **kwargs) -> str:
    """Write a synthetic run (``ds``, or ``synthetic_run(**kwargs)``) as a real run store.

    Uses the store writer (:func:`gradstore.store.create_run`) one step at a time, so memory stays
    bounded by one step; refuses to overwrite an existing path.

    Returns
    -------
    str
        The store path.
    """
    from gradstore.store import RunLayout, create_run

    ds = synthetic_run(**kwargs) if ds is None else ds
    layers = tuple(ds.layer.values.astype(str))
    coord_layer = tuple(ds.coord_layer.values.astype(str)) if "grad_coords" in ds else ()
    params = tuple((f"{name}.weight", (int((ds.coord_layer.values == name).sum()),), name) for name in layers)
    layout = RunLayout(
        layers=layers, params=params, example_ids=ds.example.values,
        n_train=int((ds.split.values == "train").sum()),
        true_label=ds.true_label.values, train_label=ds.train_label.values,
        coord_layer=coord_layer, coord_param=tuple(ds.coord_param.values.astype(str)) if coord_layer else (),
        coord_index=ds.coord_index.values if coord_layer else np.zeros(0, np.int64),
        n_proj=ds.sizes.get("proj", 0) if "grad_proj" in ds else 0,
        projection_seed=int(ds.attrs.get("projection_seed", 0)), gram="gram" in ds,
    )
    writer = create_run(str(path), layout, config=dict(ds.attrs["config"]), seeds=dict(ds.attrs.get("seeds", {})),
                        resume=False)
    optional = [n for n in ("grad_coords", "grad_proj", "gram") if n in ds]
    names = ["loss", "correct", "sq_norm", "dot_with_sum", "m", "norm_sq_of_sum", "sum_of_norm_sq", *optional]
    with writer:
        for k, step in enumerate(ds.step.values):
            values = ds[names].isel(step=k).compute()
            writer.append_step(int(step), lr=float(ds.lr.values[k]),
                               **{n: values[n].transpose(*ds[n].dims[1:]).values for n in names})
    return str(path)


def write_per_example_store(path, *, n_steps: int, n_examples: int = 50_000, n_layers: int = 60,
                            corrupt_fraction: float = 0.25, seed: int = 0, coords_per_layer: int = 0,
                            progress=None) -> str:
    """A run store at the papers' shape holding per-example arrays (no projections or gram).

    Every step is drawn from ``default_rng((seed, step))`` and written with the store writer: per
    example and layer ``sq_norm`` > 0 and ``dot_with_sum`` = ``sq_norm`` × a coefficient (pristine
    examples more aligned with the sum early on), with the coherence moments of the tracked
    training sample consistent with them (Σ_i d_i = ||Σ_i g_i||², Σ_i ||g_i||²), ``loss`` and
    ``correct``. Memory is one step (n_examples × n_layers).

    With ``coords_per_layer`` > 0 the store also holds ``grad_coords``, that many sampled
    coordinates per layer (float32): a class direction shared by the examples of a class (by their
    trained label) plus each example's own noise, so stiffness by class and gradient confusion have
    something to find. They are not consistent with ``sq_norm`` (a benchmark of the pairwise
    metrics' cost needs only their shape).

    Returns
    -------
    str
        The store path.
    """
    from gradstore.store import RunLayout, create_run

    layers = tuple(f"layer{k:02d}" for k in range(n_layers))
    rng = np.random.default_rng([seed, 0xBE5])
    labels = rng.integers(0, 10, n_examples)
    corrupt = rng.random(n_examples) < corrupt_fraction
    train_label = np.where(corrupt, (labels + rng.integers(1, 10, n_examples)) % 10, labels)
    k = int(coords_per_layer)
    coord = dict(coord_layer=tuple(np.repeat(layers, k)), coord_param=tuple(np.repeat([f"{n}.weight" for n in layers], k)),
                 coord_index=np.tile(np.arange(k, dtype=np.int64), n_layers)) if k else {}
    layout = RunLayout(layers=layers, params=tuple((f"{name}.weight", (max(k, 1),), name) for name in layers),
                       example_ids=np.arange(n_examples, dtype=np.int64), n_train=n_examples,
                       true_label=labels, train_label=train_label, **coord)
    directions = np.random.default_rng([seed, 0xC0]).standard_normal((10, n_layers * k)).astype(np.float32)
    writer = create_run(str(path), layout, config={"synthetic": True, "seed": seed, "shape": "per-example"},
                        seeds={"seed": seed}, resume=False)
    zero = np.zeros(n_layers)
    steps = range(n_steps)
    with writer:
        for t in (progress(steps) if progress else steps):
            r = np.random.default_rng([seed, t])
            sq = r.gamma(2.0, 1.0, (n_examples, n_layers))
            early = np.exp(-3.0 * t / max(n_steps, 1))
            coef = np.where(corrupt[:, None], 0.2 * early, 1.0 * early + 0.1) * 1e-3 + 1e-4 * r.standard_normal(sq.shape)
            dot = sq * coef
            moments = np.stack([dot.sum(0), zero, dot.sum(0)])  # no tracked test examples: empty sums
            norms = np.stack([sq.sum(0), zero, sq.sum(0)])
            count = np.stack([np.full(n_layers, float(n_examples)), np.zeros(n_layers), np.full(n_layers, float(n_examples))])
            learned = r.random(n_examples) < np.where(corrupt, 0.1, 0.9) * (1 - early)
            coords = (directions[train_label] + r.standard_normal((n_examples, n_layers * k), dtype=np.float32)
                      if k else None)
            writer.append_step(10 * t, loss=np.where(learned, 0.1, 2.3) + r.random(n_examples), correct=learned,
                               sq_norm=sq, dot_with_sum=dot, m=count, norm_sq_of_sum=moments, sum_of_norm_sq=norms,
                               lr=0.1, grad_coords=coords)
    return str(path)
