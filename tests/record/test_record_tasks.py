"""Tasks beyond classification: the stored loss, correctness and labels follow the task, against
a per-example loop (one autograd backward pass per example)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradstore.errors import CaptureError, GradstoreError, StoreError
from gradstore.record import Custom, Recorder, Regression, Sequence
from gradstore.store import open_run
from record_helpers import layer_dots, loop_sq_norms

V, T = 7, 5


class TinyLM(nn.Module):
    """Embedding -> Linear -> token scores (examples, positions, vocabulary)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(V, 4)
        self.head = nn.Linear(4, V)

    def forward(self, tokens):
        return self.head(torch.tanh(self.emb(tokens)))


LM_LAYERS = {"emb": ["emb.weight"], "head": ["head.weight", "head.bias"]}


def _lm_data(n=4):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, V, (n, T), generator=g)
    targets = torch.randint(0, V, (n, T), generator=g)
    targets[0, 3:] = -100  # padding: only 3 tokens count in the first sequence
    targets[2, 0] = -100
    return tokens, targets


def test_sequence_task_stores_per_sequence_mean_losses_and_token_accuracy(tmp_path):
    model = TinyLM()
    x, y = _lm_data()
    with Recorder(tmp_path / "lm.zarr", model, train_inputs=x, train_targets=y, train_ids=np.arange(4),
                  task="sequence", coords_per_layer=0, background=False) as rec:
        rec.record_now(0, model)
    ds = open_run(tmp_path / "lm.zarr").load()
    assert ds.attrs["task"] == "sequence" and ds.attrs["task_options"]["ignore_index"] == -100
    assert ds.train_label.values.tolist() == [-1] * 4 and not ds.corrupt.values.any()
    keep = y != -100

    def loss_of(i):
        scores = model(x[i:i + 1])[0]
        return F.cross_entropy(scores[keep[i]], y[i][keep[i]])

    want = torch.stack([loss_of(i) for i in range(4)]).detach().numpy()
    np.testing.assert_allclose(ds.loss.values[0], want, rtol=1e-6)
    hits = ((model(x).argmax(-1) == y) & keep).sum(1).double() / keep.sum(1)
    assert ds.correct.dtype == np.float64
    np.testing.assert_allclose(ds.correct.values[0], hits.numpy())
    sq, grads = loop_sq_norms(model, loss_of, 4, LM_LAYERS)
    np.testing.assert_allclose(ds.sq_norm.values[0], sq.numpy(), rtol=1e-5)
    np.testing.assert_allclose(ds.dot_with_sum.values[0], layer_dots(grads, LM_LAYERS).numpy(), rtol=1e-5, atol=1e-9)


def test_regression_task_stores_no_correct_without_a_threshold_and_bools_with_one(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(5, 3, generator=g), torch.randn(5, 2, generator=g)
    with Recorder(tmp_path / "r.zarr", model, train_inputs=x, train_targets=y, train_ids=np.arange(5),
                  task="regression", coords_per_layer=0, background=False) as rec:
        rec.record_now(0, model)
    ds = open_run(tmp_path / "r.zarr").load()
    assert ds.attrs["task"] == "regression" and "correct" not in ds
    layers = {"0": ["0.weight", "0.bias"], "2": ["2.weight", "2.bias"]}

    def loss_of(i):
        return ((model(x[i:i + 1]) - y[i:i + 1]) ** 2).mean()

    np.testing.assert_allclose(ds.loss.values[0], torch.stack([loss_of(i) for i in range(5)]).detach().numpy(),
                               rtol=1e-6)
    np.testing.assert_allclose(ds.sq_norm.values[0], loop_sq_norms(model, loss_of, 5, layers)[0].numpy(), rtol=1e-5)
    with Recorder(tmp_path / "t.zarr", model, train_inputs=x, train_targets=y, train_ids=np.arange(5),
                  task=Regression(threshold=0.8), coords_per_layer=0, background=False) as rec:
        rec.record_now(0, model)
    ds = open_run(tmp_path / "t.zarr").load()
    want = ((model(x) - y).abs() <= 0.8).all(1)
    assert ds.correct.dtype == bool and ds.correct.values[0].tolist() == want.tolist()


def test_custom_task_uses_its_loss_and_its_correctness(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2))
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(4, 3, generator=g), torch.randn(4, generator=g)

    def loss_fn(out, target):
        return F.softplus(out[:, 0] - target) + out[:, 1] ** 2

    def close(out, target):
        return torch.sigmoid(-(out[:, 0] - target).abs())

    with Recorder(tmp_path / "c.zarr", model, train_inputs=x, train_targets=y, train_ids=np.arange(4),
                  task=Custom(loss_fn, close, correct="fraction"), coords_per_layer=0, background=False) as rec:
        rec.record_now(0, model)
    ds = open_run(tmp_path / "c.zarr").load()
    assert ds.attrs["task"] == "custom"
    np.testing.assert_allclose(ds.loss.values[0], loss_fn(model(x), y).detach().numpy(), rtol=1e-6)
    np.testing.assert_allclose(ds.correct.values[0], close(model(x), y).detach().double().numpy(), rtol=1e-6)


