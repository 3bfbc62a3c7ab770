"""``label-noise`` (Coherent Gradients §2), and the demo built on it.

The 784-2048-10 MLP is trained with SGD at several label-noise levels. On a fixed tracked sample
the Recorder stores exact per-example statistics at log-spaced early steps and on a regular cadence
after; the analysis gives m-coherence, the §2.4 loss-reduction split f_p/f_c with permutation nulls,
and the accuracy of pristine and corrupt examples against step.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.experiments import verdicts
from pipelines.experiments.claims import ClaimSpec, declare
from pipelines.experiments.common import (
    pyplot,
    RECORDED,
    Context,
    Figure,
    Report,
    analyse_store,
    dump_json,
    noise_dirs,
    train_recorded,
)
from pipelines.experiments.provenance import PaperSetting
from pipelines.experiments.runner import Outcome, bind

NAME = "label-noise"
MODEL_LAYER = "(model)"
W = verdicts.EARLY_WINDOW
CG = "Coherent Gradients"
#: the papers' claims this experiment tests, declared once (the verdicts come from these)
CLAIMS = declare(
    NAME,
    ClaimSpec("fitted_first", "Pristine examples are fitted before corrupt ones", CG, "§2.2, Fig. 1(d)",
              "P(first-learned step of a pristine example < that of a corrupt one) − ½ (Mann–Whitney effect; "
              "never learned = after the last step)", "the whole run, at evaluation resolution", "greater",
              "one-sided Mann–Whitney U", verdicts.fitted_first, kind="fitting",
              conditions="every noise level strictly between 0 and 100%"),
    ClaimSpec("cumulative_split", "Per example, pristine examples contribute more to the cumulative loss reduction "
              f"over the first {W} steps (r_p > r_c)", CG, "§2.4, Fig. 3",
              "R_p − R_c, the per-example cumulative loss reductions of the groups, gap-weighted over the captures",
              f"steps 0–{W}", "greater",
              "one-sided permutation test of R_p against random groups of n_p examples (null mean: the all-example "
              "mean, so R_p > null iff R_p > R_c)", verdicts.cumulative_split,
              conditions="every noise level strictly between 0 and 100%"),
    ClaimSpec("pristine_share", "Early on, pristine examples give more of the loss reduction than their share of "
              "the sample", CG, "§2.4, Fig. 2", "f_p − n_p/n (n_p/n: the tracked sample's own pristine share)",
              "step 0 (the gradient of the first update)", "greater",
              "one-sided permutation test against random pristine/corrupt relabelings of the tracked sample (null "
              "mean n_p/n)", verdicts.pristine_share, conditions="every noise level strictly between 0 and 100%"),
    ClaimSpec("coherence_real_vs_random", "Real labels give more coherent gradients than random labels",
              CG, "§2 (and Making Coherence…)", "log10(peak whole-model m-coherence at 0% / at 100% noise)",
              "every capture of the run", "greater", "no within-run test (one seed has no uncertainty)",
              verdicts.peak_higher, conditions="the 0% and 100% noise runs"),
    ClaimSpec("random_at_chance", "Random labels do not generalize: test accuracy at chance", CG, "§2.2",
              "test accuracy − 0.1 (chance for 10 classes)", "the end of the run", "equivalent",
              "TOST of two one-sided z-tests with the binomial standard error, margin ±0.05 fixed beforehand",
              verdicts.learned_above_chance, margin=0.05, kind="generalization", conditions="100% noise"),
)
#: what Coherent Gradients §2 states about its setting (the first line of a report names every difference)
PAPER = (
    PaperSetting(("model",), "mlp-cg", "§2.1: 784-2048-10"),
    PaperSetting(("lr",), 0.1, "§2.1"), PaperSetting(("batch_size",), 100, "§2.1"),
    PaperSetting(("steps",), 100_000, "§2.1: about 170 epochs, ~10^5 steps", "min"),
    PaperSetting(("noise_levels",), [0.0, 0.25, 0.5, 0.75, 1.0], "§2.1"),
    PaperSetting(("capture", "tracked_train"), 400, "§2"),
    PaperSetting(("capture", "coords_per_layer"), 300, "§2: 300 sampled weights per layer"),
)
FIXED_DEVIATIONS: tuple[str, ...] = ()


def sampled_f_p(store: Path) -> float:
    """The paper's estimate of f_p at step 0, from the sampled weights of every layer (``grad_coords``),
    beside the exact f_p (NaN if the store has no sampled coordinates or no step 0).

    d_i = g_i·Σ_j g_j estimated on the sampled coordinates (analysis.sources, source ``coords``), then
    the same split as the exact one (analysis.losssplit): f_p = Σ_pristine d_i / Σ_i d_i.
    """
    from analysis import losssplit, sources
    from analysis.report import open_store

    ds = open_store(store)
    if "grad_coords" not in ds or ds.sizes.get("coord", 0) == 0 or int(ds["step"].values[0]) != 0:
        return float("nan")
    index = np.flatnonzero(sources.split_mask(ds, "train").values)
    d = sources.layer_dot_with_sum(ds.isel(step=[0]), "coords").isel(example=index)
    corrupt = sources.static(ds, "corrupt")[index].astype(bool)
    return float(losssplit.loss_split(d, corrupt)["f_p"].sel(layer=MODEL_LAYER).values[0])


def summarise(noise: float, result, data, results) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The numbers the report's table shows for one noise level, and the inputs of its verdicts
    (:mod:`pipelines.experiments.verdicts`; None where the level has no pristine/corrupt split)."""
    from pipelines.experiments.verdicts import EARLY_WINDOW, increments, window_weights

    final = result.final
    row: dict[str, Any] = {
        "noise": noise,
        "proper_acc": data.noise.proper_accuracy,
        "train_acc": final["train_acc"],
        "pristine_acc": final["pristine_acc"],
        "corrupt_acc": final["corrupt_acc"],
        "test_acc": final["test_acc"],
        "n_test": len(data.y_test),
    }
    mc = results["m_coherence"].sel(source="exact", sample="tracked_train", layer=MODEL_LAYER)
    steps = results["step"].values
    k = int(np.nanargmax(mc.values))
    row["m"] = int(results["m"].sel(source="exact", sample="tracked_train", layer=MODEL_LAYER).values[k])
    row["peak_m_coherence"], row["peak_step"] = float(mc.values[k]), int(steps[k])
    row["final_m_coherence"] = float(mc.values[-1])
    row["crossing_step"] = None
    row["f_p_step0"], row["pristine_share"] = float("nan"), float("nan")
    row["R_p_early"], row["R_c_early"] = float("nan"), float("nan")
    inputs = None
    if "f_p" in results and 0.0 < noise < 1.0:
        f_p = results["f_p"].sel(layer=MODEL_LAYER).values
        f_c = results["f_c"].sel(layer=MODEL_LAYER).values
        n_p, n_c = int(results["n_pristine"].values), int(results["n_corrupt"].values)

        def null(name):
            return results[name].sel(layer=MODEL_LAYER).transpose("permutation", "step").values \
                if name in results else None

        f_p_null, r_p_null = null("f_p_null"), null("r_p_null")
        r_p = results["r_p"].sel(layer=MODEL_LAYER).values
        r_c = results["r_c"].sel(layer=MODEL_LAYER).values
        row["pristine_share"] = n_p / (n_p + n_c)
        row["f_p_step0"] = float(f_p[0]) if steps[0] == 0 else float("nan")
        w = window_weights(steps, EARLY_WINDOW)
        row["R_p_early"], row["R_c_early"] = float(increments(r_p) @ w), float(increments(r_c) @ w)
        crossed = np.flatnonzero(f_c >= f_p)
        if crossed.size:
            row["crossing_step"] = int(steps[crossed[0]])
        inputs = {
            "f_p": {"noise": noise, "f_p": row["f_p_step0"], "n_p": n_p, "n": n_p + n_c,
                    "null": f_p_null[:, 0] if f_p_null is not None and steps[0] == 0 else []},
            "r": {"noise": noise, "steps": steps, "r_p": r_p, "r_c": r_c, "r_p_null": r_p_null, "n_p": n_p,
                  "n": n_p + n_c},
        }
    if 0.0 < noise < 1.0:
        inputs = inputs or {}
        inputs["learned"] = {"noise": noise, "first_learned": result.learned.first_learned,
                             "corrupt": data.corrupt.cpu().numpy(), "end": int(final["step"])}
    return row, inputs


