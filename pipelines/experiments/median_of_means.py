"""``median-of-means`` (Weak and Strong Gradient Directions, Zielinski et al.): M3, RM3, RA3 vs SGD.

Each optimizer (:mod:`pipelines.optim`) trains the same model from the same initialisation on the
same minibatches at each noise level. Reported: accuracy on pristine and on corrupt training
examples (on their training labels) and on the test set, at the end and against step; and, to
compare at the same fit of the real signal, the corrupt-example accuracy at the first evaluation
where pristine accuracy reaches the highest level every optimizer reaches at that noise level.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Any

from pipelines.experiments import verdicts
from pipelines.experiments.claims import ClaimSpec, declare
from pipelines.experiments.common import (
    pyplot,
    RECORDED,
    Context,
    Figure,
    Report,
    binomial_se,
    coherence_table,
    dump_json,
    noise_dirs,
    train_condition,
    write_csv,
)
from pipelines.experiments.runner import Outcome, bind

NAME = "median-of-means"
#: a fixed margin, chosen before any run, for "keeps test accuracy" (non-inferiority)
TEST_ACC_TOLERANCE = 0.02
#: a fixed margin, chosen before any run (our choice: the same 2 accuracy points), for "RA3 behaves like SGD" (TOST)
EQUIVALENCE_MARGIN = 0.02
LABELS = {"sgd": "SGD", "m3": "M3", "rm3": "RM3", "ra3": "RA3"}
WS = "Weak and Strong Gradient Directions"
Z = "one-sided z-test with binomial standard errors (independent, conservative for models scored on the same examples)"


def _claims(opt: str) -> tuple[ClaimSpec, ...]:
    o = LABELS[opt]
    return (
        ClaimSpec(f"{opt}_matched", f"{o} fits corrupt examples less than SGD at the same pristine accuracy", WS, "§3–4",
                  f"corrupt accuracy SGD − {o}, each read at its first evaluation reaching the pristine accuracy every "
                  "optimizer reaches", "the matched evaluation", "greater", Z, verdicts.differences, kind="fitting",
                  conditions="every noise level strictly between 0 and 100%"),
        ClaimSpec(f"{opt}_final", f"{o} ends training with fewer corrupt examples fitted than SGD", WS, "§3–4",
                  f"final corrupt accuracy SGD − {o}", "the end of the run", "greater", Z, verdicts.differences,
                  kind="fitting", conditions="every noise level strictly between 0 and 100%"),
        ClaimSpec(f"{opt}_random", f"With random labels {o} memorizes less than SGD (lower train accuracy)", WS,
                  "§3–4", f"final train accuracy SGD − {o} at 100% noise", "the end of the run", "greater", Z,
                  verdicts.differences, kind="fitting", conditions="100% noise"),
        ClaimSpec(f"{opt}_test", f"{o} keeps test accuracy (not below SGD by more than {TEST_ACC_TOLERANCE})", WS,
                  "§3–4", f"final test accuracy {o} − SGD", "the end of the run", "noninferior",
                  f"one-sided non-inferiority z-test, margin {TEST_ACC_TOLERANCE} fixed beforehand",
                  verdicts.differences, margin=TEST_ACC_TOLERANCE, kind="generalization",
                  conditions="every noise level below 100%"),
    )


CLAIMS = declare(
    NAME, *_claims("m3"), *_claims("rm3"),
    ClaimSpec("ra3_like_sgd", f"RA3 (RM3's staleness with the mean instead of the median) behaves like SGD: "
              f"equivalent within ±{EQUIVALENCE_MARGIN}", WS, "§4 (staleness control)",
              "RA3 − SGD: corrupt accuracy at matched pristine accuracy and at the end (noisy levels), train accuracy "
              "at 100% noise", "the matched evaluation and the end of the run", "equivalent",
              f"TOST (two one-sided z-tests), margin ±{EQUIVALENCE_MARGIN} fixed beforehand; a case where SGD moved "
              f"no more than the margin from its step-0 value cannot decide", verdicts.differences_from_a_moved_reference,
              margin=EQUIVALENCE_MARGIN, kind="fitting", conditions="every case"),
)
PAPER: tuple = ()
FIXED_DEVIATIONS = ("the paper trains large models on ImageNet; here the Coherent Gradients MLP on MNIST",)


def matched(history: list[dict[str, float]], level: float) -> dict[str, float]:
    """The first evaluation after step 0 with pristine accuracy >= ``level`` (NaNs where none)."""
    for row in history:
        if row["step"] > 0 and row["pristine_acc"] >= level:
            return row
    return {"step": math.nan, "pristine_acc": math.nan, "corrupt_acc": math.nan, "test_acc": math.nan}


def execute(config: dict[str, Any], ctx: Context) -> Outcome:
    """Train every (noise, optimizer) condition and write ``results.csv``; the runner draws the figures and reports."""
    from gradstore.errors import GradstoreError
    from pipelines.data import load_mnist

    unknown = [o for o in config["optimizers"] if o not in LABELS]
    if unknown or "sgd" not in config["optimizers"]:
        raise GradstoreError(f"optimizers must include 'sgd' and come from {', '.join(LABELS)}; got {config['optimizers']}")
    folder = ctx.folder
    noise_dir = noise_dirs(folder, config["noise_levels"])
    dirs = {(p, opt): folder.path(noise_dir[p], opt) for p in noise_dir for opt in config["optimizers"]}
    folder.claim_all(dirs.values(), RECORDED)  # refused now, not after training, if not the run's own
    folder.claim_all([folder.out], [(name, "file") for name in ("results.csv", "summary.json", "accuracy_curves.png",
                                                                "corrupt_vs_pristine.png")])
    mnist = load_mnist(ctx.data_dir)
    rows, histories = [], {}
    for noise in config["noise_levels"]:
        for opt in config["optimizers"]:
            result, data, coherence = train_condition(config, noise=noise, optimizer=opt, options={}, mnist=mnist,
                                           run_dir=dirs[(noise, opt)], ctx=ctx,
                                           desc=f"{LABELS[opt]}, {noise:.0%} noise")
            histories[(noise, opt)] = result.history
            final = result.final
            start = next((h for h in result.history if h["step"] == 0), {})
            n_corrupt = int(data.corrupt.sum())
            rows.append({"noise": noise, "optimizer": opt, "proper_acc": data.noise.proper_accuracy,
                         "n_train": len(data.y_train), "n_test": len(data.y_test), "n_corrupt": n_corrupt,
                         **{k: final[k] for k in ("train_acc", "pristine_acc", "corrupt_acc", "test_acc")},
                         **{f"start_{k}": start.get(k, math.nan) for k in ("train_acc", "corrupt_acc")},
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
    figures = [
        Figure("accuracy_curves.png", "Accuracy on pristine and corrupt training examples and on the test set against "
               "step", partial(curves_figure, histories, config)),
        Figure("corrupt_vs_pristine.png", "Corrupt against pristine training accuracy along training",
               partial(tradeoff_figure, histories, config)),
    ]
    return Outcome(build_report(config, ctx, rows, mnist.source), claim_inputs(config, rows), mnist.source, figures)


run = bind(__name__)


def claim_inputs(config, rows) -> dict[str, Any]:
    """The (label, a, b, se of a − b) cases of each declared claim the run's optimizers and noise levels allow."""
    opts = config["optimizers"]
    by = {(r["noise"], r["optimizer"]): r for r in rows}
    noisy = [p for p in config["noise_levels"] if 0 < p < 1]

    def case(p, a_opt, b_opt, key, n, what):
        a, b = by[(p, a_opt)], by[(p, b_opt)]
        se = math.hypot(binomial_se(a[key], a[n]), binomial_se(b[key], b[n]))
        return (f"{p:.0%} noise, {what} {LABELS[a_opt]} − {LABELS[b_opt]}", a[key], b[key], se)

    out: dict[str, Any] = {}
    for opt in (o for o in ("m3", "rm3") if o in opts):
        if noisy:
            out[f"{opt}_matched"] = [case(p, "sgd", opt, "matched_corrupt_acc", "n_corrupt", "matched corrupt acc")
                                     for p in noisy]
            out[f"{opt}_final"] = [case(p, "sgd", opt, "corrupt_acc", "n_corrupt", "final corrupt acc") for p in noisy]
        if 1.0 in config["noise_levels"]:
            out[f"{opt}_random"] = [case(1.0, "sgd", opt, "train_acc", "n_train", "train acc")]
        clean = [p for p in config["noise_levels"] if p < 1]
        if clean:
            out[f"{opt}_test"] = [case(p, opt, "sgd", "test_acc", "n_test", "test acc") for p in clean]
    if "ra3" in opts:
        def moved(p, key, start, n, what):  # with SGD's value at step 0
            return (*case(p, "ra3", "sgd", key, n, what), by[(p, "sgd")].get(start, math.nan))

        cases = [moved(p, "matched_corrupt_acc", "start_corrupt_acc", "n_corrupt", "matched corrupt acc")
                 for p in noisy]
        cases += [moved(p, "corrupt_acc", "start_corrupt_acc", "n_corrupt", "final corrupt acc") for p in noisy]
        if 1.0 in config["noise_levels"]:
            cases.append(moved(1.0, "train_acc", "start_train_acc", "n_train", "train acc"))
        if cases:
            out["ra3_like_sgd"] = cases
    return out


