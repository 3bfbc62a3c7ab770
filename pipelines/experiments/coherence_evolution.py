"""``coherence-evolution`` (Making Coherence Out of Nothing At All, Chatterjee & Zielinski).

m-coherence of the whole model and of each layer against training step, at several label-noise
levels, for the small CNN (``cnn-bn``) and the small ResNet (``resnet-small``). At every capture the
BatchNorm running statistics are *primed* (reset, then averaged over a fixed set of training batches
at the current weights, :func:`gradstore.capture.bn_priming`) and per-example gradients are taken in
eval mode; the training run's own statistics are restored afterwards, so capture does not change
training. Captures run every few steps in the first epoch and once per epoch after, on a tracked
training sample and on held-out test examples (sample ``tracked_test``).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from gradstore.errors import GradstoreError
from pipelines.experiments import verdicts
from pipelines.experiments.claims import ClaimSpec, declare
from pipelines.experiments.common import (
    pyplot,
    RECORDED,
    Context,
    Figure,
    Report,
    distinct_dirs,
    dump_json,
    number_label,
    tracked_indices,
    train_recorded,
    write_csv,
)
from pipelines.experiments.runner import Outcome, bind

NAME = "coherence-evolution"
MC = "Making Coherence…"
SEEDS = "no within-run test (one seed gives no uncertainty): decided across seeds"
#: the paper's claims tested on the recorded curves (declared once; verdicts come from these)
CLAIMS = declare(
    NAME,
    ClaimSpec("rises", "Coherence rises from a low start, even with random labels", MC, "§5",
              "log10(highest whole-model m-coherence after step 0 / m-coherence at step 0), tracked training sample",
              "every capture of the run", "greater", SEEDS, verdicts.rises, margin=0.04,
              conditions="every model and noise level (a rise of at least 10%, log10 1.1 ≈ 0.04, our margin fixed "
                         "beforehand)"),
    ClaimSpec("slope_falls", "The rise is slower the more labels are noisy", MC, "§5",
              "first-epoch rise log10(m-coherence at the end of epoch 1 / at step 0) at the lower noise level minus "
              "at the next higher one", "step 0 to the end of the first epoch", "greater", SEEDS,
              verdicts.slope_falls, conditions="every model and pair of consecutive noise levels"),
    ClaimSpec("peak_real", "The coherence peak is higher and earlier with real labels than with random labels", MC,
              "§5", "log10(peak 0% / peak 100%) and log10((peak step 100% + 1) / (peak step 0% + 1))",
              "every capture of the run", "greater", SEEDS, verdicts.peak_real_vs_random,
              conditions="every model, both the height and the step"),
    ClaimSpec("train_over_test", "With random labels the training sample becomes more coherent than held-out test "
              "examples (scored on their true labels)", MC, "Fig. 4 (test coherence; our reading of it)",
              "log10(peak training-sample m-coherence / peak test-sample m-coherence) after step 0",
              "captures after step 0", "greater", SEEDS, verdicts.train_over_test, conditions="every model at 100% noise"),
    ClaimSpec("conv_over_fc", "Convolutional layers are more coherent than the fully connected one", MC, "§5",
              "mean over captures after step 0 of log10(m-coherence of the conv layer / of the FC layer)",
              "captures after step 0", "greater", SEEDS, verdicts.layers_over,
              conditions="every noise level and every conv layer of a model with one FC layer"),
)
PAPER: tuple = ()
FIXED_DEVIATIONS = ("the paper measures ResNet, Inception and EfficientNet models on ImageNet (samples of up to 50,000 "
                    "examples); here its MNIST analogue with small models",)
MODEL_LAYER = "(model)"
#: the store's sample of the second training sample (``[capture] moments_examples``, Fig. 6)
SECOND = "moments_train"


def check_config(config: dict[str, Any]) -> None:
    """One clear error for settings the experiment cannot run with."""
    cap = config["capture"]
    for key in ("epochs", "batch_size"):
        if config[key] < 1:
            raise GradstoreError(f"coherence-evolution: {key} must be >= 1, got {config[key]}")
    if cap["first_epoch_every"] < 1:
        raise GradstoreError(f"coherence-evolution: [capture] first_epoch_every must be >= 1, "
                             f"got {cap['first_epoch_every']}")
    if cap["tracked_train"] < 2 or cap["tracked_test"] < 0:
        raise GradstoreError("coherence-evolution: [capture] needs tracked_train >= 2 and tracked_test >= 0")
    if not config["models"] or not config["noise_levels"]:
        raise GradstoreError("coherence-evolution: give at least one model and one noise level")


def capture_steps(steps_per_epoch: int, epochs: int, first_epoch_every: int) -> list[int]:
    """Steps 0, every ``first_epoch_every`` steps within the first epoch, then the end of every epoch."""
    early = range(0, steps_per_epoch, first_epoch_every)
    return sorted({*early, *(e * steps_per_epoch for e in range(1, epochs + 1))})


def subsample(mnist, n_train: int, n_test: int, seed: int):
    """``mnist`` restricted to ``n_train``/``n_test`` random examples (0 keeps all)."""
    from dataclasses import replace

    tr = tracked_indices(len(mnist.train_labels), n_train, seed, key="train_examples",
                         data="training examples") if n_train else slice(None)
    te = tracked_indices(len(mnist.test_labels), n_test, seed + 1, key="test_examples",
                         data="test examples") if n_test else slice(None)
    return replace(mnist, train_images=mnist.train_images[tr], train_labels=mnist.train_labels[tr],
                   train_ids=mnist.train_ids[tr], test_images=mnist.test_images[te],
                   test_labels=mnist.test_labels[te], test_ids=mnist.test_ids[te])


def train_one(config, model_name: str, noise: float, mnist, run_dir: Path, ctx: Context):
    """Train one model at one noise level through the recorded training
    (:func:`~pipelines.experiments.common.train_recorded`) with BatchNorm primed before every capture;
    return (TrainResult, store path, steps per epoch, module kinds)."""
    cap, seed = config["capture"], config["seed"]
    n = len(mnist.train_labels)
    steps_per_epoch = n // config["batch_size"]
    if steps_per_epoch < 1:
        raise GradstoreError(f"coherence-evolution: batch_size {config['batch_size']} exceeds the {n} training examples")
    steps = capture_steps(steps_per_epoch, config["epochs"], cap["first_epoch_every"])

    def priming(data):  # the fixed training batches the Recorder primes BatchNorm on (reset, averaged)
        rng = np.random.default_rng(seed + 400)
        return [data.x_train[np.sort(rng.choice(n, min(cap["prime_batch_size"], n), replace=False))]
                for _ in range(cap["prime_batches"])]

    from gradstore.store import Schedule

    result, _, store = train_recorded(config, noise, mnist, run_dir, ctx, desc=f"{model_name}, {noise:.0%} noise",
                                      model_name=model_name, steps=steps[-1],
                                      eval_every=config["eval_every"] or steps[-1], schedule=Schedule.at(steps),
                                      prime=priming, checkpoint_every=max(steps_per_epoch, 1),
                                      evaluate_captures=config["evaluate_captures"])
    kinds = {name: type(module).__name__ for name, module in result.model.named_modules()}
    return result, store, steps_per_epoch, kinds


def analyse(store: Path, out: Path, *, replace: bool = False):
    """Exact m-coherence per (step, sample, layer) of one store, written to ``out``; returned computed.

    ``out`` is written under a temporary name and renamed when complete; with ``replace`` (a resumed
    run) an earlier analysis there is replaced, only then.
    """
    from analysis.output import write_results
    from analysis.report import analyze, open_store

    ds = open_store(store)
    counts = ds["m"].isel(step=0).max("layer").values  # a sample this run did not track has m = 0
    used = [s for s, count in zip(ds["sample"].values, counts) if count > 0]
    results = analyze(ds.sel(sample=used), metrics=("coherence",), n_permutations=0).compute()
    write_results(results, out, replace=replace)
    return results.sel(source="exact")


def summarise(model_name: str, noise: float, result, res, steps_per_epoch: int) -> dict[str, Any]:
    """Initial, peak (and its step) and final whole-model m-coherence on the train and test samples."""
    row: dict[str, Any] = {"model": model_name, "noise": noise, "steps_per_epoch": steps_per_epoch,
                           "train_acc": result.final["train_acc"], "test_acc": result.final["test_acc"]}
    steps = res["step"].values
    for sample, key in (("tracked_train", "train"), ("tracked_test", "test"), (SECOND, "second")):
        if sample not in res["sample"].values:
            continue
        mc = res["m_coherence"].sel(sample=sample, layer=MODEL_LAYER).values
        if not np.isfinite(mc).any():
            continue
        k = int(np.nanargmax(mc))
        row[f"{key}_m"] = int(res["m"].sel(sample=sample, layer=MODEL_LAYER).values[0])
        row[f"{key}_initial"], row[f"{key}_final"] = float(mc[0]), float(mc[-1])
        row[f"{key}_peak"], row[f"{key}_peak_step"] = float(mc[k]), int(steps[k])
        weights = _curve(res, sample, weights=True)
        if weights is not None and np.isfinite(weights).any():  # the whole model's weights alone (issue 15)
            row[f"{key}_weights_peak"] = float(np.nanmax(weights))
    return row


#: x label of every step axis: log scale, step 0 drawn at 0.5
STEP_AXIS = "training step (log; step 0 at 0.5)"


def on_step_axis(steps):
    """Steps as drawn on the log step axis: step 0 at 0.5."""
    return np.maximum(steps, 0.5)


def noise_panels(levels):
    """Figs. 4, 6 and the seed figure's layout: one log-log panel of whole-model m-coherence per noise
    level, side by side on a shared y axis, each with a line at 1; returns the figure and the
    (axis, noise level) pairs."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(levels), figsize=(4.6 * len(levels), 3.8), squeeze=False, sharey=True)
    for ax, noise in zip(axes[0], levels):
        ax.axhline(1, color="grey", ls="--", lw=0.8)
        ax.set(xscale="log", yscale="log", xlabel=STEP_AXIS, title=f"{noise:.0%} noise")
    axes[0][0].set_ylabel("m-coherence of the whole model")
    return fig, list(zip(axes[0], levels))