def coherence_figure(rows, all_results, path: Path, *, sample: str = "tracked_train") -> None:
    """Whole-model m-coherence against step, one line per noise level, log scale, lines at 1 and m."""
    from analysis.plots import save

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for row, res in zip(rows, all_results):
        mc = res["m_coherence"].sel(source="exact", sample=sample, layer=MODEL_LAYER)
        steps = np.maximum(res["step"].values, 0.5)  # step 0 drawn at 0.5 on the log axis
        ax.plot(steps, mc.values, marker=".", label=f"{row['noise']:.0%} noise")
    m = rows[0]["m"]
    ax.axhline(1, color="grey", ls=":", lw=1, label="orthogonal limit (1)")
    ax.axhline(m, color="black", ls="--", lw=1, label=f"all equal (m = {m})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training step (log)")
    ax.set_ylabel("m-coherence of the whole model")
    ax.set_title(f"m-coherence on {m} tracked training examples")
    ax.legend(fontsize=8)
    save(fig, path, dpi=110)


def accuracy_figure(rows, histories, path: Path) -> None:
    """Pristine, corrupt and test accuracy against step, one panel per noise level."""
    from analysis.plots import save

    plt = pyplot()
    fig, axes = plt.subplots(1, len(rows), figsize=(3.2 * len(rows), 3.2), sharey=True, squeeze=False)
    for ax, row, hist in zip(axes[0], rows, histories):
        steps = [h["step"] for h in hist]
        for key, label in (("pristine_acc", "pristine (train)"), ("corrupt_acc", "corrupt (train)"), ("test_acc", "test")):
            ax.plot(steps, [h[key] for h in hist], label=label)
        ax.set_title(f"{row['noise']:.0%} noise")
        ax.set_xlabel("step")
    axes[0][0].set_ylabel("accuracy")
    axes[0][0].legend(fontsize=7)
    save(fig, path, dpi=110)


