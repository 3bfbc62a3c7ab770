"""``easy-hard`` (Weak and Strong Gradient Directions, Zielinski et al.): easy examples generalize.

Phase 1 trains the 784-2048-10 MLP with SGD up to the *snapshot* step with a Recorder (exact Gram
blocks) on a tracked sample. Training examples are then split into *easy* and *hard*:

- rule ``snapshot``: easy = classified correctly (on its training label) at the snapshot step;
- rule ``first_learned``: easy = first classified correctly at or before step ``learned_by``
  (at evaluation resolution, from ``TrainResult.learned.first_learned``).

Phase 2 retrains fresh models (same architecture, same initialisation) on a random part of each
group, the same number of examples for both groups, and tests each on the held-out rest of its own
group (and of the other group). From the store, m-coherence and pairwise alpha within easy, within
hard and across are computed from the stored Gram (:func:`analysis.hardness.easy_hard`), with a
permutation p-value for "easy more coherent than hard" (:func:`analysis.nulls.coherence_gap`).
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
    dump_json,
    train_recorded,
    write_csv,
)
from pipelines.experiments.runner import Outcome, bind

NAME = "easy-hard"
WS = "Weak and Strong Gradient Directions"
CLAIMS = declare(
    NAME,
    ClaimSpec("heldout", "Easy examples generalize to held-out easy examples better than hard to hard", WS,
              "§hardness", "held-out accuracy: model retrained on easy, on held-out easy − retrained on hard, on "
              "held-out hard", "after retraining", "greater", "one-sided Fisher exact test on the held-out examples "
              "(one retrained model per group: it does not include the variation between training runs)",
              verdicts.heldout, kind="generalization", conditions="every split rule"),
    ClaimSpec("coherent", "Easy examples are more coherent than hard ones", WS, "§hardness",
              "whole-model m-coherence within easy − within hard, tracked sample", "every captured step", "greater",
              "one-sided permutation test of the gap (group sizes kept)", verdicts.per_step,
              conditions="every split rule and every captured step"),
)
PAPER: tuple = ()
FIXED_DEVIATIONS = ("the paper studies large models on ImageNet; here the Coherent Gradients MLP on MNIST",)
MODEL_LAYER = "(model)"
RULES = ("snapshot", "first_learned")
GROUPS = ("easy", "hard")


def check_config(config: dict[str, Any]) -> None:
    """One clear error for settings the experiment cannot run with."""
    split = config["split"]
    unknown = [r for r in split["rules"] if r not in RULES]
    if unknown or not split["rules"]:
        raise GradstoreError(f"easy-hard: [split] rules must be a non-empty list of {', '.join(RULES)}; "
                             f"got {split['rules']}")
    if not 0 <= split["learned_by"] <= config["steps"]:
        raise GradstoreError(f"easy-hard: [split] learned_by must be between 0 and steps ({config['steps']}), "
                             f"got {split['learned_by']}")
    if not 0.0 < split["fit_fraction"] < 1.0:
        raise GradstoreError(f"easy-hard: [split] fit_fraction must be in (0, 1), got {split['fit_fraction']}")
    if config["retrain"]["steps"] < 1:
        raise GradstoreError(f"easy-hard: [retrain] steps must be >= 1, got {config['retrain']['steps']}")


def easy_masks(learned, rules, learned_by: int) -> dict[str, np.ndarray]:
    """Easy mask over the training set for each rule, from the learned times of phase 1.

    Phase 1 ends at the snapshot step, where the trainer always evaluates, so ``run_start >= 0``
    (correct at the last evaluation) means correct at the snapshot.
    """
    out = {}
    for rule in rules:
        if rule == "snapshot":
            out[rule] = np.asarray(learned.run_start) >= 0
        else:
            first = np.asarray(learned.first_learned)
            out[rule] = (first >= 0) & (first <= learned_by)
    return out


def fit_and_holdout(easy: np.ndarray, fraction: float, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per group: (indices to fit on, held-out indices), the fit parts of equal size.

    Both groups fit on ``floor(fraction * min(n_easy, n_hard))`` random examples, so the easy model
    does not simply see more data; the held-out part is the rest of the group.
    """
    rng = np.random.default_rng(seed)
    members = {"easy": np.flatnonzero(easy), "hard": np.flatnonzero(~easy)}
    n_fit = int(fraction * min(len(v) for v in members.values()))
    out = {}
    for group in GROUPS:
        order = rng.permutation(members[group])
        out[group] = (np.sort(order[:n_fit]), np.sort(order[n_fit:]))
    return out


