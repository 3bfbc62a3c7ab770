"""Per-parameter coherence moments (``param_norm_sq_of_sum``, ``param_sum_of_norm_sq``) recorded by the
Recorder, against an independent per-example autograd loop (float64, an MLP with biases)."""

import numpy as np
import torch
from torch import nn

from analysis.coherence import weights_m_coherence
from gradstore.record import Recorder
from gradstore.store import create_run, open_run
from gradstore.store.schema import PARAM_MOMENTS


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


SETS = {"tracked_train": _data(6, 1), "tracked_test": _data(3, 2), "moments_train": _data(11, 3)}


def _record(target, model, **options):
    (x, y), (xt, yt), (xm, ym) = SETS.values()
    return Recorder(target, model, train_inputs=x, train_targets=y, train_ids=np.arange(6), test_inputs=xt,
                    test_targets=yt, test_ids=np.arange(3) + 100, moments_inputs=xm, moments_targets=ym,
                    coords_per_layer=0, background=False, **options)


def _loop_moments(model, x, y):
    """(||Σ g||², Σ ||g||²) of every parameter, from one autograd backward pass per example."""
    params = dict(model.named_parameters())
    total = {k: torch.zeros_like(p) for k, p in params.items()}
    sq = dict.fromkeys(params, 0.0)
    for i in range(len(x)):
        loss = nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1])
        for (k, _), g in zip(params.items(), torch.autograd.grad(loss, list(params.values()))):
            total[k] += g
            sq[k] += float((g * g).sum())
    return {k: float((total[k] * total[k]).sum()) for k in params}, sq


def test_param_moments_equal_a_per_example_loop_and_add_up_to_the_layer_moments(tmp_path):
    model = _mlp()
    with _record(tmp_path / "run.zarr", model) as rec:
        rec.record_now(0, model)
    ds = open_run(tmp_path / "run.zarr").load()
    names = [n for n, _ in model.named_parameters()]
    assert list(ds["param"].values) == names
    assert list(ds["param_layer"].values) == ["0", "0", "2", "2"]
    assert ds.attrs["storage"]["param_moments"] is True
    for sample, (x, y) in SETS.items():
        nss, sns = _loop_moments(model, x, y)
        got = ds.sel(step=0, sample=sample)
        np.testing.assert_allclose(got["param_norm_sq_of_sum"].values, [nss[k] for k in names], rtol=1e-10)
        np.testing.assert_allclose(got["param_sum_of_norm_sq"].values, [sns[k] for k in names], rtol=1e-10)
        assert (got["param_norm_sq_of_sum"].values > 0).all()
        for stored, per_param in (("norm_sq_of_sum", "param_norm_sq_of_sum"), ("sum_of_norm_sq", "param_sum_of_norm_sq")):
            summed = got[per_param].groupby("param_layer").sum().rename(param_layer="layer")
            np.testing.assert_allclose(summed.sel(layer=got.layer).values, got[stored].values, rtol=1e-12)
        # weights-only m-coherence (analysis): ||Σ g_W||² / Σ ||g_W||² of the weights alone, no biases
        weights = weights_m_coherence(ds).sel(step=0, sample=sample)
        for layer, ws in (("0", ["0.weight"]), ("2", ["2.weight"]), ("(model)", ["0.weight", "2.weight"])):
            want = sum(nss[w] for w in ws) / sum(sns[w] for w in ws)
            np.testing.assert_allclose(float(weights.sel(layer=layer)), want, rtol=1e-10)


def test_a_store_created_without_param_moments_is_resumed_without_them(tmp_path):
    model = _mlp()
    with _record(tmp_path / "new.zarr", model) as rec:
        layout = rec.layout
        rec.record_now(0, model)
    with _record(tmp_path / "new.zarr", model) as rec:  # resumed: still with them
        rec.record_now(1, model)
    resumed = open_run(tmp_path / "new.zarr")
    assert resumed.sizes["step"] == 2 and (resumed["param_sum_of_norm_sq"].values > 0).all()
    old = layout.replace(param_moments=False)  # what a store written before them holds
    values = open_run(tmp_path / "new.zarr").isel(step=0).load()
    with create_run(tmp_path / "old.zarr", old) as writer:
        writer.append_step(0, **{k: values[k].values for k in ("loss", "correct", "sq_norm", "dot_with_sum", "m",
                                                              "norm_sq_of_sum", "sum_of_norm_sq")})
    with _record(tmp_path / "old.zarr", model) as rec:  # the Recorder asks for them; the store keeps its layout
        rec.record_now(1, model)
    ds = open_run(tmp_path / "old.zarr")
    assert ds.sizes["step"] == 2 and not set(PARAM_MOMENTS) & set(ds.variables) and "param" not in ds.dims
    assert ds.attrs["storage"]["param_moments"] is False
    np.testing.assert_allclose(ds["norm_sq_of_sum"].isel(step=1).values, values["norm_sq_of_sum"].values, rtol=1e-12)