def figure_1(rows, histories, path: Path) -> None:
    """Coherent Gradients Fig. 1 (a)–(d): train accuracy (training labels), test accuracy, train loss, and
    the fraction of pristine (solid) and corrupt (dashed) training examples fitted, against step; a line
    per noise level."""
    from analysis.plots import save

    plt = pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.4))
    for k, (row, hist) in enumerate(zip(rows, histories)):
        steps = [h["step"] for h in hist]
        label = f"{row['noise']:.0%} noise"
        for ax, key in zip(axes[:3], ("train_acc", "test_acc", "train_loss")):
            ax.plot(steps, [h[key] for h in hist], color=f"C{k}", label=label)
        if 0.0 < row["noise"] < 1.0:
            axes[3].plot(steps, [h["pristine_acc"] for h in hist], color=f"C{k}", label=f"{label}, pristine")
            axes[3].plot(steps, [h["corrupt_acc"] for h in hist], color=f"C{k}", ls="--", label=f"{label}, corrupt")
    for ax, title in zip(axes, ("(a) train accuracy (training labels)", "(b) test accuracy", "(c) train loss",
                                "(d) fraction fitted: pristine, corrupt")):
        ax.set(title=title, xlabel="step")
    axes[0].legend(fontsize=7)
    if axes[3].lines:
        axes[3].legend(fontsize=6)
    save(fig, path, dpi=110)


def _nothing_to_draw(path: Path) -> bool:
    """A small figure saying that no noise level has the loss split to draw (False: not in the report)."""
    from analysis.plots import save

    fig, ax = pyplot().subplots(figsize=(4.2, 1.2))
    ax.axis("off")
    ax.text(0.5, 0.5, "no noise level strictly between 0 and 1 with the loss_split metric", ha="center",
            va="center", fontsize=8)
    save(fig, path, dpi=110)
    return False


