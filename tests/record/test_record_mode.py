"""Measurement mode, explicit: eval (default) with optional BatchNorm priming, train with seeded
per-example dropout masks, BatchNorm in train mode refused; scheduled and unscheduled recording."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradstore.errors import CaptureError, StoreError
from gradstore.record import Recorder, Schedule, dropout_mask
from gradstore.store import open_run
from gradstore.store.summary import summarize
from record_helpers import loop_sq_norms


def _data(n, seed, width=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, width, generator=g), torch.randint(0, 3, (n,), generator=g)


def _bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))


def test_batchnorm_priming_is_a_recorder_option_and_leaves_the_model_as_it_was(tmp_path):
    model = _bn_model()
    x, y = _data(4, 1)
    prime = [_data(10, 2)[0], _data(10, 3)[0]]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with Recorder(tmp_path / "p.zarr", model, train_inputs=x, train_targets=y, train_ids=np.arange(4),
                  prime_batches=prime, coords_per_layer=0, background=False) as rec:
        rec.record_now(0, model)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # statistics restored
    ds = open_run(tmp_path / "p.zarr").load()
    assert ds.attrs["measurement"] == {"mode": "eval", "bn_priming": {"batches": 2, "reset": True}}
    summary = summarize(tmp_path / "p.zarr")  # what gradstore inspect shows
    assert "measured   eval mode, BatchNorm primed on 2 batch(es) (reset)" in summary
    assert "task       classification" in summary
    # independently: reset statistics averaged equally over the priming passes (momentum None)
    oracle = _bn_model()
    with torch.no_grad():
        h = [oracle[0](b) for b in prime]
        oracle[1].running_mean.copy_(torch.stack([a.mean(0) for a in h]).mean(0))
        oracle[1].running_var.copy_(torch.stack([a.var(0, unbiased=True) for a in h]).mean(0))
    oracle.eval()
    layers = {"0": ["0.weight", "0.bias"], "1": ["1.weight", "1.bias"], "3": ["3.weight", "3.bias"]}

    def loss_of(i):
        return F.cross_entropy(oracle(x[i:i + 1]), y[i:i + 1])

    np.testing.assert_allclose(ds.loss.values[0], torch.stack([loss_of(i) for i in range(4)]).detach().numpy(),
                               rtol=1e-5)
    np.testing.assert_allclose(ds.sq_norm.values[0], loop_sq_norms(oracle, loss_of, 4, layers)[0].numpy(), rtol=1e-4)


def test_train_mode_applies_a_seeded_per_example_dropout_mask(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3))
    x, y = _data(5, 1)
    ids = np.array([40, 7, 12, 3, 99])
    with Recorder(tmp_path / "t.zarr", model, train_inputs=x, train_targets=y, train_ids=ids, mode="train",
                  dropout_seed=5, coords_per_layer=0, background=False) as rec:
        rec.record_now(4, model)
    ds = open_run(tmp_path / "t.zarr").load()
    assert ds.attrs["measurement"] == {"mode": "train", "bn_priming": None, "dropout_seed": 5}
    assert ("measured   train mode, no BatchNorm priming, seeded per-example dropout (seed 5)"
            in summarize(tmp_path / "t.zarr"))
    masks = torch.stack([dropout_mask(5, 4, 0, int(i), 0, (8,), 0.5) for i in ids]).float()
    assert 0 < masks.mean() < 1 and not torch.equal(masks[0], masks[1])

    def loss_of(i):
        h = torch.relu(model[0](x[i:i + 1])) * masks[i] / 0.5
        return F.cross_entropy(model[3](h), y[i:i + 1])

    want = torch.stack([loss_of(i) for i in range(5)]).detach().numpy()
    np.testing.assert_allclose(ds.loss.values[0], want, rtol=1e-6)
    layers = {"0": ["0.weight", "0.bias"], "3": ["3.weight", "3.bias"]}
    np.testing.assert_allclose(ds.sq_norm.values[0], loop_sq_norms(model, loss_of, 5, layers)[0].numpy(), rtol=1e-5)
    eval_loss = F.cross_entropy(model.eval()(x), y, reduction="none").detach().numpy()
    assert not np.allclose(ds.loss.values[0], eval_loss)  # the masks were applied


@pytest.mark.parametrize(("model", "words"), [
    (lambda: _bn_model(), ["mode='train'", "BatchNorm '1'", "couples the examples", "mode='eval'"]),
    (lambda: nn.Sequential(nn.Linear(6, 4), nn.Dropout1d(0.2), nn.Linear(4, 3)), ["nn.Dropout only", "Dropout1d"]),
])
def test_train_mode_is_refused_where_per_example_gradients_are_not_defined(tmp_path, model, words):
    x, y = _data(3, 0)
    with pytest.raises(CaptureError) as err:
        Recorder(tmp_path / "bad.zarr", model(), train_inputs=x, train_targets=y, train_ids=np.arange(3),
                 mode="train", coords_per_layer=0)
    assert "\n" not in str(err.value)
    for word in words:
        assert word in str(err.value)
    assert not (tmp_path / "bad.zarr").exists()


@pytest.mark.parametrize(("changes", "words"), [
    (dict(mode="test"), ["mode", "eval"]),
    (dict(prime_batches=[]), ["prime_batches", "empty"]),
    (dict(mode="train", prime_batches=[torch.zeros(2, 6)]), ["prime_batches", "mode='train'"]),
    (dict(moments_chunk=0), ["moments_chunk"]),
])
def test_bad_measurement_options_are_refused_in_one_line(tmp_path, changes, words):
    x, y = _data(3, 0)
    with pytest.raises(StoreError) as err:
        Recorder(tmp_path / "bad.zarr", nn.Linear(6, 3), train_inputs=x, train_targets=y, train_ids=np.arange(3),
                 coords_per_layer=0, **changes)
    assert "\n" not in str(err.value) and all(w in str(err.value) for w in words), str(err.value)


def test_maybe_record_follows_the_schedule_and_record_now_does_not(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    x, y = _data(3, 0)
    with Recorder(tmp_path / "s.zarr", model, train_inputs=x, train_targets=y, train_ids=np.arange(3),
                  schedule=Schedule.every(5), coords_per_layer=0) as rec:
        done = [rec.maybe_record(step, model, lr=0.1, other=1.0) for step in range(7)]
        rec.record_now(8, model)  # not on the schedule
        assert not rec.maybe_record(8, model) and not rec.maybe_record(5, model)  # already past
        assert rec.maybe_record(10, model)
    assert done == [True, False, False, False, False, True, False]
    ds = open_run(tmp_path / "s.zarr")
    assert ds.step.values.tolist() == [0, 5, 8, 10]
    assert ds.lr.values[:2].tolist() == [0.1, 0.1] and np.isnan(ds.lr.values[2])


def test_train_mode_masks_do_not_depend_on_the_batch_an_example_is_captured_in(tmp_path):
    """The same example, tracked with others or nearly alone, gets the same mask, loss and gradient."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 3))
    x, y = _data(5, 1)
    ids = np.array([40, 7, 12, 3, 99])
    stores = {}
    for name, rows in (("all", slice(0, 5)), ("two", slice(2, 4))):
        with Recorder(tmp_path / f"{name}.zarr", model, train_inputs=x[rows], train_targets=y[rows],
                      train_ids=ids[rows], mode="train", coords_per_layer=4, coord_seed=1,
                      background=False) as rec:
            rec.record_now(2, model)
        stores[name] = open_run(tmp_path / f"{name}.zarr").load()
    both = stores["all"].sel(example=[12, 3])
    np.testing.assert_allclose(stores["two"].loss.values, both.loss.values, rtol=1e-6)
    np.testing.assert_allclose(stores["two"].sq_norm.values, both.sq_norm.values, rtol=1e-5)
    np.testing.assert_allclose(stores["two"].grad_coords.values, both.grad_coords.values, rtol=1e-5, atol=1e-8)