def layer_figure(res, kinds: dict[str, str], path: Path, *, title: str) -> None:
    """m-coherence against step per layer (log-log), train and test panels, lines at 1 and m."""
    from analysis.plots import save

    plt = pyplot()
    samples = [s for s in ("tracked_train", "tracked_test") if s in res["sample"].values]
    fig, axes = plt.subplots(1, len(samples), figsize=(6.2 * len(samples), 4.4), squeeze=False, sharey=True)
    steps = on_step_axis(res["step"].values)
    layers = [str(v) for v in res["layer"].values if str(v) != MODEL_LAYER]
    colors = plt.get_cmap("viridis")(np.linspace(0, 0.9, max(len(layers), 1)))
    for ax, sample in zip(axes[0], samples):
        mc = res["m_coherence"].sel(sample=sample)
        for color, layer in zip(colors, layers):
            ax.plot(steps, mc.sel(layer=layer), color=color, lw=1, label=f"{layer} ({kinds.get(layer, '?')})")
        ax.plot(steps, mc.sel(layer=MODEL_LAYER), color="crimson", lw=2.2, label="whole model")
        m = int(res["m"].sel(sample=sample, layer=MODEL_LAYER).values[0])
        ax.axhline(1, color="grey", ls="--", lw=0.8, label="1 (orthogonal)")
        ax.axhline(m, color="black", ls=":", lw=0.8, label=f"m = {m} (identical)")
        ax.set(xscale="log", yscale="log", xlabel=STEP_AXIS,
               title=f"{'training' if sample == 'tracked_train' else 'held-out test'} sample (m = {m})")
    axes[0][0].set_ylabel("m-coherence")
    axes[0][-1].legend(fontsize=6, loc="best")
    fig.suptitle(title)
    save(fig, path, dpi=110)


