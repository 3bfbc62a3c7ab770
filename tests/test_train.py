"""The training loop: it learns, it is deterministic, it resumes, and it records learned times."""

import numpy as np
import pytest
import torch

from gradstore.errors import GradstoreError
from pipelines.train import LearnedTimes, TrainConfig, TrainData, evaluate, train


@pytest.fixture(scope="module")
def clean_data(mnist_subset):
    return TrainData.from_mnist(mnist_subset, noise=0.0, seed=0)


def test_short_run_learns_mnist(clean_data):
    """Coherent Gradients MLP, SGD lr 0.1 batch 100, 300 steps on the bundled subset at 0% noise."""
    result = train(TrainConfig(steps=300, eval_every=100), clean_data)
    assert [row["step"] for row in result.history] == [0, 100, 200, 300]
    assert result.history[0]["test_acc"] < 0.3  # untrained
    assert result.final["test_acc"] > 0.90
    assert result.final["train_acc"] == result.final["train_true_acc"]  # no noise
    assert np.isnan(result.final["corrupt_acc"])  # no corrupt examples at 0% noise


def test_metrics_and_learned_times_on_noisy_labels(mnist_subset):
    data = TrainData.from_mnist(mnist_subset, noise=0.5, seed=0)
    result = train(TrainConfig(noise=0.5, steps=100, eval_every=50), data)
    final = result.final
    # Direct recomputation of the split accuracies from the model's predictions.
    with torch.no_grad():
        pred = result.model.eval()(data.x_train).argmax(1)
    correct = (pred == data.y_train).numpy()
    corrupt = data.corrupt.numpy()
    assert final["pristine_acc"] == pytest.approx(correct[~corrupt].mean(), abs=1e-6)
    assert final["corrupt_acc"] == pytest.approx(correct[corrupt].mean(), abs=1e-6)
    assert final["pristine_acc"] > final["corrupt_acc"]  # pristine examples are learned first
    learned = result.learned
    assert set(np.unique(learned.first_learned)) <= {-1, 0, 50, 100}
    # Examples correct now have a current run that started no earlier than their first success.
    assert np.array_equal(learned.run_start >= 0, correct)
    assert np.all(learned.run_start[correct] >= learned.first_learned[correct])


def test_learned_times_bookkeeping():
    lt = LearnedTimes.empty(3)
    lt.update(0, np.array([True, False, False]))
    lt.update(10, np.array([False, True, False]))
    lt.update(20, np.array([True, True, False]))
    assert lt.first_learned.tolist() == [0, 10, -1]
    assert lt.run_start.tolist() == [20, 10, -1]


def test_deterministic_and_resumable(clean_data, tmp_path):
    cfg = TrainConfig(steps=60, eval_every=20)
    straight = train(cfg, clean_data)
    ckpt = tmp_path / "ckpt.pt"
    half = TrainConfig(steps=60, eval_every=20)
    # Simulate a kill after step 40: train with a checkpoint, then truncate the run there.
    train(TrainConfig(steps=40, eval_every=20), clean_data, checkpoint=ckpt, checkpoint_every=20)
    state = torch.load(ckpt, weights_only=False)
    state["config"]["steps"] = 60  # the same run, configured for 60 steps
    torch.save(state, ckpt)
    resumed = train(half, clean_data, checkpoint=ckpt)
    for a, b in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    assert [r["step"] for r in resumed.history] == [0, 20, 40, 60]
    assert resumed.final == pytest.approx(straight.final, rel=0, abs=0, nan_ok=True)


def test_checkpoint_of_another_configuration_is_refused(clean_data, tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    train(TrainConfig(steps=5, eval_every=5), clean_data, checkpoint=ckpt, checkpoint_every=5)
    with pytest.raises(GradstoreError, match="another configuration"):
        train(TrainConfig(steps=5, eval_every=5, lr=0.05), clean_data, checkpoint=ckpt)


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(noise=1.5), "noise"),
        (dict(lr=-1.0), "learning rate"),
        (dict(batch_size=0), "batch_size"),
        (dict(optimizer="adam9"), "unknown optimizer"),
    ],
)
def test_bad_configuration(bad, match):
    with pytest.raises(GradstoreError, match=match):
        TrainConfig(**bad).validate()


def test_evaluate_restores_training_mode(clean_data):
    from pipelines.models import build_model

    model = build_model("cnn-bn").train()
    evaluate(model, clean_data)
    assert model.training


class _Watcher:
    """An observer wanting fixed steps; keeps the metrics it is called with."""

    def __init__(self, steps):
        self.steps, self.seen = set(steps), {}

    def wants(self, step):
        return step in self.steps

    def __call__(self, step, model, metrics):
        self.seen[step] = dict(metrics)


@pytest.mark.parametrize("evaluate_captures", [True, False])
def test_captures_are_evaluated_only_when_asked(clean_data, evaluate_captures):
    watcher = _Watcher([0, 3, 10, 13])
    result = train(TrainConfig(steps=20, eval_every=10, evaluate_captures=evaluate_captures), clean_data,
                   observers=[watcher])
    evaluated = [0, 3, 10, 13, 20] if evaluate_captures else [0, 10, 20]
    assert [row["step"] for row in result.history] == evaluated
    assert sorted(watcher.seen) == [0, 3, 10, 13]
    for step, metrics in watcher.seen.items():  # an observer gets the evaluation exactly where one ran
        assert ("train_acc" in metrics) == (step in evaluated), (step, metrics)
        assert metrics["step"] == step and metrics["lr"] == 0.1


def test_checkpoint_written_before_evaluate_captures_existed_resumes(clean_data, tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    train(TrainConfig(steps=5, eval_every=5), clean_data, checkpoint=ckpt, checkpoint_every=5)
    state = torch.load(ckpt, weights_only=False)
    del state["config"]["evaluate_captures"]  # as an older version wrote it
    state["config"]["steps"] = 10
    torch.save(state, ckpt)
    resumed = train(TrainConfig(steps=10, eval_every=5), clean_data, checkpoint=ckpt)
    assert [r["step"] for r in resumed.history] == [0, 5, 10]
    with pytest.raises(GradstoreError, match="another configuration"):  # the old value was True
        train(TrainConfig(steps=10, eval_every=5, evaluate_captures=False), clean_data, checkpoint=ckpt)