def retrain(config, data, fit: np.ndarray, held: dict[str, np.ndarray], run_dir: Path, ctx: Context,
            *, desc: str) -> dict[str, Any]:
    """Train a fresh model on ``fit`` (training labels); accuracy on each held-out set and the test set.

    ``run_dir`` (a folder of ``ctx.folder``) keeps the checkpoint.
    """
    import torch
    from tqdm import tqdm

    from pipelines.models import build_model
    from pipelines.train import TrainConfig, TrainData, evaluate, train

    rt = config["retrain"]
    tc = TrainConfig(model=config["model"], noise=0.0, seed=config["seed"] + rt["seed_offset"], lr=config["lr"],
                     batch_size=config["batch_size"], steps=rt["steps"], eval_every=rt["steps"], device=ctx.device)
    part = torch.as_tensor(fit, device=data.x_train.device)
    sub = TrainData(x_train=data.x_train[part], y_train=data.y_train[part], y_true=data.y_true[part],
                    corrupt=data.corrupt[part], train_ids=data.train_ids[part], x_test=data.x_test,
                    y_test=data.y_test, test_ids=data.test_ids, noise=data.noise)
    checkpoint = ctx.folder.claim(run_dir, "checkpoint.pt")
    ctx.folder.makedirs(run_dir)
    model = build_model(config["model"], seed=tc.seed).to(ctx.device)
    with tqdm(total=tc.steps, desc=desc, unit="step", disable=not ctx.progress, leave=False) as bar:
        result = train(tc, sub, model=model, checkpoint=checkpoint, checkpoint_every=tc.steps,
                       progress=lambda _s: bar.update(1))
    row = {"n_fit": int(len(fit)), "fit_acc": result.final["train_acc"], "test_acc": result.final["test_acc"]}
    for group, index in held.items():
        idx = torch.as_tensor(index, device=data.x_train.device)
        held_data = TrainData(x_train=data.x_train[idx], y_train=data.y_train[idx], y_true=data.y_true[idx],
                              corrupt=data.corrupt[idx], train_ids=data.train_ids[idx], x_test=data.x_test[:0],
                              y_test=data.y_test[:0], test_ids=data.test_ids[:0], noise=data.noise)
        metrics, correct = evaluate(result.model, held_data, batch=tc.eval_batch)
        row[f"held_{group}_acc"] = metrics["train_acc"] if len(index) else float("nan")
        row[f"held_{group}_n"] = int(len(index))
        row[f"held_{group}_correct"] = int(correct.sum())
    return row


def store_easy_hard(store: Path, easy_tracked: np.ndarray, *, nulls: int, seed: int):
    """Within/across-group coherence from the stored Gram, with the permutation test of the gap.

    Returns a computed Dataset on (step, layer, group[, group_]) with ``easy_hard_gap`` and its
    one-sided (``greater``: easy more coherent) ``easy_hard_gap_p_value`` when both groups are
    non-empty and ``nulls > 0``.
    """
    from analysis import hardness, nulls as null_tests, sources
    from analysis.report import open_store

    ds = open_store(store)
    index = np.flatnonzero(sources.split_mask(ds, "train").values)
    gram = sources.layer_gram(ds, "exact", examples=index)
    out = hardness.easy_hard(gram, easy_tracked)
    if nulls and 0 < easy_tracked.sum() < easy_tracked.size:
        test = null_tests.permutation_test(null_tests.coherence_gap(gram), easy_tracked, n_permutations=nulls,
                                           seed=seed, alternative="greater")
        out["easy_hard_gap"] = test["observed"]
        out["easy_hard_gap_p_value"] = test["p_value"]
    return out.compute()


def coherence_rows(res, rule: str) -> list[dict[str, Any]]:
    """Whole-model rows per captured step: m-coherence and pairwise alpha by group, gap and p."""
    whole = res.sel(layer=MODEL_LAYER)
    rows = []
    for k, step in enumerate(whole.step.values):
        at = whole.isel(step=k)
        rows.append({
            "rule": rule, "step": int(step),
            "m_easy": int(at["m"].sel(group="easy")), "m_hard": int(at["m"].sel(group="hard")),
            "m_coherence_easy": float(at["m_coherence"].sel(group="easy")),
            "m_coherence_hard": float(at["m_coherence"].sel(group="hard")),
            "alpha_easy": float(at["pairwise_alpha"].sel(group="easy", group_="easy")),
            "alpha_hard": float(at["pairwise_alpha"].sel(group="hard", group_="hard")),
            "alpha_across": float(at["pairwise_alpha"].sel(group="easy", group_="hard")),
            "gap": float(at["easy_hard_gap"]) if "easy_hard_gap" in at else float("nan"),
            "gap_p": float(at["easy_hard_gap_p_value"]) if "easy_hard_gap_p_value" in at else float("nan"),
        })
    return rows