def summary_figure(models, noise_levels, results: dict, path: Path) -> None:
    """Whole-model m-coherence against step: one panel per model, a colour per noise level,
    solid for the training sample and dashed for the held-out test sample."""
    from analysis.plots import save

    plt = pyplot()
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.2), squeeze=False)
    for ax, model_name in zip(axes[0], models):
        m = 1
        for k, noise in enumerate(noise_levels):
            res = results[(model_name, noise)]
            steps = on_step_axis(res["step"].values)
            for sample, ls in (("tracked_train", "-"), ("tracked_test", "--")):
                if sample in res["sample"].values:
                    ax.plot(steps, res["m_coherence"].sel(sample=sample, layer=MODEL_LAYER), ls=ls, color=f"C{k}",
                            label=f"{noise:.0%} noise, {'train' if sample == 'tracked_train' else 'test'}")
                    m = max(m, int(res["m"].sel(sample=sample, layer=MODEL_LAYER).values[0]))
        ax.axhline(1, color="grey", ls="--", lw=0.8)
        ax.axhline(m, color="black", ls=":", lw=0.8)
        ax.set(xscale="log", yscale="log", xlabel=STEP_AXIS,
               ylabel="m-coherence of the whole model", title=f"{model_name} (lines at 1 and m = {m})")
        ax.legend(fontsize=7)
    save(fig, path, dpi=110)