def figure_2(rows, all_results, inputs, path: Path) -> bool:
    """Coherent Gradients Fig. 2: f_p (solid) and f_c (dashed) of the whole model against step, a panel
    per noise level strictly between 0 and 1, with the 95% bands of their permutation nulls (random
    pristine/corrupt relabelings of the tracked sample, where the paper drew three such worlds by eye),
    the sample's own pristine share n_p/n, and in each title the one-sided permutation p-value of
    f_p > n_p/n at step 0 (:func:`verdicts.pristine_share`, the claim's own test). False (and a figure
    saying so) if there is nothing to draw."""
    from analysis.plots import save

    levels = [(r, res, i) for r, res, i in zip(rows, all_results, inputs)
              if 0.0 < r["noise"] < 1.0 and "f_p" in res and i and "f_p" in i]
    plt = pyplot()
    if not levels:  # the file is the run's (listed in its marker): say why it is empty
        return _nothing_to_draw(path)
    fig, axes = plt.subplots(1, len(levels), figsize=(4.4 * len(levels), 3.6), squeeze=False, sharey=True)
    for ax, (row, res, given) in zip(axes[0], levels):
        ds = res.sel(layer=MODEL_LAYER)
        steps = np.maximum(ds["step"].values, 0.5)  # step 0 drawn at 0.5 on the log axis
        for name, color, ls in (("f_p", "C0", "-"), ("f_c", "C3", "--")):
            ax.plot(steps, ds[name].values, color=color, ls=ls, lw=1.6, label=name)
            if f"{name}_null_low" in ds:
                ax.fill_between(steps, ds[f"{name}_null_low"].values, ds[f"{name}_null_high"].values, color=color,
                                alpha=0.18, lw=0, label=f"{name}, null 95%")
        share = row["pristine_share"]
        ax.axhline(share, color="C0", ls=":", lw=0.9, label=f"n_p/n = {share:.3f}")
        ax.axhline(1 - share, color="C3", ls=":", lw=0.9, label=f"n_c/n = {1 - share:.3f}")
        (cond,) = verdicts.pristine_share([given["f_p"]])
        p = f"p = {cond.p_claim:.2g}" if np.isfinite(cond.p_claim) else "no null"
        ax.set(xscale="log", xlabel="training step (log; step 0 at 0.5)",
               title=f"{row['noise']:.0%} noise: f_p(0) = {given['f_p']['f_p']:.3f}, {p}")
        ax.title.set_fontsize(9)
    axes[0][0].set_ylabel("share of the loss reduction")
    axes[0][0].legend(fontsize=6, loc="best")
    fig.suptitle("Fig. 2: share of the first-order loss reduction from pristine (f_p) and corrupt (f_c) examples;\n"
                 "p: one-sided permutation test of f_p > n_p/n at step 0", fontsize=9)
    save(fig, path, dpi=110)
    return True


def figure_3(rows, all_results, path: Path, window: int = verdicts.EARLY_WINDOW) -> bool:
    """Coherent Gradients Fig. 3: r_p and r_c (per-example cumulative loss reduction of the pristine and
    corrupt groups) over steps 0..``window``, gap-weighted between captures (exact where every step is
    captured); a panel per noise level strictly between 0 and 1. False (and a figure saying so) if there
    is nothing to draw."""
    from analysis.plots import save

    levels = [(r, res) for r, res in zip(rows, all_results) if 0.0 < r["noise"] < 1.0 and "r_p" in res]
    plt = pyplot()
    if not levels:  # the file is the run's (listed in its marker): say why it is empty
        return _nothing_to_draw(path)
    fig, axes = plt.subplots(1, len(levels), figsize=(4.2 * len(levels), 3.4), squeeze=False)
    for ax, (row, res) in zip(axes[0], levels):
        steps = res["step"].values
        w = verdicts.window_weights(steps, window)
        keep = w > 0
        for name, ls in (("r_p", "-"), ("r_c", "--")):
            inc = verdicts.increments(res[name].sel(layer=MODEL_LAYER).values)
            ax.plot(steps[keep], np.cumsum((inc * w)[keep]), ls=ls, marker=".", label=name)
        exact = keep.sum() == window + 1
        ax.set(title=f"{row['noise']:.0%} noise ({'every step' if exact else 'gap-weighted'})", xlabel="step",
               ylabel="cumulative loss reduction per example")
        ax.legend(fontsize=8)
    save(fig, path, dpi=110)
    return True


