"""Recorder on a small real model, checked against per-example gradients from torch.func."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from gradstore.errors import StoreError
from gradstore.store import Recorder, Schedule, open_run
from gradstore.store.recorder import sample_coords
from recorder_helpers import data, tiny_model


def per_example_grads(model, x, y):
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        out = functional_call(model, p, (xi[None],))
        return nn.functional.cross_entropy(out, yi[None])

    return {k: v.double() for k, v in vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y).items()}


LAYERS = {"1": ("1.weight", "1.bias"), "3": ("3.weight", "3.bias")}


def by_layer(grads, layer):
    return torch.cat([grads[p].reshape(len(grads[p]), -1) for p in LAYERS[layer]], dim=1)


@pytest.fixture
def recorded(tmp_path):
    model = tiny_model()
    xtr, ytr = data(7, 1)
    xte, yte = data(4, 2)
    xm, ym = data(20, 3)
    true = ytr.clone()
    true[0] = (true[0] + 1) % 3
    rec = Recorder(tmp_path / "run.zarr", model, train_inputs=xtr, train_targets=ytr, train_ids=np.arange(7) + 50,
                   train_true=true.numpy(), test_inputs=xte, test_targets=yte, test_ids=np.arange(4) + 900,
                   moments_inputs=xm, moments_targets=ym, schedule=Schedule.at([0, 2]), coords_per_layer=4,
                   coord_seed=5, n_proj=3, projection_seed=7, gram=True, config={"what": "test"})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    snapshots = {}
    for step in range(4):
        if rec.wants(step):
            snapshots[step] = tiny_model()
            snapshots[step].load_state_dict(model.state_dict())
            rec(step, model, {"lr": 0.1, "train_loss": 1.5, "other": 3.0})
            if step == 0:
                assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        opt.zero_grad()
        nn.functional.cross_entropy(model(xtr), ytr).backward()
        opt.step()
    rec.close()  # waits for the background write of the last step
    return open_run(tmp_path / "run.zarr"), snapshots, (xtr, ytr, xte, yte, xm, ym), true


def test_recorder_matches_torch_func(recorded):
    ds, snapshots, (xtr, ytr, xte, yte, xm, ym), true = recorded
    assert ds.step.values.tolist() == [0, 2]
    assert ds.layer.values.tolist() == ["1", "3"]
    np.testing.assert_array_equal(ds.example.values, np.r_[np.arange(7) + 50, np.arange(4) + 900])
    assert ds.corrupt.values.tolist() == [True] + [False] * 10
    assert ds.split.values.tolist() == ["train"] * 7 + ["test"] * 4
    assert ds.lr.values.tolist() == [0.1, 0.1] and np.isnan(ds.test_acc.values).all()
    for i, step in enumerate([0, 2]):
        model = snapshots[step]
        splits = [per_example_grads(model, xtr, ytr), per_example_grads(model, xte, yte)]
        full = {k: torch.cat([splits[0][k], splits[1][k]]) for k in splits[0]}
        for j, layer in enumerate(["1", "3"]):
            flat = [by_layer(g, layer) for g in splits]
            sq = torch.cat([(f * f).sum(1) for f in flat])
            dots = torch.cat([f @ f.sum(0) for f in flat])
            np.testing.assert_allclose(ds.sq_norm.values[i, :, j], sq.numpy(), rtol=1e-5)
            np.testing.assert_allclose(ds.dot_with_sum.values[i, :, j], dots.numpy(), rtol=1e-4, atol=1e-7)
            for row, f in enumerate(flat):
                assert ds.m.values[i, row, j] == len(f)
                np.testing.assert_allclose(ds.norm_sq_of_sum.values[i, row, j], float((f.sum(0) ** 2).sum()), rtol=1e-5)
                np.testing.assert_allclose(ds.sum_of_norm_sq.values[i, row, j], float((f * f).sum()), rtol=1e-5)
            fm = by_layer(per_example_grads(model, xm, ym), layer)
            assert ds.m.values[i, 2, j] == 20
            np.testing.assert_allclose(ds.norm_sq_of_sum.values[i, 2, j], float((fm.sum(0) ** 2).sum()), rtol=1e-5)
            fa = by_layer(full, layer)
            np.testing.assert_allclose(ds.gram.values[i, j], (fa @ fa.T).numpy(), rtol=1e-4, atol=1e-7)
        for c in range(ds.sizes["coord"]):
            name, index = str(ds.coord_param.values[c]), int(ds.coord_index.values[c])
            np.testing.assert_allclose(ds.grad_coords.values[i, :, c], full[name].reshape(11, -1)[:, index].numpy(),
                                       rtol=1e-5, atol=1e-7)
        from gradstore.capture import Projection
        from gradstore.capture.factors import param_matrix_shape

        proj = Projection(3, seed=7)
        for j, layer in enumerate(["1", "3"]):
            want = 0
            for name in LAYERS[layer]:
                u, v = proj.matrices(name, full[name].shape[1:], dtype=torch.float64)
                g = full[name].reshape(11, *param_matrix_shape(tuple(full[name].shape[1:])))
                want = want + torch.einsum("kr,nrc,kc->nk", u, g, v)
            np.testing.assert_allclose(ds.grad_proj.values[i, :, j], want.numpy(), rtol=1e-4, atol=1e-6)
        logits = model(torch.cat([xtr, xte]))
        labels = torch.cat([ytr, yte])
        np.testing.assert_allclose(ds.loss.values[i], nn.functional.cross_entropy(logits, labels, reduction="none")
                                   .detach().numpy(), rtol=1e-5)
        np.testing.assert_array_equal(ds.correct.values[i], (logits.argmax(1) == labels).numpy())


def test_resumed_recorder_skips_committed_steps_and_refuses_other_model(tmp_path, recorded):
    xtr, ytr = data(7, 1)
    kw = dict(train_inputs=xtr, train_targets=ytr, train_ids=np.arange(7), schedule=Schedule.every(1),
              coords_per_layer=2)
    rec = Recorder(tmp_path / "r2.zarr", tiny_model(), **kw)
    rec.record(3, tiny_model())
    assert not rec.wants(3) and rec.wants(4)  # the write of step 3 may still be in flight
    with pytest.raises(StoreError, match="step 3 is not after the last recorded step 3"):
        rec.record(3, tiny_model())
    rec.close()
    again = Recorder(tmp_path / "r2.zarr", tiny_model(), background=False, **kw)
    assert again.committed == 1 and not again.wants(3) and again.wants(4)
    again.record(4, tiny_model())
    assert open_run(tmp_path / "r2.zarr").step.values.tolist() == [3, 4]
    again.close()
    with pytest.raises(StoreError, match="cannot append to .*: the model"):
        Recorder(tmp_path / "r2.zarr", nn.Sequential(nn.Flatten(), nn.Linear(6, 3)), **kw)
    with pytest.raises(StoreError, match="sampled coordinate set"):
        Recorder(tmp_path / "r2.zarr", tiny_model(), **{**kw, "coords_per_layer": 3})


def test_sample_coords_is_seeded_uniform_and_complete_for_small_layers():
    params = (("a.weight", (4, 5), "a"), ("a.bias", (4,), "a"), ("b.weight", (2, 2), "b"))
    la, pa, idx = sample_coords(params, ("a", "b"), 10, seed=3)
    la2, pa2, idx2 = sample_coords(params, ("a", "b"), 10, seed=3)
    assert (la, pa, idx.tolist()) == (la2, pa2, idx2.tolist())  # seeded
    assert la.count("a") == 10 and la.count("b") == 4  # b has only 4 values: all of them
    size = {"a.weight": 20, "a.bias": 4, "b.weight": 4}
    pairs = list(zip(pa, idx.tolist()))
    assert len(set(pairs)) == len(pairs) and all(0 <= i < size[p] for p, i in pairs)
    assert sample_coords(params, ("a", "b"), 10, seed=4)[2].tolist() != idx.tolist()


def test_schedule():
    assert Schedule.every(3).steps(10) == [0, 3, 6, 9]
    assert Schedule.every(5, start=2).steps(13) == [2, 7, 12]
    assert Schedule.at([4, 1]).steps(10) == [1, 4] and 4 in Schedule.at([4]) and 5 not in Schedule.at([4])
    s = Schedule.log_then_every(100, until=1000, n_log=10)
    early = [x for x in s.steps(1000)]
    assert early[0] == 0 and early[1] == 1 and all(b > a for a, b in zip(early, early[1:]))
    ratios = np.diff(np.log([x for x in early if x > 0]))
    assert ratios.max() < 0.8  # log-spaced: about log(1000)/10 = 0.69 apart
    assert s.steps(1301)[-4:] == [1000, 1100, 1200, 1300]
    with pytest.raises(StoreError):
        Schedule.every(0)


def test_recorder_observes_the_project_training_loop(tmp_path, mnist_subset):
    from pipelines.models import build_model
    from pipelines.train import TrainConfig, TrainData, train

    data = TrainData.from_mnist(mnist_subset, noise=0.5, seed=0)
    with Recorder(tmp_path / "run.zarr", build_model("mlp-3x256", seed=0),
                  train_inputs=data.x_train[:40], train_targets=data.y_train[:40], train_ids=data.train_ids[:40],
                  train_true=data.y_true[:40], test_inputs=data.x_test[:10], test_targets=data.y_test[:10],
                  test_ids=data.test_ids[:10], schedule=Schedule.every(2), coords_per_layer=30) as rec:
        result = train(TrainConfig(model="mlp-3x256", noise=0.5, steps=4, eval_every=100, eval_batch=4000), data,
                       observers=[rec])
    ds = open_run(tmp_path / "run.zarr")
    assert ds.step.values.tolist() == [0, 2, 4]
    assert ds.layer.values.tolist() == ["1", "3", "5", "7"]
    assert ds.corrupt.values[:40].tolist() == data.corrupt[:40].tolist()
    by_step = {h["step"]: h for h in result.history}
    np.testing.assert_allclose(ds.train_acc.values, [by_step[s]["train_acc"] for s in (0, 2, 4)])
    np.testing.assert_allclose(ds.lr.values, 0.1)
    assert ds.sizes["coord"] == 120 and not ds.nonfinite.values.any()