def alpha_parts(store: Path, sample: str = "tracked_train") -> dict[str, np.ndarray]:
    """The numerator and denominator of alpha of the whole model against step, from the raw store:
    ``mean_gradient_sq`` = ||E g||² = ||Σ g||²/m² and ``mean_sq_norm`` = E||g||² = Σ||g||²/m, of the
    whole model as :func:`analysis.sources.layer_moments` sums it; alpha is their ratio."""
    from analysis.report import open_store
    from analysis.sources import MODEL, layer_moments

    moments = layer_moments(open_store(store)).sel(sample=sample, layer=MODEL).compute()
    m = moments["m"].values
    return {"step": moments["step"].values,
            "mean_gradient_sq": moments["norm_sq_of_sum"].values / m ** 2,
            "mean_sq_norm": moments["sum_of_norm_sq"].values / m}


def figure_4(model_name: str, noise_levels, results: dict, path: Path) -> None:
    """Making Coherence Fig. 4: whole-model m-coherence of the tracked training sample (training
    labels, solid) and of the held-out test sample (true labels, dashed) against step, a panel per
    noise level, log-log, lines at 1 and m."""
    from analysis.plots import save

    fig, panels = noise_panels(noise_levels)
    for ax, noise in panels:
        res = results[(model_name, noise)]
        steps = on_step_axis(res["step"].values)
        m = 1
        for sample, ls, what in (("tracked_train", "-", "training sample"), ("tracked_test", "--", "test sample")):
            if sample in res["sample"].values:
                count = int(res["m"].sel(sample=sample, layer=MODEL_LAYER).values[0])
                ax.plot(steps, _curve(res, sample), color="C0" if sample == "tracked_train" else "C1", ls=ls,
                        label=f"{what}, m = {count}")
                m = max(m, count)
        ax.axhline(m, color="black", ls=":", lw=0.8)
    panels[0][0].legend(fontsize=7)
    fig.suptitle(f"{model_name}: m-coherence of training examples (their training labels) and of held-out test "
                 f"examples (true labels)", fontsize=9)
    save(fig, path, dpi=110)


def figure_5(model_name: str, noise_levels, parts: dict, path: Path) -> None:
    """Making Coherence Fig. 5: the numerator ||E g||² and the denominator E||g||² of alpha of the
    whole model against step (log-log), a colour per noise level, tracked training sample."""
    from analysis.plots import save

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), squeeze=False)
    for k, noise in enumerate(noise_levels):
        part = parts[(model_name, noise)]
        steps = on_step_axis(part["step"])
        axes[0][0].plot(steps, part["mean_gradient_sq"], color=f"C{k}", label=f"{noise:.0%} noise")
        axes[0][1].plot(steps, part["mean_sq_norm"], color=f"C{k}")
    for ax, what in zip(axes[0], ("numerator ||E g||²", "denominator E||g||²")):
        ax.set(xscale="log", yscale="log", xlabel=STEP_AXIS, title=f"alpha's {what}")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{model_name}: alpha = ||E g||² / E||g||² of the whole model, training sample")
    save(fig, path, dpi=110)


def scaled_guide(mc_small: np.ndarray, m_small: int, m_large: int) -> np.ndarray:
    """The m-coherence a sample of ``m_large`` would show at the same ratio ρ = ||E g||² / E||g||² as a
    sample of ``m_small`` with m-coherence ``mc_small``: m-coherence ≈ 1 + (m − 1)·ρ (ratio of the
    expectations of ||Σ g||² = m(m − 1)·||E g||² + m·E||g||² and Σ||g||² = m·E||g||²)."""
    return 1 + (m_large - 1) / (m_small - 1) * (np.asarray(mc_small, dtype=np.float64) - 1)


def figure_6(model_name: str, noise_levels, results: dict, path: Path) -> None:
    """Making Coherence Fig. 6: whole-model m-coherence of the tracked training sample (m) and of the
    second training sample (``[capture] moments_examples``, e.g. 2m) against step, a panel per noise
    level, with the second sample's curve expected from the first one's ρ (:func:`scaled_guide`)."""
    from analysis.plots import save

    fig, panels = noise_panels(noise_levels)
    for ax, noise in panels:
        res = results[(model_name, noise)]
        steps = on_step_axis(res["step"].values)
        counts = {s: int(res["m"].sel(sample=s, layer=MODEL_LAYER).values[0]) for s in ("tracked_train", SECOND)}
        curves = {s: res["m_coherence"].sel(sample=s, layer=MODEL_LAYER).values for s in counts}
        ax.plot(steps, curves["tracked_train"], color="C0", label=f"tracked sample, m = {counts['tracked_train']}")
        ax.plot(steps, curves[SECOND], color="C3", label=f"second sample, m = {counts[SECOND]}")
        ax.plot(steps, scaled_guide(curves["tracked_train"], counts["tracked_train"], counts[SECOND]), color="C3",
                ls=":", lw=1, label=f"m = {counts[SECOND]} expected from the first sample's ρ")
    panels[0][0].legend(fontsize=7)
    fig.suptitle(f"{model_name}: m-coherence of two training samples of different size")
    save(fig, path, dpi=110)