def execute(config: dict[str, Any], ctx: Context) -> Outcome:
    """Run every noise level and analyse each store; the runner draws the figures, judges and reports."""
    from pipelines.data import load_mnist

    folder = ctx.folder
    dirs = noise_dirs(folder, config["noise_levels"])
    folder.claim_all(dirs.values(), RECORDED)  # refused now, not after training, if not the run's own
    folder.claim_all([folder.out], [(name, "file") for name in ("m_coherence.png", "accuracy.png", "figure_1.png",
                                                                "figure_2.png", "figure_3.png", "summary.json")])
    mnist = load_mnist(ctx.data_dir)
    rows, all_results, histories, inputs = [], [], [], []
    for noise, run_dir in dirs.items():
        result, data, store = train_recorded(config, noise, mnist, run_dir, ctx, desc=f"train, {noise:.0%} noise")
        results = analyse_store(store, folder.claim(run_dir, "analysis", kind="dir"),
                                nulls=config["analysis"]["nulls"], seed=config["analysis"]["seed"],
                                metrics=tuple(config["analysis"]["metrics"]), progress=ctx.progress,
                                resume=ctx.resume)
        row, verdict_inputs = summarise(noise, result, data, results)
        row["f_p_step0_sampled"] = sampled_f_p(store) if 0.0 < noise < 1.0 else float("nan")
        rows.append(row)
        inputs.append(verdict_inputs)
        all_results.append(results)
        histories.append(result.history)
    with folder.writing("summary.json") as path:
        dump_json(path, rows)
    curves = {r["noise"]: {"steps": res["step"].values, "values": res["m_coherence"].sel(
        source="exact", sample="tracked_train", layer=MODEL_LAYER).values} for r, res in zip(rows, all_results)}
    report = build_report("Label noise (Coherent Gradients §2)", config, ctx, rows, mnist.source)
    figures = [
        Figure("figure_1.png", "Fig. 1 (a)–(d): train accuracy, test accuracy, train loss and the fraction of pristine "
               "(solid) and corrupt (dashed) examples fitted, against step", partial(figure_1, rows, histories)),
        Figure("figure_2.png", "Fig. 2: f_p and f_c against step with their permutation-null bands, the sample's "
               "pristine share and the p-value of f_p > n_p/n at step 0",
               partial(figure_2, rows, all_results, inputs)),
        Figure("figure_3.png", f"Fig. 3: r_p and r_c over steps 0–{W}", partial(figure_3, rows, all_results)),
        Figure("m_coherence.png", "m-coherence of the whole model against step (log-log), lines at 1 and m",
               partial(coherence_figure, rows, all_results)),
        Figure("accuracy.png", "Accuracy on pristine and corrupt training examples and on the test set",
               partial(accuracy_figure, rows, histories)),
    ]
    return Outcome(report, claim_inputs(rows, inputs, curves), mnist.source, figures)


run = bind(__name__)


def claim_inputs(rows, inputs, curves=None) -> dict[str, Any]:
    """The inputs of each declared claim's evidence (a claim whose conditions were not run is left out)."""
    out: dict[str, Any] = {}
    given = [i for i in inputs if i]
    if any(0.0 < r["noise"] < 1.0 for r in rows):
        out["fitted_first"] = [i["learned"] for i in given if "learned" in i]
        out["cumulative_split"] = [i["r"] for i in given if "r" in i]
        out["pristine_share"] = [i["f_p"] for i in given if "f_p" in i]
    if curves and 0.0 in curves and 1.0 in curves:
        out["coherence_real_vs_random"] = [{"clean": curves[0.0], "random": curves[1.0]}]
    rand = next((r for r in rows if r["noise"] == 1.0), None)
    if rand is not None:
        out["random_at_chance"] = [{"label": "100% noise", "test_acc": rand["test_acc"], "n_test": rand["n_test"]}]
    return out


