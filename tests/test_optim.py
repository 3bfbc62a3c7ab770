"""Winsorized SGD, M3, RM3 and RA3 against independent computations (numpy order statistics,
hand-made gradients, torch.func per-example gradients, torch.optim.SGD)."""

import io
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from gradstore.errors import GradstoreError
from pipelines.models import build_model
from pipelines.optim import M3, RA3, RM3, WinsorizedSGD, median_of_three, winsorized_mean
from pipelines.train import per_example_loss


def winsorized_oracle(values: np.ndarray, c: int) -> np.ndarray:
    """Sort each column, overwrite the c lowest/highest by the (c+1)-th lowest/highest, average."""
    s = np.sort(values, axis=0).astype(np.float64)
    m = s.shape[0]
    if c:
        s[:c] = s[c]
        s[m - c:] = s[m - 1 - c]
    return s.mean(0)


def row_model(d: int) -> nn.Linear:
    """Linear(d, 1) without bias: with loss = output, example n's gradient is its input row x_n."""
    model = nn.Linear(d, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    return model


def output_as_loss(outputs, targets):
    return outputs[:, 0]


# --- the combining functions -------------------------------------------------------------------


def test_median_of_three_matches_numpy_and_sum_minus_min_max():
    gen = torch.Generator().manual_seed(0)
    a, b, c = (torch.randint(-3, 4, (500,), generator=gen).double() for _ in range(3))  # many ties
    stacked = np.stack([a.numpy(), b.numpy(), c.numpy()])
    expected = np.median(stacked, axis=0)
    assert np.array_equal(median_of_three(a, b, c).numpy(), expected)
    assert np.array_equal((a + b + c - torch.minimum(torch.minimum(a, b), c) - torch.maximum(torch.maximum(a, b), c)).numpy(), expected)
    # symmetric in its arguments
    assert torch.equal(median_of_three(c, a, b), median_of_three(a, b, c))


@pytest.mark.parametrize("m, c", [(5, 0), (5, 1), (5, 2), (9, 4), (17, 2), (17, 8), (100, 8)])
def test_winsorized_mean_matches_sort_oracle(m, c):
    rng = np.random.default_rng(m * 31 + c)
    values = rng.standard_normal((m, 40)).astype(np.float32)
    values[:, :10] = rng.integers(-2, 3, (m, 10))  # ties
    got = winsorized_mean(torch.from_numpy(values), c).numpy()
    np.testing.assert_allclose(got, winsorized_oracle(values, c), rtol=1e-6, atol=1e-6)
    # along another dimension
    got_t = winsorized_mean(torch.from_numpy(values.T.copy()), c, dim=1).numpy()
    np.testing.assert_allclose(got_t, got, rtol=1e-6, atol=1e-7)


def test_winsorized_mean_clips_outliers_by_hand():
    column = torch.tensor([[-100.0], [1.0], [2.0], [3.0], [50.0]])
    assert winsorized_mean(column, 0).item() == pytest.approx(-44.0 / 5)
    assert winsorized_mean(column, 1).item() == pytest.approx((1 + 1 + 2 + 3 + 3) / 5)
    assert winsorized_mean(column, 2).item() == pytest.approx(2.0)  # the median


def test_winsorized_mean_needs_2c_plus_1_rows():
    with pytest.raises(GradstoreError, match="at least 5 rows"):
        winsorized_mean(torch.zeros(4, 3), 2)


# --- optimizers computing their own gradient, on hand-made per-example gradients ---------------


def test_winsorized_sgd_on_hand_made_gradients():
    rng = np.random.default_rng(1)
    rows = rng.standard_normal((11, 6)).astype(np.float32)
    rows[3, 2] = 40.0  # an outlier the winsorization must clip
    for c in (0, 1, 3, 5):
        model = row_model(6)
        opt = WinsorizedSGD(model.parameters(), lr=0.5, c=c)
        opt.batch_gradient(model, output_as_loss, torch.from_numpy(rows), None)
        opt.step()
        np.testing.assert_allclose(model.weight.detach().numpy()[0], -0.5 * winsorized_oracle(rows, c), rtol=1e-5, atol=1e-6)


def test_m3_on_hand_made_gradients():
    rng = np.random.default_rng(2)
    rows = rng.standard_normal((10, 7)).astype(np.float32)  # groups of 4, 3, 3 (tensor_split)
    groups = [rows[:4], rows[4:7], rows[7:]]
    expected = np.median(np.stack([g.mean(0) for g in groups]), axis=0)
    model = row_model(7)
    opt = M3(model.parameters(), lr=0.25)
    loss = opt.batch_gradient(model, output_as_loss, torch.from_numpy(rows), torch.zeros(10))
    assert loss.item() == pytest.approx(0.0)  # weights start at zero
    opt.step()
    np.testing.assert_allclose(model.weight.detach().numpy()[0], -0.25 * expected, rtol=1e-5, atol=1e-6)


def small_mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))


