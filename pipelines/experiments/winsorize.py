"""``winsorize`` (Coherent Gradients §3, Figure 4): winsorized SGD against label noise.

The 3×256 ReLU MLP is trained with :class:`~pipelines.optim.WinsorizedSGD` for each c and each
noise level. Reported per condition: final train accuracy (on the noisy training labels), test
accuracy, and the overfit measure

    overfit = train accuracy − expected train accuracy of a model that generalizes perfectly,

where a model with test accuracy A, on a training set whose labels equal the true label on a
fraction q of examples (q = 1 − p + p/10 for noise p), is expected to score q·A + (1 − q)(1 − A)/9
on the noisy training labels (its mistakes are spread over the 9 other classes, and so are the
corrupt labels). This accounts for the test labels not being randomized; with A = 1 it is q.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pipelines.experiments.common import (
    RECORDED,
    Claim,
    Context,
    Report,
    coherence_summary,
    coherence_table,
    distinct_dirs,
    dump_json,
    experiment,
    number_label,
    train_recorded,
    write_csv,
)


def expected_train_accuracy(test_acc: float, proper_acc: float, n_classes: int = 10) -> float:
    """Train accuracy (on noisy labels) of a model that is as accurate on training inputs as on test."""
    return proper_acc * test_acc + (1 - proper_acc) * (1 - test_acc) / (n_classes - 1)


def binomial_se(acc: float, n: int) -> float:
    """Standard error of an accuracy measured on n examples (NaN where undefined)."""
    return math.sqrt(acc * (1 - acc) / n) if n > 0 and math.isfinite(acc) else math.nan


def verdict_less(triples) -> bool | None:
    """Whether a < b in every (a, b, se) beyond 2 standard errors of the difference.

    True if b − a > 2·se everywhere; False if a − b > 2·se somewhere (the opposite holds clearly);
    None (undecided) otherwise, including where a value is missing.
    """
    if any(not all(math.isfinite(v) for v in t) for t in triples):
        return None
    if all(b - a > 2 * se for a, b, se in triples):
        return True
    if any(a - b > 2 * se for a, b, se in triples):
        return False
    return None


def train_condition(config: dict[str, Any], *, noise: float, optimizer: str, options: dict, mnist, run_dir: Path,
                    ctx: Context, desc: str):
    """Train one (noise, optimizer) condition with a Recorder and a checkpoint in ``run_dir``; analyse its store.

    ``run_dir`` is a folder of ``ctx.folder`` (:meth:`~pipelines.experiments.common.RunFolder.path`). Returns the :class:`~pipelines.train.TrainResult`, the :class:`~pipelines.train.TrainData` and the
    whole-model coherence summary of the store (:func:`~pipelines.experiments.common.coherence_summary`).
    """
    from pipelines.experiments.label_noise import analyse_store

    result, data, store = train_recorded(config, noise, mnist, run_dir, ctx, desc=desc, optimizer=optimizer,
                                         optimizer_options=options)
    results = analyse_store(store, ctx.folder.claim(run_dir, "analysis", kind="dir"), nulls=config["analysis"]["nulls"],
                            seed=config["analysis"]["seed"], metrics=tuple(config["analysis"]["metrics"]),
                            progress=ctx.progress, resume=ctx.resume)
    return result, data, coherence_summary(results)


def condition_dirs(folder, config) -> dict[tuple[float, int], Path]:
    """The checked folder ``noise-P.PP/c-C`` of every (noise, c) condition, before anything is written."""
    from pipelines.experiments.label_noise import noise_dirs

    noise = noise_dirs(folder, config["noise_levels"])
    c_names = distinct_dirs({c: f"c-{number_label(c, 'c_values', 'd')}" for c in config["c_values"]}, "c_values")
    return {(p, c): folder.path(noise[p], name) for p in noise for c, name in c_names.items()}


@experiment("winsorize")
def run(config: dict[str, Any], ctx: Context) -> Path:
    """Train every (noise, c) condition, write ``results.csv``, figures and ``report.md``; return its path."""
    from gradstore.errors import GradstoreError
    from pipelines.data import load_mnist

    if not config["c_values"] or not config["noise_levels"]:
        raise GradstoreError("winsorize needs at least one value in c_values and in noise_levels")
    bad = [c for c in config["c_values"] if isinstance(c, bool) or not isinstance(c, int) or c < 0]
    if bad:
        raise GradstoreError(f"winsorize: every c in c_values must be an integer >= 0, got {bad[0]!r}")
    folder = ctx.folder
    dirs = condition_dirs(folder, config)
    folder.claim_all(dirs.values(), RECORDED)  # refused now, not after training, if not the run's own
    folder.claim_all([folder.out], [(name, "file") for name in ("results.csv", "summary.json", "winsorize.png",
                                                                "accuracy_curves.png", "report.md")])
    mnist = load_mnist(ctx.data_dir)
    rows, histories = [], {}
    for noise in config["noise_levels"]:
        for c in config["c_values"]:
            run_dir = dirs[(noise, c)]
            result, data, coherence = train_condition(config, noise=noise, optimizer="winsorized-sgd", options={"c": c},
                                           mnist=mnist, run_dir=run_dir, ctx=ctx,
                                           desc=f"winsorized c={c}, {noise:.0%} noise")
            final = result.final
            proper = data.noise.proper_accuracy
            expected = expected_train_accuracy(final["test_acc"], proper)
            n_train, n_test = len(data.y_train), len(data.y_test)
            slope = proper - (1 - proper) / 9  # d expected / d test accuracy
            overfit_se = math.hypot(binomial_se(final["train_acc"], n_train),
                                    slope * binomial_se(final["test_acc"], n_test))
            rows.append({
                "noise": noise, "c": c, "proper_acc": proper, "train_acc": final["train_acc"],
                "test_acc": final["test_acc"], "pristine_acc": final["pristine_acc"],
                "corrupt_acc": final["corrupt_acc"], "expected_train_acc": expected,
                "overfit": final["train_acc"] - expected, "overfit_se": overfit_se,
                "train_minus_test": final["train_acc"] - final["test_acc"], "n_train": n_train, "n_test": n_test,
                **coherence,
            })
            histories[(noise, c)] = result.history
    with folder.writing("results.csv") as path:
        write_csv(path, rows)
    with folder.writing("summary.json") as path:
        dump_json(path, rows)
    with folder.writing("winsorize.png") as path:
        figure_4(rows, config, path)
    with folder.writing("accuracy_curves.png") as path:
        curves_figure(histories, config, path)
    with folder.writing("report.md") as path:
        return build_report(config, ctx, rows, mnist.source).write(path)


def figure_4(rows, config, path: Path) -> None:
    """Train accuracy, test accuracy and overfit against noise, one line per c (Figure 4's layout)."""
    from analysis.plots import _pyplot, save

    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
    for c in config["c_values"]:
        sub = sorted((r for r in rows if r["c"] == c), key=lambda r: r["noise"])
        noise = [r["noise"] for r in sub]
        for ax, key in zip(axes, ("train_acc", "test_acc", "overfit")):
            ax.plot(noise, [r[key] for r in sub], marker="o", label=f"c = {c}")
    for ax, title in zip(axes, ("train accuracy (noisy labels)", "test accuracy", "overfit (train − expected)")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("label noise")
    axes[2].axhline(0, color="grey", lw=0.8, ls=":")
    axes[0].legend(fontsize=8)
    save(fig, path, dpi=110)


def curves_figure(histories, config, path: Path) -> None:
    """Train (solid) and test (dashed) accuracy against step, one panel per noise level, a colour per c."""
    from analysis.plots import _pyplot, save

    plt = _pyplot()
    levels = config["noise_levels"]
    fig, axes = plt.subplots(1, len(levels), figsize=(3.2 * len(levels), 3.2), sharey=True, squeeze=False)
    for ax, noise in zip(axes[0], levels):
        for k, c in enumerate(config["c_values"]):
            hist = histories[(noise, c)]
            steps = [h["step"] for h in hist]
            ax.plot(steps, [h["train_acc"] for h in hist], color=f"C{k}", label=f"c = {c}")
            ax.plot(steps, [h["test_acc"] for h in hist], color=f"C{k}", ls="--")
        ax.set_title(f"{noise:.0%} noise", fontsize=10)
        ax.set_xlabel("step")
    axes[0][0].set_ylabel("accuracy (solid train, dashed test)")
    axes[0][0].legend(fontsize=7)
    save(fig, path, dpi=110)


def build_report(config, ctx: Context, rows, source: str) -> Report:
    cs = sorted(config["c_values"])
    lo, hi = cs[0], cs[-1]
    intro = (
        f"Model `{config['model']}`, winsorized SGD with c ∈ {{{', '.join(map(str, cs))}}}, lr {config['lr']}, "
        f"batch {config['batch_size']}, {config['steps']} steps, seed {config['seed']}, data: {source}."
        + (" This is the `--quick` variant: far shorter than the paper's runs." if ctx.quick else "")
    )
    report = Report("Winsorized SGD under label noise (Coherent Gradients §3)", intro)
    by = {(r["noise"], r["c"]): r for r in rows}
    noisy = [p for p in config["noise_levels"] if p > 0]
    if lo != hi and noisy:
        measured = "; ".join(f"{p:.0%}: " + ", ".join(f"c={c} {by[(p, c)]['overfit']:+.3f}" for c in cs) for p in noisy)
        report.claims.append(Claim(
            f"Stronger winsorization reduces overfitting to noisy labels (overfit at c = {hi} below c = {lo} "
            "by more than 2 standard errors at every noise level > 0)", "§3, Fig. 4",
            f"overfit {measured}",
            verdict_less([(by[(p, hi)]["overfit"], by[(p, lo)]["overfit"],
                           math.hypot(by[(p, hi)]["overfit_se"], by[(p, lo)]["overfit_se"])) for p in noisy])))
    header = ["noise", "c", "proper acc", "train acc", "pristine acc", "corrupt acc", "test acc",
              "expected train acc", "overfit", "± SE", "train − test"]
    report.tables.append(("Final accuracies per condition", header, [
        [f"{r['noise']:.0%}", r["c"], r["proper_acc"], r["train_acc"], r["pristine_acc"], r["corrupt_acc"],
         r["test_acc"], r["expected_train_acc"], r["overfit"], r["overfit_se"], r["train_minus_test"]] for r in rows]))
    report.figures += [
        ("Train accuracy, test accuracy and overfit against label noise, one line per c (cf. Figure 4)", "winsorize.png"),
        ("Train (solid) and test (dashed) accuracy against step", "accuracy_curves.png"),
    ]
    report.notes += [
        "overfit = train accuracy − q·A − (1 − q)(1 − A)/9, with A the test accuracy and q the fraction of training "
        "labels equal to the true label (≈ 1 − p + p/10): the train accuracy a model generalizing perfectly would "
        "have on the noisy labels, since test labels are not randomized. 'train − test' is the plain gap.",
        "Verdicts on differences use binomial standard errors of the accuracies (treated as independent, which is "
        "conservative for models scored on the same examples): supported beyond +2 SE, not supported beyond −2 SE, "
        "undecided in between.",
        "Per-example gradients for winsorization come from gradstore.capture (exact, one pass); c = 0 is plain SGD.",
        "No claim about test accuracy is tested: §3 does not say winsorization keeps test accuracy; it notes that "
        "with large c the accuracies can peak and then fall during training (see the curves figure).",
        "Per-condition histories are in noise-*/c-*/history.csv; all final numbers in results.csv.",
    ]
    report.tables.append(coherence_table(rows, "c", "c"))
    return report