def execute(config: dict[str, Any], ctx: Context) -> Outcome:
    """Phase 1 with capture, easy/hard split, retraining per group, store coherence; write ``report.md``."""
    from pipelines.data import load_mnist

    check_config(config)
    folder = ctx.folder
    rules = config["split"]["rules"]
    retrain_dirs = {(rule, group): folder.path(f"retrain-{rule}-{group}") for rule in rules for group in GROUPS}
    # every name built from the configuration checked, and what exists refused if not the run's own, before any work
    folder.claim_all([folder.path("phase1")], RECORDED[:4])
    folder.claim_all(retrain_dirs.values(), [("checkpoint.pt", "file")])
    folder.claim_all([folder.path("analysis")], [(f"easy_hard_{rule}.csv", "file") for rule in rules])
    folder.claim_all([folder.out], [(f"coherence_{rule}.png", "file") for rule in rules] + [
        (name, "file") for name in ("heldout_accuracy.png", "heldout_accuracy.csv", "coherence_by_step.csv",
                                    "summary.json")])
    mnist = load_mnist(ctx.data_dir)
    noise = float(config["noise"])
    result, data, store = train_recorded(config, noise, mnist, folder.path("phase1"), ctx, desc="phase 1 (snapshot)")
    masks = easy_masks(result.learned, config["split"]["rules"], config["split"]["learned_by"])
    ds_ids = _tracked_train_ids(store)
    position = {int(i): k for k, i in enumerate(data.train_ids.cpu().numpy())}
    tracked = np.array([position[int(i)] for i in ds_ids])
    split_rows, acc_rows, coh_rows, coherence_figures = [], [], [], []
    for rule, easy in masks.items():
        split_rows.append({"rule": rule, "n_easy": int(easy.sum()), "n_hard": int((~easy).sum()),
                           "tracked_easy": int(easy[tracked].sum()), "tracked_hard": int((~easy[tracked]).sum())})
        parts = fit_and_holdout(easy, config["split"]["fit_fraction"], config["seed"] + 500)
        held = {g: parts[g][1] for g in GROUPS}
        for group in GROUPS:
            fit = parts[group][0]
            if len(fit) < 1:
                acc_rows.append({"rule": rule, "trained_on": group, "n_fit": 0})
                continue
            row = retrain(config, data, fit, held, retrain_dirs[(rule, group)], ctx,
                          desc=f"retrain on {group} ({rule})")
            acc_rows.append({"rule": rule, "trained_on": group, **row})
        if not 0 < easy[tracked].sum() < len(tracked):
            continue  # the tracked sample lacks one group: the coherence claim says so (undecided)
        res = store_easy_hard(store, easy[tracked], nulls=config["analysis"]["nulls"], seed=config["analysis"]["seed"])
        with folder.writing("analysis", f"easy_hard_{rule}.csv") as path:
            res.drop_vars([v for v in res.data_vars if "group_" in res[v].dims]).to_dataframe().to_csv(path)
        coh_rows += coherence_rows(res, rule)
        coherence_figures.append(Figure(f"coherence_{rule}.png", f"Coherence within easy, within hard and across "
                                        f"({rule})", partial(coherence_figure, res, rule=rule)))
    with folder.writing("heldout_accuracy.csv") as path:
        write_csv(path, acc_rows)
    with folder.writing("coherence_by_step.csv") as path:
        write_csv(path, coh_rows)
    with folder.writing("summary.json") as path:
        dump_json(path, {"split": split_rows, "heldout": acc_rows, "coherence": coh_rows,
                         "phase1_final": result.final})
    report = build_report(config, ctx, mnist.source, result.final, split_rows, acc_rows, coh_rows)
    figures = [Figure("heldout_accuracy.png", "Held-out accuracy of models retrained on easy or on hard examples",
                      partial(accuracy_figure, acc_rows)), *coherence_figures]
    return Outcome(report, claim_inputs(split_rows, acc_rows, coh_rows), mnist.source, figures)