def batches(n_steps: int, m: int = 10):
    gen = torch.Generator().manual_seed(5)
    return [(torch.randn(m, 12, generator=gen), torch.randint(0, 3, (m,), generator=gen)) for _ in range(n_steps)]


def test_winsorized_c0_is_sgd_on_the_mean_loss():
    a, b = small_mlp(0), small_mlp(0)
    wins = WinsorizedSGD(a.parameters(), lr=0.3, c=0)
    sgd = torch.optim.SGD(b.parameters(), lr=0.3)
    for x, y in batches(8):
        wins.zero_grad()
        wins.batch_gradient(a, per_example_loss, x, y)
        wins.step()
        sgd.zero_grad()
        per_example_loss(b(x), y).mean().backward()
        sgd.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
    assert not torch.equal(a[1].weight, small_mlp(0)[1].weight)  # it did move


def test_winsorized_sgd_matches_vmap_per_example_gradients_and_numpy():
    """Several steps with c = 2 against torch.func per-example gradients + the numpy oracle."""
    model = small_mlp(3)
    ref = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = WinsorizedSGD(model.parameters(), lr=0.2, c=2)
    skeleton = small_mlp(3)

    def loss_one(params, x, y):
        return per_example_loss(functional_call(skeleton, params, (x[None],)), y[None])[0]

    for x, y in batches(3, m=9):
        g = vmap(grad(loss_one), in_dims=(None, 0, 0))(ref, x, y)
        ref = {k: v - 0.2 * torch.from_numpy(winsorized_oracle(g[k].numpy().reshape(9, -1), 2)).float().reshape(v.shape)
               for k, v in ref.items()}
        opt.batch_gradient(model, per_example_loss, x, y)
        opt.step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), ref[name], rtol=1e-5, atol=1e-6)


def test_step_without_batch_gradient_is_refused():
    model = small_mlp(0)
    for opt in (WinsorizedSGD(model.parameters(), lr=0.1, c=1), M3(model.parameters(), lr=0.1)):
        with pytest.raises(GradstoreError, match="batch_gradient"):
            opt.step()


def test_batches_too_small_are_refused():
    model = small_mlp(0)
    x, y = batches(1, m=4)[0]
    with pytest.raises(GradstoreError, match="at least 5 examples"):
        WinsorizedSGD(model.parameters(), lr=0.1, c=2).batch_gradient(model, per_example_loss, x, y)
    with pytest.raises(GradstoreError, match=">= 3 examples"):
        M3(model.parameters(), lr=0.1).batch_gradient(model, per_example_loss, x[:2], y[:2])


def test_parameters_of_another_model_are_refused():
    opt = WinsorizedSGD(small_mlp(0).parameters(), lr=0.1, c=1)
    x, y = batches(1)[0]
    with pytest.raises(GradstoreError, match="not one of the model's"):
        opt.batch_gradient(small_mlp(0), per_example_loss, x, y)


# --- RM3 / RA3 on hand-made gradients ------------------------------------------------------------


def run_recent(cls, grads, lr=0.5):
    p = nn.Parameter(torch.zeros(len(grads[0])))
    opt = cls([p], lr=lr)
    trail = []
    for g in grads:
        p.grad = torch.tensor(g)
        opt.step()
        trail.append(p.detach().clone().numpy())
    return trail


GRADS = [[1.0, -2.0, 0.0], [3.0, 5.0, 0.0], [2.0, 4.0, 7.0], [-1.0, 4.0, 7.0], [10.0, 0.0, 1.0]]


@pytest.mark.parametrize("cls, combine", [(RM3, lambda s: np.median(s, axis=0)), (RA3, lambda s: np.mean(s, axis=0))])
def test_last_three_schedule_and_direction(cls, combine):
    trail = run_recent(cls, GRADS)
    g = np.array(GRADS, dtype=np.float32)
    # no update on steps 1 and 2
    assert np.array_equal(trail[0], np.zeros(3)) and np.array_equal(trail[1], np.zeros(3))
    expected = np.zeros(3)
    for t in range(2, len(GRADS)):  # step t + 1 uses gradients t, t-1, t-2
        expected = expected - 0.5 * combine(g[t - 2:t + 1])
        np.testing.assert_allclose(trail[t], expected, rtol=1e-6, atol=1e-6)


