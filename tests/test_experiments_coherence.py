"""The ``easy-hard`` and ``coherence-evolution`` experiments: helpers, and each ``--quick`` run end to end
with its outputs checked against independent computations from the stored data."""

import csv
import json

import numpy as np
import pytest
import torch
from torch import nn

from pipelines.experiments import coherence_evolution as ce
from pipelines.experiments import easy_hard as eh
from pipelines.train import LearnedTimes


# ------------------------------------------------------------------------------------------ helpers
def test_capture_steps_dense_first_epoch_then_one_per_epoch():
    assert ce.capture_steps(10, 3, 4) == [0, 4, 8, 10, 20, 30]
    assert ce.capture_steps(5, 2, 1) == [0, 1, 2, 3, 4, 5, 10]


def test_easy_masks_rules():
    learned = LearnedTimes(first_learned=np.array([0, 50, 100, -1, 20]), run_start=np.array([0, -1, 100, -1, 80]))
    masks = eh.easy_masks(learned, ["snapshot", "first_learned"], learned_by=50)
    np.testing.assert_array_equal(masks["snapshot"], [True, False, True, False, True])
    np.testing.assert_array_equal(masks["first_learned"], [True, True, False, False, True])


def test_fit_and_holdout_equal_fit_sizes_disjoint_within_group():
    easy = np.zeros(100, bool)
    easy[:70] = True
    parts = eh.fit_and_holdout(easy, 0.5, seed=3)
    assert len(parts["easy"][0]) == len(parts["hard"][0]) == 15  # half of the smaller group (30)
    for group, members in (("easy", np.arange(70)), ("hard", np.arange(70, 100))):
        fit, held = parts[group]
        assert not set(fit) & set(held)
        np.testing.assert_array_equal(np.sort(np.concatenate([fit, held])), members)


def test_bad_config_is_one_clear_error():
    from gradstore.errors import GradstoreError
    from pipelines.experiments.config import load_config

    config = load_config("easy-hard", quick=True)
    config["split"] = {**config["split"], "learned_by": config["steps"] + 1}
    with pytest.raises(GradstoreError, match="learned_by"):
        eh.check_config(config)
    config = load_config("coherence-evolution", quick=True)
    config["capture"] = {**config["capture"], "first_epoch_every": 0}
    with pytest.raises(GradstoreError, match="first_epoch_every"):
        ce.check_config(config)


class _Spy:
    """A stand-in Recorder that notes the BatchNorm statistics and mode it sees."""

    def __init__(self, bn):
        self.bn, self.seen = bn, []

    def wants(self, step):
        return step == 3

    def __call__(self, step, model, metrics=None):
        self.seen.append((step, self.bn.running_mean.clone(), self.bn.running_var.clone()))