def epoch_spans(steps_per_epoch: int, last_step: int) -> list[tuple[int, int | None]]:
    """Fig. 1's columns as step spans: the first epoch, and the rest only if the run went past it."""
    return [(0, steps_per_epoch)] + ([(steps_per_epoch, None)] if last_step > steps_per_epoch else [])


def figure_levels(noise_levels) -> dict[int, list[float]]:
    """The noise levels Fig. 1 (0% and 100%: real and random labels) and Fig. 7 (the levels between,
    25% and 75% in the paper) draw; a run without 0% or 100% draws all its levels in Fig. 1."""
    ends = [p for p in noise_levels if p in (0.0, 1.0)]
    between = [p for p in noise_levels if 0.0 < p < 1.0]
    return {1: ends, 7: between} if ends and between else {1: list(noise_levels)}


def figure_1(model_name: str, noise_levels, results: dict, histories: dict, steps_per_epoch: int, path: Path,
             *, figure: int = 1) -> None:
    """Making Coherence Fig. 1's rows for one model: train loss, accuracy (train solid, test dashed), and
    m-coherence of the whole model and of the first, a middle and the last layer (lines at 1 and m),
    solid, with the m-coherence of the weights alone (no biases) dashed where the store has it;
    the first epoch (left) and the rest (right, if the run has more); a colour per noise level."""
    from analysis.plots import save

    plt = pyplot()
    first = results[(model_name, noise_levels[0])]
    layers = [str(v) for v in first["layer"].values if str(v) != MODEL_LAYER]
    picked = list(dict.fromkeys([layers[0], layers[len(layers) // 2], layers[-1]])) if layers else []
    rows = ["loss", "accuracy", MODEL_LAYER, *picked]
    last = max(int(results[(model_name, noise)]["step"].values.max()) for noise in noise_levels)
    spans = epoch_spans(steps_per_epoch, last)
    fig, axes = plt.subplots(len(rows), len(spans), figsize=(10 if len(spans) > 1 else 7, 2.2 * len(rows)), squeeze=False)
    m = int(first["m"].sel(sample="tracked_train", layer=MODEL_LAYER).values[0])
    for col, (lo, hi) in enumerate(spans):
        for k, noise in enumerate(noise_levels):
            res, hist = results[(model_name, noise)], histories[(model_name, noise)]
            h = [r for r in hist if r["step"] >= lo and (hi is None or r["step"] <= hi)]
            hs = [r["step"] for r in h]
            axes[0][col].plot(hs, [r["train_loss"] for r in h], color=f"C{k}", label=f"{noise:.0%} noise")
            axes[1][col].plot(hs, [r["train_acc"] for r in h], color=f"C{k}")
            axes[1][col].plot(hs, [r["test_acc"] for r in h], color=f"C{k}", ls="--")
            steps = res["step"].values
            keep = (steps >= lo) & ((steps <= hi) if hi is not None else True)
            for row, layer in enumerate(rows[2:], start=2):
                axes[row][col].plot(steps[keep], _curve(res, layer=layer)[keep], color=f"C{k}")
                weights = _curve(res, layer=layer, weights=True)
                if weights is not None and np.isfinite(weights[keep]).any():
                    axes[row][col].plot(steps[keep], weights[keep], color=f"C{k}", ls="--", lw=0.9)
        for row, layer in enumerate(rows[2:], start=2):
            ax = axes[row][col]
            ax.axhline(1, color="grey", ls="--", lw=0.8)
            ax.axhline(m, color="black", ls=":", lw=0.8)
            ax.set_yscale("log")
            ax.set_ylabel("whole model" if layer == MODEL_LAYER else layer, fontsize=8)
        axes[0][col].set_title("first epoch" if col == 0 else "after the first epoch", fontsize=9)
        axes[-1][col].set_xlabel("step")
    axes[0][0].set_ylabel("train loss")
    axes[1][0].set_ylabel("accuracy (train solid, test dashed)", fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Fig. {figure}, {model_name}: m-coherence, solid; of the weights alone, dashed\n"
                 f"(lines at 1 and m = {m})")
    save(fig, path, dpi=100)


def noise_labels(noise_levels) -> dict[float, str]:
    """The folder label of each noise level's run (``noise-0.25``), distinct or refused."""
    return distinct_dirs({noise: f"noise-{number_label(noise, 'noise_levels')}" for noise in noise_levels},
                         "noise_levels")


def execute(config: dict[str, Any], ctx: Context) -> Outcome:
    """Train every (model, noise) and analyse each store; the runner draws the figures, judges and reports."""
    from pipelines.data import load_mnist

    check_config(config)
    folder = ctx.folder
    labels = noise_labels(config["noise_levels"])
    dirs = {(m, p): (folder.path(f"{m}-{label}"), folder.path(f"layers_{m}_{label}.png"))
            for m in config["models"] for p, label in labels.items()}  # checked before any work
    folder.claim_all([run_dir for run_dir, _ in dirs.values()], RECORDED)
    folder.claim_all([folder.out], [(png.name, "file") for _, png in dirs.values()] + [
        (name, "file") for name in ("m_coherence.png", "summary.csv", "summary.json")] + [
        (f"figure_{k}_{m}.png", "file") for m in config["models"] for k in (1, 4, 5, 6, 7)])
    mnist = subsample(load_mnist(ctx.data_dir), config["train_examples"], config["test_examples"], config["seed"])
    rows, results, all_kinds, histories, per_epoch, parts, layer_figures = [], {}, {}, {}, {}, {}, []
    for model_name in config["models"]:
        for noise in config["noise_levels"]:
            run_dir, layers_png = dirs[(model_name, noise)]
            result, store, spe, kinds = train_one(config, model_name, noise, mnist, run_dir, ctx)
            res = analyse(store, folder.claim(run_dir, "analysis", kind="dir"), replace=ctx.resume)
            results[(model_name, noise)], parts[(model_name, noise)] = res, alpha_parts(store)
            all_kinds[model_name], histories[(model_name, noise)], per_epoch[model_name] = kinds, result.history, spe
            rows.append(summarise(model_name, noise, result, res, spe))
            layer_figures.append(Figure(
                layers_png.name, f"{model_name}, {noise:.0%} noise: m-coherence per layer against step, training and "
                f"held-out test samples", partial(layer_figure, res, kinds,
                                                  title=f"{model_name}, {noise:.0%} label noise: m-coherence per layer")))
    with_test = {m: any("tracked_test" in results[(m, p)]["sample"].values for p in config["noise_levels"])
                 for m in config["models"]}
    with folder.writing("summary.csv") as path:
        write_csv(path, rows)
    with folder.writing("summary.json") as path:
        dump_json(path, rows)
    report = build_report(config, ctx, rows, results, mnist)
    levels, figures = config["noise_levels"], []
    for m in config["models"]:
        for k, shown in figure_levels(levels).items():
            figures.append(Figure(
                f"figure_{k}_{m}.png", f"{m}: Fig. {k}'s rows at {', '.join(f'{p:.0%}' for p in shown)} noise (loss, "
                f"accuracy, m-coherence of the whole model and of the first, a middle and the last layer, solid; of "
                f"their weights alone, dashed), first epoch and after",
                partial(figure_1, m, shown, results, histories, per_epoch[m], figure=k)))
        if with_test[m]:
            figures.append(Figure(f"figure_4_{m}.png", f"{m}: Fig. 4, whole-model m-coherence of the training sample "
                                  f"(training labels) and of held-out test examples (true labels)",
                                  partial(figure_4, m, levels, results)))
        figures.append(Figure(f"figure_5_{m}.png", f"{m}: Fig. 5, alpha's numerator ||E g||² and denominator E||g||² "
                              f"of the whole model against step", partial(figure_5, m, levels, parts)))
        if config["capture"]["moments_examples"]:
            figures.append(Figure(
                f"figure_6_{m}.png", f"{m}: Fig. 6, whole-model m-coherence of the tracked training sample and of a "
                f"second training sample of {config['capture']['moments_examples']} examples (dotted: the second "
                f"curve expected from the first one's ratio ||E g||² / E||g||²)", partial(figure_6, m, levels, results)))
    figures.sort(key=lambda f: int(f.name.split("_")[1]))  # by the paper's figure number, then model
    figures.append(Figure("m_coherence.png", "Whole-model m-coherence against step (solid: training sample, dashed: "
                          "held-out test sample), log-log, lines at 1 and m",
                          partial(summary_figure, config["models"], levels, results)))
    return Outcome(report, claim_inputs(config, results, all_kinds, rows), mnist.source, figures + layer_figures)


run = bind(__name__)


def seed_curves(seed_dirs, model_name: str, noise: float, sample: str) -> tuple[np.ndarray, np.ndarray]:
    """Whole-model m-coherence against step of every seed (rows), from each seed's analysis table;
    the steps every seed captured."""
    import csv

    label = noise_labels([noise])[noise]
    curves = []
    for d in seed_dirs:
        with open(Path(d) / f"{model_name}-{label}" / "analysis" / "coherence.csv", newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if r["sample"] == sample and r["layer"] == MODEL_LAYER
                    and r["source"] == "exact"]
        curves.append({int(r["step"]): float(r["m_coherence"]) for r in rows})
    steps = np.array(sorted(set.intersection(*(set(c) for c in curves))), dtype=int)
    return steps, np.array([[c[s] for s in steps] for c in curves])


def seed_figure(config: dict[str, Any], seed_dirs, model_name: str, path: Path) -> None:
    """Across seeds, one model: whole-model m-coherence against step, a panel per noise level, the
    mean over seeds of log10 m-coherence (training sample solid, test dashed) with its 95% t-interval
    as a band; lines at 1 and m."""
    from analysis.plots import save
    from pipelines.experiments.claims import t_interval

    fig, panels = noise_panels(config["noise_levels"])
    for ax, noise in panels:
        for sample, ls, color in (("tracked_train", "-", "C0"), ("tracked_test", "--", "C1")):
            if sample == "tracked_test" and not config["capture"]["tracked_test"]:
                continue
            steps, curves = seed_curves(seed_dirs, model_name, noise, sample)
            logs = np.log10(np.maximum(curves, 1e-12))
            mean, half = np.array([t_interval(list(col))[:2] for col in logs.T]).T
            x = on_step_axis(steps)
            ax.plot(x, 10 ** mean, color=color, ls=ls, label=f"{sample.split('_')[1]} sample, mean of log10")
            ax.fill_between(x, 10 ** (mean - half), 10 ** (mean + half), color=color, alpha=0.2, lw=0,
                            label="95% t-interval over seeds")
        ax.axhline(config["capture"]["tracked_train"], color="black", ls=":", lw=0.8)
    panels[0][0].legend(fontsize=6)
    fig.suptitle(f"{model_name}: m-coherence over {len(seed_dirs)} seeds (geometric mean, 95% t-interval of log10)",
                 fontsize=9)
    save(fig, path, dpi=110)


def seed_figures(config: dict[str, Any], seed_dirs) -> list[Figure]:
    """The runner's figures across seeds: :func:`seed_figure` per model."""
    return [Figure(f"seeds_m_coherence_{m}.png", f"{m}: whole-model m-coherence over {len(seed_dirs)} seeds, training "
                   f"(solid) and held-out test (dashed) samples: geometric mean and the 95% t-interval of log10 "
                   f"m-coherence", partial(seed_figure, config, seed_dirs, m)) for m in config["models"]]


def _curve(res, sample: str = "tracked_train", layer: str = MODEL_LAYER, *, weights: bool = False):
    """m-coherence against step; ``weights``: of the layer's weights alone (None for a store without it)."""
    if weights:
        if "weights_m_coherence" not in res:
            return None
        return res["weights_m_coherence"].sel(sample=sample, layer=layer).values
    return res["m_coherence"].sel(sample=sample, layer=layer).values


def claim_inputs(config, results, kinds, rows) -> dict[str, Any]:
    """The inputs of each declared claim's evidence, from the recorded curves (left out where the
    run lacks what a claim needs: both 0% and 100% noise, a test sample, one FC layer)."""
    per_epoch = {r["model"]: r["steps_per_epoch"] for r in rows}
    out: dict[str, Any] = {"rises": [], "slope_falls": [], "peak_real": [], "train_over_test": [], "conv_over_fc": []}
    for model in config["models"]:
        curves = [{"label": f"{model}, {p:.0%} noise", "group": model, "noise": p, "steps": results[(model, p)]["step"].values,
                   "values": _curve(results[(model, p)]), "steps_per_epoch": per_epoch[model]}
                  for p in config["noise_levels"]]
        out["rises"] += curves
        out["slope_falls"] += curves if len(curves) > 1 else []
        if (model, 0.0) in results and (model, 1.0) in results:
            out["peak_real"].append({"model": model, "clean": curves[config["noise_levels"].index(0.0)],
                                     "random": curves[config["noise_levels"].index(1.0)]})
        res = results.get((model, 1.0))
        if res is not None and "tracked_test" in res["sample"].values:
            out["train_over_test"].append({"label": f"{model}, 100% noise", "steps": res["step"].values,
                                           "train": _curve(res), "test": _curve(res, "tracked_test")})
        layers = [str(v) for v in results[(model, config["noise_levels"][0])]["layer"].values]
        fc = [name for name in layers if kinds[model].get(name) == "Linear"]
        conv = [name for name in layers if kinds[model].get(name) == "Conv2d"]
        if len(fc) == 1 and conv:
            for p in config["noise_levels"]:
                res = results[(model, p)]
                out["conv_over_fc"].append({"label": f"{model}, {p:.0%} noise", "steps": res["step"].values,
                                            "fc": _curve(res, layer=fc[0]),
                                            "conv": {name: _curve(res, layer=name) for name in conv}})
    return {k: v for k, v in out.items() if v}


def build_report(config, ctx: Context, rows, results, mnist) -> Report:
    cap = config["capture"]
    intro = (
        f"Models {', '.join(f'`{m}`' for m in config['models'])}, SGD lr {config['lr']}, batch "
        f"{config['batch_size']}, {config['epochs']} epochs, noise levels "
        f"{', '.join(f'{n:.0%}' for n in config['noise_levels'])}, seed {config['seed']}; data: {mnist.source} "
        f"({len(mnist.train_labels)} training, {len(mnist.test_labels)} test examples). Exact m-coherence "
        f"||Σ g_i||² / Σ ||g_i||² of per-example gradients in eval mode, on {cap['tracked_train']} tracked training "
        f"examples (training labels) and {cap['tracked_test']} held-out test examples (true labels), every "
        f"{cap['first_epoch_every']} steps in the first epoch and at the end of every epoch. Before each capture the "
        f"BatchNorm statistics are reset and primed on {cap['prime_batches']} fixed training batches of "
        f"{cap['prime_batch_size']} at the current weights (restored afterwards). Loss and accuracy on every training "
        f"and test example are evaluated "
        + ("at every capture" if config["evaluate_captures"] else f"every {config['eval_every']} steps")
        + (f" and every {config['eval_every']} steps" if config["evaluate_captures"] and config["eval_every"] else "")
        + " and at the end."
        + (" This is the `--quick` variant: far shorter than the paper's runs." if ctx.quick else "")
    )
    report = Report("Coherence evolution (Making Coherence Out of Nothing At All)", intro)
    header = ["model", "noise", "train acc", "test acc", "train m", "train m-coh step 0", "train peak", "peak step",
              "train last", "train peak, weights only", "test m", "test m-coh step 0", "test peak", "test peak step",
              "test last", "second m", "second peak", "second peak step"]
    nan = float("nan")
    report.tables.append(("Whole-model m-coherence per model and noise level", header, [
        [r["model"], f"{r['noise']:.0%}", r["train_acc"], r["test_acc"], r.get("train_m", 0),
         r.get("train_initial", nan), r.get("train_peak", nan), r.get("train_peak_step", "–"), r.get("train_final", nan),
         r.get("train_weights_peak", nan), r.get("test_m", 0), r.get("test_initial", nan), r.get("test_peak", nan), r.get("test_peak_step", "–"),
         r.get("test_final", nan), r.get("second_m", 0), r.get("second_peak", nan), r.get("second_peak_step", "–")]
        for r in rows]))
    report.notes += [
        "m-coherence is 1 when the per-example gradients are pairwise orthogonal and m when they are all equal; "
        "per layer it uses that layer's parameters only (weight and bias); *weights only* (Fig. 1 dashed, the "
        "table's weights-only peak, `weights_coherence.csv`) uses the parameters of dimension >= 2 alone, as Making "
        "Coherence plots it.",
        "Test examples are scored with their true labels at every noise level; the training samples with their "
        "training labels (random at 100% noise).",
        "The second training sample (`[capture] moments_examples`, Fig. 6; *second* in the table) is drawn apart "
        "from the tracked one, and only its exact moments are stored; 0: none.",
        "Per-run stores, analysis (results.zarr, coherence.csv) and histories are in the MODEL-noise-*/ folders.",
    ]
    return report