run = bind(__name__)


def claim_inputs(split_rows, acc_rows, coh_rows) -> dict[str, Any]:
    heldout, steps = [], []
    for split in split_rows:
        rule = split["rule"]
        by = {r["trained_on"]: r for r in acc_rows if r["rule"] == rule}
        ok = all(by.get(g, {}).get("n_fit", 0) >= 1 for g in GROUPS)
        heldout.append({"label": f"rule {rule}", "n_fit": by["easy"]["n_fit"] if ok else 0,  # the label names the
                        # condition, the same in every seed (the fit size depends on the seed's split)
                        "easy_correct": by["easy"]["held_easy_correct"] if ok else 0,
                        "easy_n": by["easy"]["held_easy_n"] if ok else 0,
                        "hard_correct": by["hard"]["held_hard_correct"] if ok else 0,
                        "hard_n": by["hard"]["held_hard_n"] if ok else 0})
        rows = [r for r in coh_rows if r["rule"] == rule]
        if not rows:
            steps.append({"label": f"rule {rule}", "step": -1, "estimate": float("nan"), "p": float("nan"),
                          "reason": "the tracked sample lacks easy or hard examples"})
        steps += [{"label": f"rule {rule}, step {r['step']}", "step": r["step"], "estimate": r["gap"], "p": r["gap_p"],
                   "detail": f"m-coherence easy {r['m_coherence_easy']:.3g} (m = {r['m_easy']}) vs hard "
                             f"{r['m_coherence_hard']:.3g} (m = {r['m_hard']})"} for r in rows]
    return {"heldout": heldout, "coherent": steps}


def _tracked_train_ids(store: Path) -> np.ndarray:
    from analysis import sources
    from analysis.report import open_store

    ds = open_store(store)
    return ds.example.values[sources.split_mask(ds, "train").values]


def coherence_figure(res, path: Path, *, rule: str) -> None:
    """Whole-model m-coherence within easy and hard, and pairwise alpha within and across, vs step."""
    from analysis.plots import save

    plt = pyplot()
    whole = res.sel(layer=MODEL_LAYER)
    steps = np.maximum(whole.step.values, 0.5)  # step 0 drawn at 0.5 on the log axis
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for group in GROUPS:
        m = int(whole["m"].sel(group=group))
        ax1.plot(steps, whole["m_coherence"].sel(group=group), marker=".", label=f"{group} (m = {m})")
        ax1.axhline(m, ls=":", lw=0.8, color="C0" if group == "easy" else "C1")
    ax1.axhline(1, color="grey", ls="--", lw=0.8, label="orthogonal limit (1)")
    ax1.set(xscale="log", yscale="log", xlabel="training step (log)", ylabel="m-coherence (whole model)",
            title=f"within-group m-coherence ({rule}); dotted: m")
    ax1.legend(fontsize=7)
    for a, b, label in (("easy", "easy", "easy–easy"), ("hard", "hard", "hard–hard"), ("easy", "hard", "easy–hard")):
        ax2.plot(steps, whole["pairwise_alpha"].sel(group=a, group_=b), marker=".", label=label)
    ax2.axhline(0, color="grey", ls="--", lw=0.8)
    ax2.set(xscale="log", xlabel="training step (log)", ylabel="pairwise alpha (mean g_i·g_j / mean ||g||²)",
            title="pairwise alpha within and across")
    ax2.legend(fontsize=7)
    save(fig, path, dpi=110)


def accuracy_figure(acc_rows, path: Path) -> None:
    """Held-out accuracy of models retrained on easy or hard, on held-out easy and hard examples."""
    from analysis.plots import save

    plt = pyplot()
    rules = list(dict.fromkeys(r["rule"] for r in acc_rows))
    fig, axes = plt.subplots(1, len(rules), figsize=(4.2 * len(rules), 3.6), squeeze=False, sharey=True)
    for ax, rule in zip(axes[0], rules):
        rows = [r for r in acc_rows if r["rule"] == rule and r.get("n_fit", 0) > 0]
        x = np.arange(len(rows))
        for k, group in enumerate(GROUPS):
            acc = np.array([r[f"held_{group}_acc"] for r in rows], dtype=float)
            n = np.array([max(r[f"held_{group}_n"], 1) for r in rows], dtype=float)
            ax.bar(x + (k - 0.5) * 0.38, acc, width=0.36, yerr=1.96 * np.sqrt(acc * (1 - acc) / n), capsize=3,
                   label=f"held-out {group} (95% binomial interval)")
        ax.set_xticks(x, [f"trained on {r['trained_on']}\n(n = {r['n_fit']})" for r in rows])
        ax.set(ylim=(0, 1), title=f"rule: {rule}")
    axes[0][0].set_ylabel("accuracy")
    axes[0][0].legend(fontsize=7)
    save(fig, path, dpi=110)