def test_rm3_state_dict_round_trip():
    p = nn.Parameter(torch.zeros(3))
    opt = RM3([p], lr=0.5)
    for g in GRADS[:2]:
        p.grad = torch.tensor(g)
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    q = nn.Parameter(p.detach().clone())
    restored = RM3([q], lr=0.5)
    restored.load_state_dict(torch.load(buf, weights_only=True))
    for g in GRADS[2:]:
        p.grad, q.grad = torch.tensor(g), torch.tensor(g)
        opt.step()
        restored.step()
        assert torch.equal(p, q)
    assert not torch.equal(p, torch.zeros(3))


def test_winsorized_state_dict_keeps_c_and_lr():
    model = small_mlp(0)
    opt = WinsorizedSGD(model.parameters(), lr=0.3, c=4)
    other = WinsorizedSGD(model.parameters(), lr=0.1, c=1)
    other.load_state_dict(opt.state_dict())
    assert other.param_groups[0]["lr"] == 0.3 and other.param_groups[0]["c"] == 4
    # the loaded c is the one used: a batch of 8 is too small for c = 4
    x, y = batches(1, m=8)[0]
    with pytest.raises(GradstoreError, match="at least 9 examples"):
        other.batch_gradient(model, per_example_loss, x, y)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda ps: WinsorizedSGD(ps, lr=0.1, c=-1), "integer >= 0"),
        (lambda ps: WinsorizedSGD(ps, lr=0.1, c=1.5), "integer >= 0"),
        (lambda ps: WinsorizedSGD(ps, lr=0.1, c=True), "integer >= 0"),
        (lambda ps: WinsorizedSGD(ps, lr=0.0, c=1), "positive"),
        (lambda ps: M3(ps, lr=-1.0), "positive"),
        (lambda ps: RM3(ps, lr=math.nan), "positive"),
        (lambda ps: RA3(ps, lr=math.inf), "positive"),
    ],
)
def test_bad_arguments_are_rejected(make, match):
    with pytest.raises(GradstoreError, match=match):
        make(small_mlp(0).parameters())


# --- through the training loop ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_data(mnist_subset):
    from pipelines.train import TrainData

    data = TrainData.from_mnist(mnist_subset, noise=0.5, seed=0)
    keep = slice(0, 600)
    return TrainData(data.x_train[keep], data.y_train[keep], data.y_true[keep], data.corrupt[keep],
                     data.train_ids[keep], data.x_test[:200], data.y_test[:200], data.test_ids[:200], data.noise)


def test_train_with_winsorized_c0_equals_sgd(tiny_data):
    from pipelines.train import TrainConfig, train

    base = dict(model="mlp-3x256", noise=0.5, steps=4, eval_every=4, batch_size=20)
    sgd = train(TrainConfig(**base), tiny_data)
    wins = train(TrainConfig(**base, optimizer="winsorized-sgd", optimizer_options={"c": 0}), tiny_data)
    for a, b in zip(sgd.model.parameters(), wins.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name, options", [("winsorized-sgd", {"c": 2}), ("m3", {}), ("rm3", {}), ("ra3", {})])
def test_train_runs_each_optimizer_deterministically(tiny_data, name, options):
    from pipelines.train import TrainConfig, train

    cfg = dict(model="mlp-3x256", noise=0.5, steps=4, eval_every=2, batch_size=10, optimizer=name, optimizer_options=options)
    a, b = train(TrainConfig(**cfg), tiny_data), train(TrainConfig(**cfg), tiny_data)
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(pa, pb)
    assert all(math.isfinite(r["train_loss"]) for r in a.history)
    initial = build_model("mlp-3x256", seed=0)
    assert any(not torch.equal(p, q) for p, q in zip(a.model.parameters(), initial.parameters()))


def test_train_rejects_unknown_optimizer_options(tiny_data):
    from pipelines.train import TrainConfig, train

    with pytest.raises(GradstoreError, match="optimizer_options"):
        train(TrainConfig(model="mlp-3x256", steps=1, optimizer="m3", optimizer_options={"c": 1}), tiny_data)


@pytest.mark.parametrize("name", ["rm3", "m3"])
def test_resumed_training_matches_a_straight_run(tiny_data, tmp_path, name):
    """RM3's remembered gradients travel in the checkpoint: a run killed after step 2 resumes exactly."""
    from pipelines.train import TrainConfig, train

    cfg = dict(model="mlp-3x256", noise=0.5, eval_every=2, batch_size=10, optimizer=name)
    straight = train(TrainConfig(steps=5, **cfg), tiny_data)
    ckpt = tmp_path / "ckpt.pt"
    train(TrainConfig(steps=2, **cfg), tiny_data, checkpoint=ckpt, checkpoint_every=2)
    state = torch.load(ckpt, weights_only=False)
    state["config"]["steps"] = 5  # the same run, configured for 5 steps
    torch.save(state, ckpt)
    resumed = train(TrainConfig(steps=5, **cfg), tiny_data, checkpoint=ckpt)
    for a, b in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