def test_a_classification_store_says_so_and_resume_refuses_another_task(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4))
    x, y = torch.randn(3, 3), torch.tensor([0, 1, 3])
    kw = dict(train_inputs=x, train_targets=y, train_ids=np.arange(3), coords_per_layer=0, background=False)
    Recorder(tmp_path / "a.zarr", model, **kw).close()
    attrs = open_run(tmp_path / "a.zarr").attrs
    assert attrs["task"] == "classification" and attrs["measurement"] == {"mode": "eval", "bn_priming": None}
    with pytest.raises(StoreError, match="the task"):
        Recorder(tmp_path / "a.zarr", model, task="custom", loss_fn=lambda o, t: o.sum(1), **kw)


BAD = [
    ("sequence outputs 2-d", dict(task="sequence"), CaptureError, ["train_inputs", "(examples, positions, vocabulary)"]),
    ("classification of token scores", dict(model=TinyLM, train_inputs=_lm_data()[0], train_targets=_lm_data()[1]),
     CaptureError, ["train_inputs", "(examples, classes)", "task='sequence'"]),
    ("sequence targets of another length", dict(model=TinyLM, task="sequence", train_inputs=_lm_data()[0],
                                                train_targets=_lm_data()[1][:, :3]), StoreError,
     ["train_targets", "3 positions", "5"]),
    ("sequence row without counted tokens", dict(model=TinyLM, task="sequence", train_inputs=_lm_data()[0],
                                                 train_targets=torch.full((4, T), -100)), StoreError,
     ["train_targets", "row 0", "ignore_index"]),
    ("sequence token out of range", dict(model=TinyLM, task="sequence", train_inputs=_lm_data()[0],
                                         train_targets=torch.full((4, T), V)), StoreError, ["[0, 7)"]),
    ("regression integer targets", dict(task="regression", train_targets=torch.tensor([0, 1, 2])), StoreError,
     ["train_targets", "floating-point"]),
    ("regression of another shape", dict(task="regression", train_targets=torch.randn(3, 2)), StoreError,
     ["train_targets", "(3, 4)"]),
    ("train_true outside classification", dict(task="regression", train_targets=torch.randn(3, 4),
                                               train_true=[0, 1, 2]), StoreError, ["train_true", "regression"]),
    ("unknown task", dict(task="ranking"), StoreError, ["ranking", "classification"]),
    ("custom without a loss", dict(task="custom"), StoreError, ["loss_fn"]),
]


@pytest.mark.parametrize(("case", "changes", "error", "words"), BAD, ids=[b[0] for b in BAD])
def test_outputs_and_targets_that_do_not_fit_the_task_are_refused_in_one_line(tmp_path, case, changes, error, words):
    changes = dict(changes)
    torch.manual_seed(0)
    model = changes.pop("model", lambda: nn.Sequential(nn.Linear(3, 4)))()
    kw = dict(train_inputs=torch.randn(3, 3), train_targets=torch.tensor([0, 1, 3]), train_ids=np.arange(3),
              coords_per_layer=0, background=False)
    kw.update(changes)
    kw["train_ids"] = np.arange(len(kw["train_targets"]))
    with pytest.raises(error) as err:
        Recorder(tmp_path / "bad.zarr", model, **kw)
    assert isinstance(err.value, GradstoreError)
    text = str(err.value)
    assert "\n" not in text
    for word in words:
        assert word in text, (case, text)
    assert not (tmp_path / "bad.zarr").exists()


def test_sequence_task_takes_hugging_face_style_outputs():
    class Out:
        def __init__(self, logits):
            self.logits = logits

    task = Sequence()
    scores = torch.randn(2, 3, 4, requires_grad=True)
    y = torch.tensor([[0, 1, -100], [3, 3, 3]])
    np.testing.assert_allclose(task.loss(Out(scores), y).detach().numpy(), task.loss(scores, y).detach().numpy())
    assert task.correct(Out(scores), y).tolist() == task.correct(scores, y).tolist()


def test_classification_reads_the_logits_of_a_structured_output(tmp_path):
    class Out:
        def __init__(self, logits):
            self.logits = logits

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.lin = nn.Linear(3, 4)

        def forward(self, x):
            return Out(self.lin(x))

    model = Wrapped()
    x, y = torch.randn(3, 3), torch.tensor([0, 1, 3])
    with Recorder(tmp_path / "o.zarr", model, train_inputs=x, train_targets=y, train_ids=np.arange(3),
                  coords_per_layer=0, background=False) as rec:
        rec.record_now(0, model)
    ds = open_run(tmp_path / "o.zarr").load()
    logits = model.lin(x)
    np.testing.assert_allclose(ds.loss.values[0], F.cross_entropy(logits, y, reduction="none").detach().numpy(),
                               rtol=1e-6)
    assert ds.correct.values[0].tolist() == (logits.argmax(1) == y).tolist()
