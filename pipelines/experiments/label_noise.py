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


def summarise(noise: float, result, data, results) -> dict[str, Any]:
    """The numbers the report's table shows for one noise level."""
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
    row["crossing_step"], row["crossing_p"] = None, float("nan")
    row["early_f_p"], row["early_f_p_p"] = float("nan"), float("nan")
    row["r_p_end"], row["r_c_end"] = float("nan"), float("nan")
    if "f_p" in results and 0.0 < noise < 1.0:
        f_p = results["f_p"].sel(layer=MODEL_LAYER).values
        f_c = results["f_c"].sel(layer=MODEL_LAYER).values
        p = results["f_p_p_value"].sel(layer=MODEL_LAYER).values if "f_p_p_value" in results else np.full_like(f_p, np.nan)
        first = 1 if len(steps) > 1 else 0  # step 0 is the untrained model
        row["early_f_p"], row["early_f_p_p"] = float(f_p[first]), float(p[first])
        row["r_p_end"] = float(results["r_p"].sel(layer=MODEL_LAYER).values[-1])
        row["r_c_end"] = float(results["r_c"].sel(layer=MODEL_LAYER).values[-1])
        crossed = np.flatnonzero((f_c >= f_p) & (np.arange(len(steps)) >= first))
        if crossed.size:
            row["crossing_step"], row["crossing_p"] = int(steps[crossed[0]]), float(p[crossed[0]])
    return row


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
    rows, all_results, histories = [], [], []
    for noise, run_dir in dirs.items():
        result, data, store = train_recorded(config, noise, mnist, run_dir, ctx, desc=f"train, {noise:.0%} noise")
        results = analyse_store(store, folder.claim(run_dir, "analysis", kind="dir"),
                                nulls=config["analysis"]["nulls"], seed=config["analysis"]["seed"],
                                metrics=tuple(config["analysis"]["metrics"]), progress=ctx.progress,
                                resume=ctx.resume)
        rows.append(summarise(noise, result, data, results))
        all_results.append(results)
        histories.append(result.history)
    with folder.writing("m_coherence.png") as path:
        coherence_figure(rows, all_results, path)
    with folder.writing("accuracy.png") as path:
        accuracy_figure(rows, histories, path)
    with folder.writing("summary.json") as path:
        dump_json(path, rows)
    report = build_report(title, config, ctx, rows, mnist.source)
    with folder.writing("report.md") as path:
        return report.write(path)


def build_report(title: str, config, ctx: Context, rows, source: str) -> Report:
    cap = config["capture"]
    intro = (
        f"Model `{config['model']}`, SGD lr {config['lr']}, batch {config['batch_size']}, {config['steps']} steps, "
        f"seed {config['seed']}, data: {source}. Tracked sample: {cap['tracked_train']} training examples "
        f"(+{cap['tracked_test']} test), {cap['coords_per_layer']} coordinates per layer, exact moments also over "
        f"{cap['moments_examples']} training examples. Permutation nulls: {config['analysis']['nulls']}."
        + (" This is the `--quick` variant: far shorter than the paper's runs." if ctx.quick else "")
    )
    report = Report(title, intro)
    noisy = [r for r in rows if 0.0 < r["noise"] < 1.0]
    clean = next((r for r in rows if r["noise"] == 0.0), None)
    rand = next((r for r in rows if r["noise"] == 1.0), None)
    if noisy:
        faster = all(r["pristine_acc"] > r["corrupt_acc"] for r in noisy)
        report.claims.append(Claim(
            "Pristine examples are fitted before corrupt ones", "§2.2, Fig. 1",
            "; ".join(f"{r['noise']:.0%}: pristine {r['pristine_acc']:.3f} vs corrupt {r['corrupt_acc']:.3f}" for r in noisy),
            faster))
        report.claims.append(Claim(
            "Per example, pristine examples contribute more to the cumulative loss reduction (r_p > r_c)",
            "§2.4, Fig. 3",
            "; ".join(f"{r['noise']:.0%}: r_p = {r['r_p_end']:.3g}, r_c = {r['r_c_end']:.3g} at the last step"
                      for r in noisy),
            all(r["r_p_end"] > r["r_c_end"] for r in noisy)))
        early = [r for r in noisy if np.isfinite(r["early_f_p_p"])]
        if early:
            dominant = all(r["early_f_p"] > 1 - r["noise"] and r["early_f_p_p"] < 0.05 for r in early)
            report.claims.append(Claim(
                "Early on, pristine examples give more of the loss reduction than their share of the sample", "§2.4, Fig. 3",
                "; ".join(f"{r['noise']:.0%}: f_p = {r['early_f_p']:.3f} (pristine share {1 - r['noise']:.2f}, "
                          f"p = {r['early_f_p_p']:.3g})" for r in early),
                dominant))
    if clean and rand:
        report.claims.append(Claim(
            "Real labels give more coherent gradients than random labels", "§2 / Making Coherence… §5",
            f"peak m-coherence {clean['peak_m_coherence']:.3g} (0%) vs {rand['peak_m_coherence']:.3g} (100%)",
            clean["peak_m_coherence"] > rand["peak_m_coherence"]))
        report.claims.append(Claim(
            "Random labels do not generalize: test accuracy near chance", "§2.2",
            f"test accuracy {clean['test_acc']:.3f} (0%) vs {rand['test_acc']:.3f} (100%)",
            rand["test_acc"] < 0.2 < clean["test_acc"]))
    header = ["noise", "proper acc", "train acc", "pristine acc", "corrupt acc", "test acc", "peak m-coherence",
              "peak step", "final m-coherence", "f_p at first step", "p (f_p)", "f_c ≥ f_p from step", "p there", "r_p at end", "r_c at end"]
    report.tables.append(("Results per noise level", header, [
        [f"{r['noise']:.0%}", r["proper_acc"], r["train_acc"], r["pristine_acc"], r["corrupt_acc"], r["test_acc"],
         r["peak_m_coherence"], r["peak_step"], r["final_m_coherence"], r["early_f_p"], r["early_f_p_p"],
         r["crossing_step"] if r["crossing_step"] is not None else "never", r["crossing_p"], r["r_p_end"], r["r_c_end"]]
        for r in rows]))
    report.figures += [
        ("m-coherence of the whole model against step (log-log), lines at 1 and m", "m_coherence.png"),
        ("Accuracy on pristine and corrupt training examples and on the test set", "accuracy.png"),
    ]
    report.figures += [(f"Loss-reduction split f_p / f_c with permutation null bands, {r['noise']:.0%} noise",
                        f"noise-{r['noise']:.2f}/analysis/loss_split.png")
                       for r in noisy if (ctx.out / f"noise-{r['noise']:.2f}/analysis/loss_split.png").exists()]
    report.notes.append("m-coherence is exact (from the stored moments) over the tracked training sample; "
                        "p-values are two-sided permutation p-values of f_p against random pristine/corrupt relabelings of the sample (the null band is its 2.5–97.5% range).")
    report.notes.append("r_p and r_c sum g_p·g and g_c·g over the captured steps only (log-spaced early, then a "
                        "regular cadence), not over every training step, each divided by the group's size.")
    report.notes.append("Per-noise stores, analysis results (results.zarr, CSV, PNG) and training histories are in "
                        "the noise-*/ folders.")
    return report
