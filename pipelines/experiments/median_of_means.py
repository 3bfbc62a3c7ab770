"""``median-of-means`` (Weak and Strong Gradient Directions, Zielinski et al.): M3, RM3, RA3 vs SGD.

Each optimizer (:mod:`pipelines.optim`) trains the same model from the same initialisation on the
same minibatches at each noise level. Reported: accuracy on pristine and on corrupt training
examples (on their training labels) and on the test set, at the end and against step; and, to
compare at the same fit of the real signal, the corrupt-example accuracy at the first evaluation
where pristine accuracy reaches the highest level every optimizer reaches at that noise level.
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
    coherence_table,
    dump_json,
    experiment,
    write_csv,
)
from pipelines.experiments.verdicts import equivalence_claim, noninferiority_claim
from pipelines.experiments.winsorize import binomial_se, train_condition, verdict_less

#: a fixed margin, chosen before any run, for "keeps test accuracy" (non-inferiority)
TEST_ACC_TOLERANCE = 0.02
#: a fixed margin, chosen before any run (our choice: the same 2 accuracy points), for "RA3 behaves like SGD" (TOST)
EQUIVALENCE_MARGIN = 0.02
LABELS = {"sgd": "SGD", "m3": "M3", "rm3": "RM3", "ra3": "RA3"}


def matched(history: list[dict[str, float]], level: float) -> dict[str, float]:
    """The first evaluation after step 0 with pristine accuracy >= ``level`` (NaNs where none)."""
    for row in history:
        if row["step"] > 0 and row["pristine_acc"] >= level:
            return row
    return {"step": math.nan, "pristine_acc": math.nan, "corrupt_acc": math.nan, "test_acc": math.nan}


@experiment("median-of-means")
def run(config: dict[str, Any], ctx: Context) -> Path:
    """Train every (noise, optimizer) condition, write ``results.csv``, figures and ``report.md``."""
    from gradstore.errors import GradstoreError
    from pipelines.data import load_mnist
    from pipelines.experiments.label_noise import noise_dirs

    unknown = [o for o in config["optimizers"] if o not in LABELS]
    if unknown or "sgd" not in config["optimizers"]:
        raise GradstoreError(f"optimizers must include 'sgd' and come from {', '.join(LABELS)}; got {config['optimizers']}")
    folder = ctx.folder
    noise_dir = noise_dirs(folder, config["noise_levels"])
    dirs = {(p, opt): folder.path(noise_dir[p], opt) for p in noise_dir for opt in config["optimizers"]}
    folder.claim_all(dirs.values(), RECORDED)  # refused now, not after training, if not the run's own
    folder.claim_all([folder.out], [(name, "file") for name in ("results.csv", "summary.json", "accuracy_curves.png",
                                                                "corrupt_vs_pristine.png", "report.md")])
    mnist = load_mnist(ctx.data_dir)
    rows, histories = [], {}
    for noise in config["noise_levels"]:
        for opt in config["optimizers"]:
            result, data, coherence = train_condition(config, noise=noise, optimizer=opt, options={}, mnist=mnist,
                                           run_dir=dirs[(noise, opt)], ctx=ctx,
                                           desc=f"{LABELS[opt]}, {noise:.0%} noise")
            histories[(noise, opt)] = result.history
            final = result.final
            n_corrupt = int(data.corrupt.sum())
            rows.append({"noise": noise, "optimizer": opt, "proper_acc": data.noise.proper_accuracy,
                         "n_train": len(data.y_train), "n_test": len(data.y_test), "n_corrupt": n_corrupt,
                         **{k: final[k] for k in ("train_acc", "pristine_acc", "corrupt_acc", "test_acc")},
                         **coherence})
    for noise in config["noise_levels"]:
        # the highest pristine accuracy every optimizer reaches at this noise level
        level = min(max((h["pristine_acc"] for h in histories[(noise, o)] if h["step"] > 0), default=math.nan)
                    for o in config["optimizers"])
        for row in rows:
            if row["noise"] == noise:
                at = matched(histories[(noise, row["optimizer"])], level)
                row.update(matched_pristine=level, matched_step=at["step"], matched_corrupt_acc=at["corrupt_acc"],
                           matched_test_acc=at["test_acc"])
    with folder.writing("results.csv") as path:
        write_csv(path, rows)
    with folder.writing("summary.json") as path:
        dump_json(path, rows)
    with folder.writing("accuracy_curves.png") as path:
        curves_figure(histories, config, path)
    with folder.writing("corrupt_vs_pristine.png") as path:
        tradeoff_figure(histories, config, path)
    with folder.writing("report.md") as path:
        return build_report(config, ctx, rows, mnist.source).write(path)


def curves_figure(histories, config, path: Path) -> None:
    """Pristine, corrupt and test accuracy (rows) against step, one column per noise level."""
    from analysis.plots import _pyplot, save

    plt = _pyplot()
    levels = config["noise_levels"]
    keys = (("pristine_acc", "pristine (train)"), ("corrupt_acc", "corrupt (train)"), ("test_acc", "test"))
    fig, axes = plt.subplots(3, len(levels), figsize=(3.2 * len(levels), 8), sharex=True, sharey=True, squeeze=False)
    for j, noise in enumerate(levels):
        for i, (key, label) in enumerate(keys):
            ax = axes[i][j]
            for opt in config["optimizers"]:
                hist = histories[(noise, opt)]
                ax.plot([h["step"] for h in hist], [h[key] for h in hist], label=LABELS[opt])
            ax.set_title(f"{label}, {noise:.0%} noise", fontsize=9)
        axes[2][j].set_xlabel("step")
    for i, (_, label) in enumerate(keys):
        axes[i][0].set_ylabel("accuracy")
    axes[0][0].legend(fontsize=7)
    save(fig, path, dpi=110)


def tradeoff_figure(histories, config, path: Path) -> None:
    """Corrupt against pristine accuracy along training (noise strictly between 0 and 1)."""
    from analysis.plots import _pyplot, save

    plt = _pyplot()
    levels = [p for p in config["noise_levels"] if 0 < p < 1] or config["noise_levels"]
    fig, axes = plt.subplots(1, len(levels), figsize=(3.6 * len(levels), 3.4), squeeze=False)
    for ax, noise in zip(axes[0], levels):
        for opt in config["optimizers"]:
            hist = histories[(noise, opt)]
            ax.plot([h["pristine_acc"] for h in hist], [h["corrupt_acc"] for h in hist], marker=".", label=LABELS[opt])
        ax.set_xlabel("pristine accuracy (train)")
        ax.set_ylabel("corrupt accuracy (train)")
        ax.set_title(f"{noise:.0%} noise", fontsize=10)
    axes[0][0].legend(fontsize=7)
    save(fig, path, dpi=110)


def build_report(config, ctx: Context, rows, source: str) -> Report:
    opts = config["optimizers"]
    intro = (
        f"Model `{config['model']}`, optimizers {', '.join(LABELS[o] for o in opts)}, lr {config['lr']}, "
        f"batch {config['batch_size']}, {config['steps']} steps, seed {config['seed']}, data: {source}. "
        "Every optimizer starts from the same initialisation and sees the same minibatches."
        + (" This is the `--quick` variant: far shorter than the paper's runs." if ctx.quick else "")
    )
    report = Report("Median of means: M3, RM3 and RA3 against SGD (Weak and Strong Gradient Directions)", intro)
    by = {(r["noise"], r["optimizer"]): r for r in rows}
    noisy = [p for p in config["noise_levels"] if 0 < p < 1]

    def se(p, opt, key="matched_corrupt_acc", n="n_corrupt"):
        return binomial_se(by[(p, opt)][key], by[(p, opt)][n])

    def vs_sgd(p, opt, key="matched_corrupt_acc", n="n_corrupt"):
        return by[(p, opt)][key], by[(p, "sgd")][key], math.hypot(se(p, opt, key, n), se(p, "sgd", key, n))

    for opt in (o for o in ("m3", "rm3") if o in opts):
        if noisy:
            report.claims.append(Claim(
                f"{LABELS[opt]} fits corrupt examples less than SGD at the same pristine accuracy", "§3–4",
                "; ".join(f"{p:.0%}: corrupt acc {by[(p, opt)]['matched_corrupt_acc']:.3f} vs SGD "
                          f"{by[(p, 'sgd')]['matched_corrupt_acc']:.3f} at pristine acc ≥ {by[(p, opt)]['matched_pristine']:.3f}"
                          for p in noisy),
                verdict_less([vs_sgd(p, opt) for p in noisy])))
            report.claims.append(Claim(
                f"{LABELS[opt]} ends training with fewer corrupt examples fitted than SGD", "§3–4",
                "; ".join(f"{p:.0%}: final corrupt acc {by[(p, opt)]['corrupt_acc']:.3f} (pristine "
                          f"{by[(p, opt)]['pristine_acc']:.3f}) vs SGD {by[(p, 'sgd')]['corrupt_acc']:.3f} "
                          f"(pristine {by[(p, 'sgd')]['pristine_acc']:.3f})" for p in noisy),
                verdict_less([vs_sgd(p, opt, "corrupt_acc") for p in noisy])))
        if 1.0 in config["noise_levels"]:
            a, b = by[(1.0, opt)]["train_acc"], by[(1.0, "sgd")]["train_acc"]
            report.claims.append(Claim(
                f"With random labels {LABELS[opt]} memorizes less than SGD (lower train accuracy)", "§3–4",
                f"100% noise: train acc {a:.3f} vs SGD {b:.3f}", verdict_less([vs_sgd(1.0, opt, "train_acc", "n_train")])))
        clean = [p for p in config["noise_levels"] if p < 1]
        if clean:
            report.claims.append(noninferiority_claim(
                f"{LABELS[opt]} keeps test accuracy (not below SGD by more than {TEST_ACC_TOLERANCE}, noise < 100%)",
                "§3–4", [(f"{p:.0%} noise, test acc {LABELS[opt]} vs SGD", *vs_sgd(p, opt, "test_acc", "n_test"))
                         for p in clean], margin=TEST_ACC_TOLERANCE))
    if "ra3" in opts:
        cases = [(p, "matched_corrupt_acc", "n_corrupt", "corrupt acc at matched pristine acc") for p in noisy]
        cases += [(p, "corrupt_acc", "n_corrupt", "final corrupt acc") for p in noisy]
        if 1.0 in config["noise_levels"]:
            cases.append((1.0, "train_acc", "n_train", "train acc"))
        if cases:
            report.claims.append(equivalence_claim(
                f"RA3 (RM3's staleness with the mean instead of the median) behaves like SGD: equivalent within "
                f"±{EQUIVALENCE_MARGIN}", "§4 (staleness control)",
                [(f"{p:.0%}: {what}, RA3 − SGD", *vs_sgd(p, "ra3", key, n)) for p, key, n, what in cases],
                margin=EQUIVALENCE_MARGIN))
    header = ["noise", "optimizer", "train acc", "pristine acc", "corrupt acc", "test acc",
              "matched pristine level", "step there", "corrupt acc there", "test acc there"]
    report.tables.append(("Final accuracies, and at matched pristine accuracy", header, [
        [f"{r['noise']:.0%}", LABELS[r["optimizer"]], r["train_acc"], r["pristine_acc"], r["corrupt_acc"], r["test_acc"],
         r["matched_pristine"], r["matched_step"], r["matched_corrupt_acc"], r["matched_test_acc"]] for r in rows]))
    report.figures += [
        ("Accuracy on pristine and corrupt training examples and on the test set against step", "accuracy_curves.png"),
        ("Corrupt against pristine training accuracy along training", "corrupt_vs_pristine.png"),
    ]
    report.notes += [
        "Matched comparison: at each noise level, the pristine-accuracy level is the highest every optimizer reaches; "
        "each optimizer's corrupt and test accuracy are read at its first evaluation at or above that level.",
        "The matched comparison reads each optimizer early, where it first reaches the common pristine level; the "
        "final comparison reads all after the same number of steps (pristine accuracies shown beside).",
        "M3 splits each minibatch in order into 3 groups as equal as possible; RM3 and RA3 make no update on their "
        "first two steps (they need three gradients).",
        "Verdicts on differences use binomial standard errors (independent, conservative for models scored on the "
        "same examples): supported beyond 2 SE in the claimed direction, not supported beyond 2 SE the other way, "
        "undecided in between.",
        f"'Keeps test accuracy' is a one-sided non-inferiority z-test with margin {TEST_ACC_TOLERANCE}; 'behaves like "
        f"SGD' is an equivalence test (TOST, two one-sided z-tests) with margin ±{EQUIVALENCE_MARGIN}, so a difference "
        "that is merely not significant is 'undecided', never equivalence. Both margins were fixed before running, "
        "not fitted to results.",
        "Per-condition histories are in noise-*/<optimizer>/history.csv; all final numbers in results.csv.",
    ]
    report.tables.append(coherence_table(rows, "optimizer", "optimizer"))
    return report