def test_primed_recorder_primes_then_restores_batchnorm(tmp_path):
    from gradstore.record import Recorder, Schedule

    torch.manual_seed(0)
    conv, bn = nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3)
    model = nn.Sequential(conv, bn, nn.Flatten())
    bn.running_mean.fill_(5.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [torch.randn(8, 1, 6, 6) for _ in range(3)]
    spy = _Spy(bn)
    recorder = Recorder(tmp_path / "s.zarr", model, train_inputs=batches[0][:2], train_targets=torch.tensor([0, 1]),
                        train_ids=[0, 1], schedule=Schedule.at([3]), coords_per_layer=0, prime_batches=batches)
    capture = recorder.step_capture

    def spying(model, reducer, step):  # notes the statistics the capture runs with
        spy(step, model)
        return capture(model, reducer, step)

    recorder.step_capture = spying
    model.train()
    with recorder:
        assert not recorder.maybe_record(2, model)  # not scheduled: nothing happens
        assert recorder.maybe_record(3, model)
    assert [s for s, *_ in spy.seen] == [3]
    # independent: equal-weight average over the passes of the per-pass channel mean / unbiased variance
    with torch.no_grad():
        outs = [conv(x) for x in batches]
    mean = torch.stack([o.mean((0, 2, 3)) for o in outs]).mean(0)
    var = torch.stack([o.transpose(0, 1).reshape(3, -1).var(1, unbiased=True) for o in outs]).mean(0)
    torch.testing.assert_close(spy.seen[0][1], mean)
    torch.testing.assert_close(spy.seen[0][2], var)
    for key, value in model.state_dict().items():  # the training run's statistics are back
        torch.testing.assert_close(value, before[key])
    assert model.training and bn.momentum == 0.1


# ------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def easy_hard_run(tmp_path_factory):
    from pipelines.cli import main

    out = tmp_path_factory.mktemp("eh") / "run"
    main(["run", "easy-hard", "--quick", "--no-progress", "--out", str(out)])
    return out


@pytest.fixture(scope="module")
def coherence_run(tmp_path_factory):
    from pipelines.cli import main

    out = tmp_path_factory.mktemp("ce") / "run"
    main(["run", "coherence-evolution", "--quick", "--no-progress", "--out", str(out)])
    return out


def _read_csv(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_easy_hard_quick_outputs(easy_hard_run):
    out = easy_hard_run
    report = (out / "report.md").read_text()
    assert "## Claims tested" in report and "held-out" in report
    for name in ("heldout_accuracy.png", "coherence_snapshot.png", "phase1/store.zarr", "coherence_by_step.csv"):
        assert (out / name).exists(), name
    summary = json.loads((out / "summary.json").read_text())
    (split,) = summary["split"]
    assert split["n_easy"] + split["n_hard"] == 10000 and 0 < split["n_hard"] < split["n_easy"]
    rows = summary["heldout"]
    assert {r["trained_on"] for r in rows} == {"easy", "hard"}
    assert rows[0]["n_fit"] == rows[1]["n_fit"] == int(0.5 * split["n_hard"])
    for r in rows:
        for key in ("fit_acc", "test_acc", "held_easy_acc", "held_hard_acc"):
            assert 0.0 <= r[key] <= 1.0
        # each group's held-out part is the group less its fit part
        assert r["held_easy_n"] + r["held_hard_n"] + 2 * r["n_fit"] == 10000
        assert r["held_easy_correct"] == round(r["held_easy_acc"] * r["held_easy_n"])
    for r in summary["coherence"]:
        assert r["m_easy"] + r["m_hard"] == 200
        assert 0 <= r["m_coherence_easy"] <= r["m_easy"] and 0 <= r["m_coherence_hard"] <= r["m_hard"]
        assert -1 <= r["alpha_across"] <= 1 and 0 < r["gap_p"] <= 1


def test_easy_hard_coherence_matches_the_stored_gram(easy_hard_run):
    """Within-group m-coherence recomputed with numpy from the raw stored gram and the learned times."""
    from gradstore.store import open_run

    out = easy_hard_run
    ds = open_run(str(out / "phase1" / "store.zarr"))
    learned = np.load(out / "phase1" / "learned_times.npz")
    easy_ids = set(learned["example_id"][learned["run_start"] >= 0].tolist())
    train = np.array([str(v) == "train" for v in ds["split"].values])
    ids = ds["example"].values[train]
    easy = np.array([i in easy_ids for i in ids])
    rows = json.loads((out / "summary.json").read_text())["coherence"]
    for row in rows:
        g = ds["gram"].sel(step=row["step"]).values.astype(np.float64).sum(0)[np.ix_(train, train)]
        for group, mask in (("easy", easy), ("hard", ~easy)):
            block = g[np.ix_(mask, mask)]
            np.testing.assert_allclose(row[f"m_coherence_{group}"], block.sum() / np.trace(block), rtol=1e-9)
        cross = g[np.ix_(easy, ~easy)]
        mean_sq = np.trace(g) / len(g)
        np.testing.assert_allclose(row["alpha_across"], cross.mean() / mean_sq, rtol=1e-9)


def test_coherence_evolution_quick_outputs(coherence_run):
    out = coherence_run
    report = (out / "report.md").read_text()
    assert "## Claims tested" in report and "real labels" in report and "rises from a low start" in report
    assert "starts high" not in report and report.startswith("**Not at the paper's settings:**")
    for name in ("m_coherence.png", "layers_cnn-bn_noise-0.00.png", "layers_cnn-bn_noise-1.00.png", "summary.csv",
                 "figure_1_cnn-bn.png", "figure_4_cnn-bn.png", "figure_5_cnn-bn.png", "figure_6_cnn-bn.png",
                 "claims.json",
                 "provenance.json"):
        assert (out / name).exists(), name
    assert all(f"figure_{k}_cnn-bn.png" in report for k in (1, 4, 5, 6)) and "figure_7" not in report
    evidence = json.loads((out / "claims.json").read_text())
    assert {"rises", "slope_falls", "peak_real", "train_over_test", "conv_over_fc"} <= set(evidence)
    # one seed: these curve statistics have no within-run test, so they are inconclusive, not read descriptively
    assert report.count("| inconclusive |") >= 5 and "--seeds >= 2" in report
    # conv over fc, recomputed from the analysis table: mean over captures after step 0 of log10(conv / fc)
    from pipelines.models import build_model

    model = build_model("cnn-bn")
    (fc,) = [name for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    table = [r for r in _read_csv(out / "cnn-bn-noise-0.00" / "analysis" / "coherence.csv")
             if r["sample"] == "tracked_train" and int(r["step"]) > 0]
    for cond in (c for c in evidence["conv_over_fc"] if c["label"].startswith("cnn-bn, 0% noise")):
        conv = cond["label"].split(", ")[-1]
        by_step = {}
        for r in table:
            by_step.setdefault(int(r["step"]), {})[r["layer"]] = float(r["m_coherence"])
        expected = np.mean([np.log10(v[conv] / v[fc]) for v in by_step.values()])
        assert cond["estimate"] == pytest.approx(expected, rel=1e-6)
    rows = json.loads((out / "summary.json").read_text())
    assert [(r["model"], r["noise"]) for r in rows] == [("cnn-bn", 0.0), ("cnn-bn", 1.0)]
    for r in rows:
        assert r["train_m"] == r["test_m"] == 100 and r["second_m"] == 200
        for key in ("train", "test"):
            values = [r[f"{key}_initial"], r[f"{key}_peak"], r[f"{key}_final"]]
            assert all(np.isfinite(values)) and all(0 <= v <= 100 for v in values)
            assert r[f"{key}_peak"] >= max(r[f"{key}_initial"], r[f"{key}_final"])
    # the same initial model and the same (true-labelled) test sample at step 0 for both noise levels
    assert rows[0]["test_initial"] == pytest.approx(rows[1]["test_initial"], rel=1e-12)
    from pipelines.experiments.config import load_config

    config = load_config("coherence-evolution", quick=True)
    table = _read_csv(out / "cnn-bn-noise-0.00" / "analysis" / "coherence.csv")
    steps = sorted({int(r["step"]) for r in table})
    per_epoch = config["train_examples"] // config["batch_size"]
    assert steps == ce.capture_steps(per_epoch, config["epochs"], config["capture"]["first_epoch_every"])
    assert [r["steps_per_epoch"] for r in rows] == [per_epoch, per_epoch]


def test_coherence_evolution_last_capture_matches_torch_func(coherence_run):
    """The stored whole-model m-coherence at the last step, recomputed from the final checkpoint with
    torch.func per-example gradients in eval mode after priming BatchNorm by hand."""
    from torch.func import functional_call, grad, vmap

    from pipelines.data import load_mnist
    from pipelines.experiments.common import tracked_indices
    from pipelines.experiments.config import load_config
    from pipelines.models import build_model
    from pipelines.train import TrainData

    out = coherence_run
    config = load_config("coherence-evolution", quick=True)
    cap = config["capture"]
    mnist = ce.subsample(load_mnist(None), config["train_examples"], config["test_examples"], config["seed"])
    data = TrainData.from_mnist(mnist, noise=0.0, seed=config["seed"])
    model = build_model("cnn-bn")
    state = torch.load(out / "cnn-bn-noise-0.00" / "checkpoint.pt", weights_only=False)
    model.load_state_dict(state["model"])
    n = len(data.y_train)
    rng = np.random.default_rng(config["seed"] + 400)
    prime = [data.x_train[np.sort(rng.choice(n, cap["prime_batch_size"], replace=False))]
             for _ in range(cap["prime_batches"])]
    # priming by hand: in training mode each BatchNorm normalizes with its batch statistics, so record
    # every BatchNorm input per pass and average the per-pass mean and unbiased variance with equal weight
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    seen = {k: [] for k in range(len(bns))}
    hooks = [b.register_forward_hook(lambda _m, inp, _o, k=k: seen[k].append(inp[0].transpose(0, 1).flatten(1)))
             for k, b in enumerate(bns)]
    model.train()
    with torch.no_grad():
        for x in prime:
            model(x)
    for h in hooks:
        h.remove()
    model.eval()
    with torch.no_grad():
        for k, b in enumerate(bns):
            b.running_mean.copy_(torch.stack([a.mean(1) for a in seen[k]]).mean(0))
            b.running_var.copy_(torch.stack([a.var(1, unbiased=True) for a in seen[k]]).mean(0))
    tr = tracked_indices(n, cap["tracked_train"], config["seed"] + 100)
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def loss(p, xi, yi):
        out_ = functional_call(model, (p, buffers), (xi[None],))
        return nn.functional.cross_entropy(out_, yi[None])

    table = _read_csv(out / "cnn-bn-noise-0.00" / "analysis" / "coherence.csv")
    last = max(int(r["step"]) for r in table)
    second = tracked_indices(n, cap["moments_examples"], config["seed"] + 300)  # Fig. 6's second sample
    assert len(second) == 2 * len(tr) and len(np.intersect1d(second, tr)) < len(tr)
    for sample, idx in (("tracked_train", tr), (ce.SECOND, second)):
        g = vmap(grad(loss), in_dims=(None, 0, 0))(params, data.x_train[idx], data.y_train[idx])
        flat = torch.cat([v.flatten(1) for v in g.values()], 1).double()
        expected = float(flat.sum(0).square().sum() / flat.square().sum())
        stored = [float(r["m_coherence"]) for r in table if int(r["step"]) == last and r["layer"] == "(model)"
                  and r["sample"] == sample]
        assert stored == [pytest.approx(expected, rel=1e-4)], sample


def test_figure_1_has_a_second_column_only_for_steps_after_the_first_epoch():
    assert ce.epoch_spans(600, 600) == [(0, 600)]  # a one-epoch run: no empty "after" column
    assert ce.epoch_spans(600, 1200) == [(0, 600), (600, None)]


def test_fig_1_draws_real_and_random_labels_and_fig_7_the_levels_between():
    assert ce.figure_levels([0.0, 0.25, 0.5, 0.75, 1.0]) == {1: [0.0, 1.0], 7: [0.25, 0.5, 0.75]}
    assert ce.figure_levels([0.0, 1.0]) == {1: [0.0, 1.0]}  # nothing between: no Fig. 7
    assert ce.figure_levels([0.25, 0.75]) == {1: [0.25, 0.75]}  # neither end: all levels in Fig. 1


def test_scaled_guide_is_the_ratio_of_expectations():
    """m-coherence ≈ 1 + (m − 1)ρ: orthogonal gradients stay at 1, identical ones scale to m."""
    assert ce.scaled_guide(np.array([1.0]), 100, 200)[0] == 1.0
    assert ce.scaled_guide(np.array([100.0]), 100, 200)[0] == pytest.approx(200.0)
    rng = np.random.default_rng(0)  # and on data: gradients with a common part, two sample sizes
    g = rng.normal(size=(40000, 50)) + 0.3
    def mcoh(x):
        return float(np.square(x.sum(0)).sum() / np.square(x).sum())
    small = np.mean([mcoh(g[i:i + 100]) for i in range(0, 20000, 100)])
    large = np.mean([mcoh(g[i:i + 200]) for i in range(20000, 40000, 200)])
    assert ce.scaled_guide(np.array([small]), 100, 200)[0] == pytest.approx(large, rel=0.05)


def test_coherence_evolution_resnet_with_user_config(tmp_path):
    """The small ResNet (BatchNorm in residual blocks and the shortcut) through a user --config file."""
    from pipelines.cli import main

    cfg = tmp_path / "tiny.toml"
    cfg.write_text('models = ["resnet-small"]\nnoise_levels = [0.5]\nepochs = 2\ntrain_examples = 200\n'
                   "test_examples = 50\n[capture]\ntracked_train = 16\ntracked_test = 8\nfirst_epoch_every = 1\n"
                   "prime_batches = 2\n")
    out = tmp_path / "run"
    main(["run", "coherence-evolution", "--quick", "--config", str(cfg), "--no-progress", "--out", str(out)])
    (row,) = json.loads((out / "summary.json").read_text())
    assert (row["model"], row["noise"], row["steps_per_epoch"]) == ("resnet-small", 0.5, 2)
    assert (row["train_m"], row["test_m"]) == (16, 8)
    table = _read_csv(out / "resnet-small-noise-0.50" / "analysis" / "coherence.csv")
    layers = {r["layer"] for r in table}
    assert {"block2.shortcut.1", "fc", "(model)"} <= layers
    assert sorted({int(r["step"]) for r in table}) == [0, 1, 2, 4]
    values = np.array([float(r["m_coherence"]) for r in table])
    m = np.array([16 if r["sample"] == "tracked_train" else 8 for r in table])
    assert np.isfinite(values).all() and (values >= 0).all() and (values <= m).all()
    assert (out / "layers_resnet-small_noise-0.50.png").exists()


def test_primed_capture_leaves_training_unchanged(tmp_path, mnist_subset):
    """Training cnn-bn with the primed Recorder gives bit-identical weights and BatchNorm statistics."""
    from dataclasses import replace

    from gradstore.store import Recorder, Schedule
    from pipelines.models import build_model
    from pipelines.train import TrainConfig, TrainData, train

    mnist = ce.subsample(mnist_subset, 300, 50, seed=0)
    data = TrainData.from_mnist(mnist, noise=0.5, seed=0)
    tc = TrainConfig(model="cnn-bn", noise=0.5, steps=4, eval_every=4, batch_size=50)
    plain = train(tc, data, model=build_model("cnn-bn")).model.state_dict()
    model = build_model("cnn-bn")
    recorder = Recorder(str(tmp_path / "s.zarr"), model, train_inputs=data.x_train[:12], train_targets=data.y_train[:12],
                        train_ids=data.train_ids[:12].numpy(), schedule=Schedule.at([0, 1, 3]), coords_per_layer=0,
                        prime_batches=[data.x_train[100:150], data.x_train[150:200]])
    with recorder:
        watched = train(replace(tc), data, model=model, observers=[recorder]).model.state_dict()
    assert recorder.committed == 3
    for key, value in plain.items():
        assert torch.equal(value, watched[key]), key


def test_alpha_parts_are_the_numerator_and_denominator_of_the_analysed_m_coherence(coherence_run):
    """Fig. 5's curves, from the raw store, times m are the m-coherence the analysis computed."""
    from pipelines.experiments.coherence_evolution import alpha_parts

    out = coherence_run
    parts = alpha_parts(out / "cnn-bn-noise-1.00" / "store.zarr")
    table = [r for r in _read_csv(out / "cnn-bn-noise-1.00" / "analysis" / "coherence.csv")
             if r["sample"] == "tracked_train" and r["layer"] == "(model)" and r["source"] == "exact"]
    by_step = {int(r["step"]): float(r["m_coherence"]) for r in table}
    assert sorted(by_step) == parts["step"].tolist()
    assert (parts["mean_gradient_sq"] > 0).all() and (parts["mean_sq_norm"] > 0).all()
    got = 100 * parts["mean_gradient_sq"] / parts["mean_sq_norm"]  # m = 100 tracked examples
    np.testing.assert_allclose(got, [by_step[s] for s in parts["step"]], rtol=1e-9)
