"""``label-noise`` (Coherent Gradients §2), and the demo built on it.

The 784-2048-10 MLP is trained with SGD at several label-noise levels. On a fixed tracked sample
the Recorder stores exact per-example statistics at log-spaced early steps and on a regular cadence
after; the analysis gives m-coherence, the §2.4 loss-reduction split f_p/f_c with permutation nulls,
and the accuracy of pristine and corrupt examples against step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipelines.experiments.common import (
    Claim,
    Context,
    RECORDED,
    Report,
    distinct_dirs,
    dump_json,
    experiment,
    number_label,
    train_recorded,
)

MODEL_LAYER = "(model)"


def analyse_store(store: Path, out: Path, *, nulls: int, seed: int, metrics, progress: bool, resume: bool = False):
    """Analyse one run store into ``out`` (results.zarr, CSVs, PNGs); return the computed results.

    The folder is written under a temporary name and renamed into place when complete. A resumed
    run recomputes its analysis: with ``resume`` an earlier ``out`` is replaced, only then.
    """
    from dask.diagnostics import ProgressBar

    from analysis.output import write_results
    from analysis.report import analyze, open_store

    lazy = analyze(open_store(store), metrics=metrics, n_permutations=nulls, seed=seed)
    if progress:
        with ProgressBar(minimum=1.0):
            results = lazy.compute()
    else:
        results = lazy.compute()
    write_results(results, out, replace=resume)
    return results


def noise_dirs(folder, levels, key: str = "noise_levels") -> dict[float, Path]:
    """The checked folder ``noise-P.PP`` of every noise level (before anything is written)."""
    return {noise: folder.path(name) for noise, name in
            distinct_dirs({noise: f"noise-{number_label(noise, key)}" for noise in levels}, key).items()}


def summarise(noise: float, result, data, results) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The numbers the report's table shows for one noise level, and the inputs of its verdicts
    (:mod:`pipelines.experiments.verdicts`; None where the level has no pristine/corrupt split)."""
    from pipelines.experiments.verdicts import EARLY_WINDOW, window_weights, increments

    final = result.final
    row: dict[str, Any] = {
        "noise": noise,
        "proper_acc": data.noise.proper_accuracy,
        "train_acc": final["train_acc"],
        "pristine_acc": final["pristine_acc"],
        "corrupt_acc": final["corrupt_acc"],
        "test_acc": final["test_acc"],
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
    from analysis.plots import _pyplot, save

    plt = _pyplot()
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
    from analysis.plots import _pyplot, save

    plt = _pyplot()
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


@experiment("label-noise")
def run(config: dict[str, Any], ctx: Context, *, title: str = "Label noise (Coherent Gradients §2)") -> Path:
    """Run every noise level, analyse each store, write figures and ``report.md``; return its path."""
    from pipelines.data import load_mnist

    folder = ctx.folder
    dirs = noise_dirs(folder, config["noise_levels"])
    folder.claim_all(dirs.values(), RECORDED)  # refused now, not after training, if not the run's own
    folder.claim_all([folder.out], [(name, "file") for name in ("m_coherence.png", "accuracy.png", "summary.json",
                                                                "report.md")])
    mnist = load_mnist(ctx.data_dir)
    rows, all_results, histories, inputs = [], [], [], []
    for noise, run_dir in dirs.items():
        result, data, store = train_recorded(config, noise, mnist, run_dir, ctx, desc=f"train, {noise:.0%} noise")
        results = analyse_store(store, folder.claim(run_dir, "analysis", kind="dir"),
                                nulls=config["analysis"]["nulls"], seed=config["analysis"]["seed"],
                                metrics=tuple(config["analysis"]["metrics"]), progress=ctx.progress,
                                resume=ctx.resume)
        row, verdict_inputs = summarise(noise, result, data, results)
        rows.append(row)
        inputs.append(verdict_inputs)
        all_results.append(results)
        histories.append(result.history)
    with folder.writing("m_coherence.png") as path:
        coherence_figure(rows, all_results, path)
    with folder.writing("accuracy.png") as path:
        accuracy_figure(rows, histories, path)
    with folder.writing("summary.json") as path:
        dump_json(path, rows)
    report = build_report(title, config, ctx, rows, mnist.source, inputs)
    with folder.writing("report.md") as path:
        return report.write(path)


def build_report(title: str, config, ctx: Context, rows, source: str, inputs=None) -> Report:
    """The report; ``inputs`` are the verdict inputs :func:`summarise` returns, one per row (or None)."""
    from pipelines.experiments import verdicts

    cap = config["capture"]
    intro = (
        f"Model `{config['model']}`, SGD lr {config['lr']}, batch {config['batch_size']}, {config['steps']} steps, "
        f"seed {config['seed']}, data: {source}. Tracked sample: {cap['tracked_train']} training examples "
        f"(+{cap['tracked_test']} test), {cap['coords_per_layer']} coordinates per layer, exact moments also over "
        f"{cap['moments_examples']} training examples. Permutation nulls: {config['analysis']['nulls']}."
        + (" This is the `--quick` variant: far shorter than the paper's runs." if ctx.quick else "")
    )
    report = Report(title, intro)
    inputs = list(inputs) if inputs is not None else [None] * len(rows)
    noisy = [r for r in rows if 0.0 < r["noise"] < 1.0]
    clean = next((r for r in rows if r["noise"] == 0.0), None)
    rand = next((r for r in rows if r["noise"] == 1.0), None)
    if noisy:
        given = [i for i in inputs if i]
        report.claims.append(verdicts.fitted_first_claim([i["learned"] for i in given if "learned" in i]))
        report.claims.append(verdicts.cumulative_split_claim([i["r"] for i in given if "r" in i]))
        report.claims.append(verdicts.pristine_share_claim([i["f_p"] for i in given if "f_p" in i], step=0))
    if clean and rand:
        report.claims.append(Claim(
            "Real labels give more coherent gradients than random labels", "§2 / Making Coherence… §5",
            f"peak m-coherence {clean['peak_m_coherence']:.3g} (0%) vs {rand['peak_m_coherence']:.3g} (100%)",
            clean["peak_m_coherence"] > rand["peak_m_coherence"]))
        report.claims.append(Claim(
            "Random labels do not generalize: test accuracy near chance", "§2.2",
            f"test accuracy {clean['test_acc']:.3f} (0%) vs {rand['test_acc']:.3f} (100%)",
            rand["test_acc"] < 0.2 < clean["test_acc"]))
    w = verdicts.EARLY_WINDOW
    header = ["noise", "proper acc", "train acc", "pristine acc", "corrupt acc", "test acc", "peak m-coherence",
              "peak step", "final m-coherence", "f_p at step 0", "pristine share of the sample",
              "f_c ≥ f_p from step", f"R_p over steps 0–{w}", f"R_c over steps 0–{w}"]
    report.tables.append(("Results per noise level", header, [
        [f"{r['noise']:.0%}", r["proper_acc"], r["train_acc"], r["pristine_acc"], r["corrupt_acc"], r["test_acc"],
         r["peak_m_coherence"], r["peak_step"], r["final_m_coherence"], r["f_p_step0"], r["pristine_share"],
         r["crossing_step"] if r["crossing_step"] is not None else "never", r["R_p_early"], r["R_c_early"]]
        for r in rows]))
    report.figures += [
        ("m-coherence of the whole model against step (log-log), lines at 1 and m", "m_coherence.png"),
        ("Accuracy on pristine and corrupt training examples and on the test set", "accuracy.png"),
    ]
    report.figures += [(f"Loss-reduction split f_p / f_c with permutation null bands, {r['noise']:.0%} noise",
                        f"noise-{r['noise']:.2f}/analysis/loss_split.png")
                       for r in noisy if (ctx.out / f"noise-{r['noise']:.2f}/analysis/loss_split.png").exists()]
    report.notes.append("m-coherence is exact (from the stored moments) over the tracked training sample. The f_p "
                        "claim is tested at step 0 (the gradient the first update uses) by a one-sided permutation "
                        "test against random pristine/corrupt relabelings of the tracked sample, whose mean is the "
                        "sample's own pristine share n_p/n (shown per level); the null band of the figures is the "
                        "2.5–97.5% range of the same null.")
    report.notes.append(f"The analysis stores r_p and r_c as sums over the captured steps only. For the r_p > r_c claim "
                        f"each captured step's contribution is weighted by the number of training steps it stands "
                        f"for up to the next capture (left rectangle rule), over the pre-declared window of steps "
                        f"0–{w} (Fig. 3's first 10 steps); where every step of the window is captured this is exact.")
    report.notes.append("First-learned time: the first evaluated step (evaluations at every capture and every "
                        "eval_every steps) at which a training example is classified as its training label; "
                        "examples never learned count as learned after the last step.")
    report.notes.append("Verdicts: directional claims are one-sided; a claim made at every noise level is supported when "
                        "each level's test rejects at 0.05 and not supported when the opposite direction is "
                        "significant at some level after a Holm correction; otherwise inconclusive ('undecided').")
    report.notes.append("Per-noise stores, analysis results (results.zarr, CSV, PNG) and training histories are in "
                        "the noise-*/ folders.")
    return report
