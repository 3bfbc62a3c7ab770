"""The Recorder refuses bad arguments up front, before any store exists (issue 12, findings 11, 22, 23).

Every refusal is a GradstoreError (StoreError or CaptureError) of one line that names the argument;
no store folder is created. Valid variants of the same arguments are still accepted, stored exactly,
and the probe forward pass leaves the training run as it was.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradstore.errors import CaptureError, GradstoreError, StoreError
from gradstore.store import Recorder, open_run
from recorder_helpers import data, tiny_model


X, Y = data(4, 1)
XT, YT = data(2, 2)
XM, YM = data(5, 3)


def _with_nan(x, row, value=float("nan")):
    x = x.clone()
    x[row, 1, 2] = value
    return x


def _detached(outputs, targets):
    return F.cross_entropy(outputs, targets, reduction="none").detach()


def _mean(outputs, targets):
    return F.cross_entropy(outputs, targets)


def _frozen():
    return tiny_model().requires_grad_(False)


def _float64():
    return tiny_model().double()


TEST = dict(test_inputs=XT, test_targets=YT, test_ids=[10, 11])

# (finding, changed arguments, error class, words the one-line message must contain)
BAD = [
    ("23 wrong feature shape", dict(train_inputs=torch.randn(4, 3, 3)), CaptureError, ["train_inputs", "(4, 3, 3)"]),
    ("23 integer inputs", dict(train_inputs=torch.randint(0, 3, (4, 2, 3))), CaptureError,
     ["train_inputs", "torch.int64", "train_inputs.to(torch.float32)"]),
    ("23 float64 model", dict(model=_float64), CaptureError, ["train_inputs", "train_inputs.to(torch.float64)"]),
    ("23 test inputs of another shape", dict(TEST, test_inputs=torch.randn(2, 3, 2)), StoreError,
     ["test_inputs", "(3, 2)", "(2, 3)"]),
    ("23 moments inputs of another dtype", dict(moments_inputs=XM.double(), moments_targets=YM), StoreError,
     ["moments_inputs", "torch.float64"]),
    ("23 2-d targets", dict(train_targets=Y[:, None]), StoreError, ["train_targets", "1-d", "(4, 1)"]),
    ("23 float targets", dict(train_targets=Y.float()), StoreError, ["train_targets", "integer", "torch.float32"]),
    ("23 list targets", dict(train_targets=Y.tolist()), StoreError, ["train_targets", "torch.as_tensor"]),
    ("23 numpy targets", dict(train_targets=Y.numpy()), StoreError, ["train_targets", "torch.as_tensor"]),
    ("23 bool targets", dict(train_targets=Y > 0), StoreError, ["train_targets", "integer"]),
    ("23 out-of-range targets", dict(train_targets=torch.tensor([0, 1, 3, 2])), StoreError,
     ["train_targets", "[0, 3)", "to 3"]),
    ("23 negative targets", dict(train_targets=torch.tensor([0, -1, 2, 2])), StoreError,
     ["train_targets", "[0, 3)", "from -1"]),
    ("23 out-of-range test targets", dict(TEST, test_targets=torch.tensor([0, 7])), StoreError,
     ["test_targets", "[0, 3)"]),
    ("23 out-of-range moments targets", dict(moments_inputs=XM, moments_targets=torch.full((5,), 3)), StoreError,
     ["moments_targets", "[0, 3)"]),
    ("23 out-of-range train_true", dict(train_true=np.array([0, 1, 2, 5])), StoreError, ["train_true", "[0, 3)"]),
    ("23 detached loss", dict(loss_fn=_detached), CaptureError, ["loss_fn", "require grad", ".detach()"]),
    ("23 scalar loss", dict(loss_fn=_mean), CaptureError, ["loss_fn", "reduction='none'"]),
    ("23 string ids", dict(train_ids=["a", "b", "c", "d"]), StoreError, ["train_ids", "integer"]),
    ("11 float ids", dict(train_ids=[0.5, 1.5, 2.5, 3.5]), StoreError, ["train_ids", "integer", "float64"]),
    ("11 whole float ids", dict(train_ids=np.arange(4.0)), StoreError, ["train_ids", "integer"]),
    ("11 duplicate ids", dict(train_ids=[3, 1, 3, 2]), StoreError, ["train_ids", "repeats", "3"]),
    ("11 duplicate test ids", dict(TEST, test_ids=[9, 9]), StoreError, ["test_ids", "repeats", "9"]),
    ("11 test ids equal to train ids", dict(TEST, test_ids=[2, 8]), StoreError, ["test_ids", "train_ids", "2"]),
    ("23 test inputs without ids", dict(TEST, test_ids=None), StoreError, ["test_ids"]),
    ("23 test inputs without targets", dict(TEST, test_targets=None), StoreError, ["test_targets"]),
    ("23 test ids without inputs", dict(test_ids=[10, 11]), StoreError, ["test_inputs"]),
    ("23 moments inputs without targets", dict(moments_inputs=XM), StoreError, ["moments_targets"]),
    ("23 fewer ids than inputs", dict(train_ids=[0, 1, 2]), StoreError, ["train_ids", "3", "4"]),
    ("23 more targets than inputs", dict(train_targets=torch.tensor([0, 1, 2, 1, 0])), StoreError,
     ["train_targets", "5", "4"]),
    ("23 fewer test ids than test inputs", dict(TEST, test_ids=[10]), StoreError, ["test_ids", "1", "2"]),
    ("23 2-d ids", dict(train_ids=np.arange(4).reshape(2, 2)), StoreError, ["train_ids", "1-d"]),
    ("23 NaN inputs", dict(train_inputs=_with_nan(X, 2)), StoreError, ["train_inputs", "non-finite", "row 2"]),
    ("23 inf test inputs", dict(TEST, test_inputs=_with_nan(XT, 1, float("inf"))), StoreError,
     ["test_inputs", "non-finite", "row 1"]),
    ("23 NaN moments inputs", dict(moments_inputs=_with_nan(XM, 4), moments_targets=YM), StoreError,
     ["moments_inputs", "non-finite"]),
    ("23 empty inputs", dict(train_inputs=X[:0], train_targets=Y[:0], train_ids=[]), StoreError,
     ["train_inputs", "at least one"]),
    ("23 list inputs", dict(train_inputs=X.tolist()), StoreError, ["train_inputs", "torch.Tensor"]),
    ("22 frozen model", dict(model=_frozen), CaptureError,
     ["no trainable parameters (requires_grad=True)", "unfreeze"]),
    ("22 parameterless model", dict(model=nn.Flatten), CaptureError, ["no trainable parameters", "unfreeze"]),
]


def _kwargs(**changes):
    kw = dict(train_inputs=X, train_targets=Y, train_ids=np.arange(4), coords_per_layer=2, background=False)
    kw.update(changes)
    return {k: v for k, v in kw.items() if v is not None}


@pytest.mark.parametrize(("finding", "changes", "error", "words"), BAD, ids=[b[0] for b in BAD])
def test_bad_arguments_are_refused_in_one_line_before_the_store_exists(tmp_path, finding, changes, error, words):
    changes = dict(changes)
    model = changes.pop("model", tiny_model)()
    target = tmp_path / "run.zarr"
    with pytest.raises(error) as err:
        Recorder(target, model, **_kwargs(**changes))
    assert isinstance(err.value, GradstoreError)
    text = str(err.value)
    assert text and "\n" not in text, text
    for word in words:
        assert word in text, (finding, text)
    assert not target.exists()


def test_valid_variants_are_accepted_and_stored_exactly(tmp_path):
    """ids as range, list, numpy int32 or a torch tensor; int32 targets; -1 for an unknown clean label."""
    model = tiny_model()
    with Recorder(tmp_path / "run.zarr", model, train_inputs=X, train_targets=Y.int(), train_ids=range(100, 104),
                  train_true=torch.tensor([0, -1, 2, 1]), test_inputs=XT, test_targets=YT.to(torch.uint8),
                  test_ids=torch.tensor([7, 5], dtype=torch.int32), moments_inputs=XM, moments_targets=YM,
                  coords_per_layer=2, background=False) as rec:
        rec.record(0, model)
    ds = open_run(tmp_path / "run.zarr").load()
    assert ds.example.values.tolist() == [100, 101, 102, 103, 7, 5]
    assert ds.train_label.values.tolist() == [*Y.tolist(), *YT.tolist()]
    assert ds.true_label.values.tolist() == [0, -1, 2, 1, *YT.tolist()]
    losses = F.cross_entropy(model(torch.cat([X, XT])), torch.cat([Y, YT]), reduction="none")
    np.testing.assert_allclose(ds.loss.values[0], losses.detach().numpy(), rtol=1e-6)


def test_the_probe_pass_leaves_the_training_run_untouched(tmp_path):
    """The Recorder's one forward pass (two examples, eval mode) changes no mode, RNG state, buffer,
    parameter or gradient of the run it observes."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Dropout(0.5), nn.Linear(5, 3)).train()
    F.cross_entropy(model(X), Y).backward()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    rng = torch.random.get_rng_state()
    Recorder(tmp_path / "run.zarr", model, **_kwargs()).close()
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_a_custom_loss_is_checked_on_the_probe_and_then_used(tmp_path):
    def smooth(outputs, targets):
        return F.cross_entropy(outputs, targets, reduction="none", label_smoothing=0.1)

    model = tiny_model()
    with Recorder(tmp_path / "run.zarr", model, loss_fn=smooth, **_kwargs()) as rec:
        rec.record(0, model)
    np.testing.assert_allclose(open_run(tmp_path / "run.zarr").loss.values[0], smooth(model(X), Y).detach().numpy(),
                               rtol=1e-6)


@pytest.mark.parametrize("step", ["x", 1.5, 2.0, -1, True, None])
def test_record_refuses_a_step_that_is_not_a_training_step_number(tmp_path, step):
    model = tiny_model()
    with Recorder(tmp_path / "run.zarr", model, **_kwargs()) as rec:
        with pytest.raises(StoreError, match=r"step must be an integer >= 0") as err:
            rec.record(step, model)
        assert "\n" not in str(err.value)
        rec.record(np.int64(3), model)  # numpy integers are steps too
    assert open_run(tmp_path / "run.zarr").step.values.tolist() == [3]