def build_report(config, ctx: Context, source: str, phase1, split_rows, acc_rows, coh_rows) -> Report:
    cap, split = config["capture"], config["split"]
    intro = (
        f"Phase 1: model `{config['model']}`, SGD lr {config['lr']}, batch {config['batch_size']}, "
        f"{config['noise']:.0%} label noise, trained to the snapshot step {config['steps']} (seed {config['seed']}; "
        f"data: {source}); final train accuracy {phase1['train_acc']:.3f}, test accuracy {phase1['test_acc']:.3f}. "
        f"Easy = correct at the snapshot (rule `snapshot`) or first correct by step {split['learned_by']} "
        f"(rule `first_learned`, evaluation resolution); hard = the rest. Phase 2: a fresh model (seed "
        f"{config['seed'] + config['retrain']['seed_offset']}, {config['retrain']['steps']} steps) per group, "
        f"fitted on {split['fit_fraction']:.0%} of the smaller group's size from each group, tested on the held-out "
        f"rest of both groups. Coherence: exact Gram over {cap['tracked_train']} tracked training examples, "
        f"{config['analysis']['nulls']} permutations."
        + (" This is the `--quick` variant: far shorter than the paper's runs." if ctx.quick else "")
    )
    report = Report("Easy and hard examples (Weak and Strong Gradient Directions)", intro)
    report.tables.append(("Easy/hard split", ["rule", "easy", "hard", "tracked easy", "tracked hard"],
                          [[r["rule"], r["n_easy"], r["n_hard"], r["tracked_easy"], r["tracked_hard"]]
                           for r in split_rows]))
    report.tables.append(("Retrained models: held-out accuracy",
                          ["rule", "trained on", "fit examples", "fit acc", "held-out easy acc", "held-out hard acc",
                           "MNIST test acc"],
                          [[r["rule"], r["trained_on"], r.get("n_fit", 0), r.get("fit_acc", float("nan")),
                            r.get("held_easy_acc", float("nan")), r.get("held_hard_acc", float("nan")),
                            r.get("test_acc", float("nan"))] for r in acc_rows]))
    report.tables.append(("Coherence within and across groups (whole model) per captured step",
                          ["rule", "step", "m-coh easy", "m-coh hard", "alpha easy", "alpha hard", "alpha across",
                           "m-coh gap", "p (gap > null)"],
                          [[r["rule"], r["step"], r["m_coherence_easy"], r["m_coherence_hard"], r["alpha_easy"],
                            r["alpha_hard"], r["alpha_across"], r["gap"], r["gap_p"]] for r in coh_rows]))
    hard_counts = ", ".join(f"{r['rule']}: {r['tracked_hard']}" for r in split_rows)
    report.notes += [
        "pairwise alpha = mean over pairs i ≠ j of g_i·g_j divided by the mean ||g||² (0: orthogonal, 1: identical); "
        "it does not grow with the group size, unlike m-coherence, so the claim compares alpha. The p-value is a "
        "one-sided permutation p-value of m-coherence(easy) − m-coherence(hard) with group sizes kept.",
        "The coherence verdict is one pre-declared test, not a count of steps: the claim is made at every captured "
        "step, so it is supported only if every step's one-sided permutation test rejects at 0.05 (intersection-union) "
        "and not supported if the opposite is significant at some step after Holm over the steps; otherwise "
        "inconclusive. Few hard examples in the tracked sample "
        f"({hard_counts}) give the permutation test little power, and then it is more often undecided.",
        "The held-out accuracy test is one retrained model per group; the Fisher p-value counts held-out examples "
        "only and does not include the variation between training runs.",
        "Accuracy is on each example's training label (the true label at 0% noise).",
        "Phase-1 store, history and learned times are in phase1/; per-step coherence in coherence_by_step.csv.",
    ]
    return report