def curves_figure(histories, config, path: Path) -> None:
    """Pristine, corrupt and test accuracy (rows) against step, one column per noise level."""
    from analysis.plots import save

    plt = pyplot()
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
    from analysis.plots import save

    plt = pyplot()
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
    header = ["noise", "optimizer", "train acc", "pristine acc", "corrupt acc", "test acc",
              "matched pristine level", "step there", "corrupt acc there", "test acc there"]
    report.tables.append(("Final accuracies, and at matched pristine accuracy", header, [
        [f"{r['noise']:.0%}", LABELS[r["optimizer"]], r["train_acc"], r["pristine_acc"], r["corrupt_acc"], r["test_acc"],
         r["matched_pristine"], r["matched_step"], r["matched_corrupt_acc"], r["matched_test_acc"]] for r in rows]))
    report.notes += [
        "Matched comparison: at each noise level, the pristine-accuracy level is the highest every optimizer reaches; "
        "each optimizer's corrupt and test accuracy are read at its first evaluation at or above that level.",
        "The matched comparison reads each optimizer early, where it first reaches the common pristine level; the "
        "final comparison reads all after the same number of steps (pristine accuracies shown beside).",
        "M3 splits each minibatch in order into 3 groups as equal as possible; RM3 and RA3 make no update on their "
        "first two steps (they need three gradients).",
        "Verdicts come from the declared claims (`CLAIMS`): one-sided z-tests with binomial standard errors "
        "(independent, conservative for models scored on the same examples), intersection-union over the noise levels, "
        "Holm for the opposite; otherwise inconclusive.",
        f"'Keeps test accuracy' is a one-sided non-inferiority z-test with margin {TEST_ACC_TOLERANCE}; 'behaves like "
        f"SGD' is an equivalence test (TOST, two one-sided z-tests) with margin ±{EQUIVALENCE_MARGIN}, so a difference "
        "that is merely not significant is inconclusive, never equivalence. Both margins were fixed before running, "
        "not fitted to results.",
        "Per-condition histories are in noise-*/<optimizer>/history.csv; all final numbers in results.csv.",
    ]
    report.tables.append(coherence_table(rows, "optimizer", "optimizer"))
    return report