def build_report(title: str, config, ctx: Context, rows, source: str) -> Report:
    """The report without its claims (the runner judges the declared ones and adds them)."""
    cap = config["capture"]
    intro = (
        f"Model `{config['model']}`, SGD lr {config['lr']}, batch {config['batch_size']}, {config['steps']} steps, "
        f"seed {config['seed']}, data: {source}. Tracked sample: {cap['tracked_train']} training examples "
        f"(+{cap['tracked_test']} test), {cap['coords_per_layer']} coordinates per layer, exact moments also over "
        f"{cap['moments_examples']} training examples. Permutation nulls: {config['analysis']['nulls']}."
        + (" This is the `--quick` variant: far shorter than the paper's runs." if ctx.quick else "")
    )
    report = Report(title, intro)
    w = verdicts.EARLY_WINDOW
    header = ["noise", "proper acc", "train acc", "pristine acc", "corrupt acc", "test acc", "peak m-coherence",
              "peak step", "final m-coherence", "f_p at step 0", f"f_p at step 0, estimated from "
              f"{config['capture']['coords_per_layer']} sampled weights per layer", "pristine share of the sample",
              "f_c ≥ f_p from step", f"R_p over steps 0–{w}", f"R_c over steps 0–{w}"]
    report.tables.append(("Results per noise level", header, [
        [f"{r['noise']:.0%}", r["proper_acc"], r["train_acc"], r["pristine_acc"], r["corrupt_acc"], r["test_acc"],
         r["peak_m_coherence"], r["peak_step"], r["final_m_coherence"], r["f_p_step0"],
         r.get("f_p_step0_sampled", float("nan")), r["pristine_share"],
         r["crossing_step"] if r["crossing_step"] is not None else "never", r["R_p_early"], r["R_c_early"]]
        for r in rows]))
    report.notes.append("m-coherence is exact (from the stored moments) over the tracked training sample. The f_p "
                        "claim is tested at step 0 (the gradient the first update uses) by a one-sided permutation "
                        "test against random pristine/corrupt relabelings of the tracked sample, whose mean is the "
                        "sample's own pristine share n_p/n (shown per level); the null band of the figures is the "
                        "2.5–97.5% range of the same null.")
    report.notes.append("f_p estimated from sampled weights: the paper's estimator (§2.4), the same split computed from "
                        "the per-example gradients restricted to the sampled coordinates of every layer (the store's "
                        "grad_coords, the same coordinates for every step); it is an estimate, shown beside the exact "
                        "f_p, which the verdict uses.")
    report.notes.append(f"The analysis stores r_p and r_c as sums over the captured steps only. For the r_p > r_c claim "
                        f"each captured step's contribution is weighted by the number of training steps it stands "
                        f"for up to the next capture (left rectangle rule), over the pre-declared window of steps "
                        f"0–{w} (Fig. 3's first 10 steps); where every step of the window is captured this is exact.")
    report.notes.append("First-learned time: the first evaluated step (evaluations at every capture and every "
                        "eval_every steps) at which a training example is classified as its training label; "
                        "examples never learned count as learned after the last step.")
    report.notes.append("Verdicts come from each claim's declaration (`CLAIMS` in pipelines/experiments/label_noise.py, "
                        "judged by pipelines/experiments/claims.py): one-sided in the claim's direction; a claim made "
                        "at every noise level is supported when each level's test rejects at 0.05 and not supported "
                        "when the opposite is significant at some level after Holm; otherwise inconclusive. A claim "
                        "without a within-run test is inconclusive on one seed (give --seeds N).")
    report.notes.append("Per-noise stores, analysis results (results.zarr, CSV, PNG) and training histories are in "
                        "the noise-*/ folders.")
    return report
