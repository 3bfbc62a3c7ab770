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

from pathlib import Path
from typing import Any

import numpy as np

from gradstore.errors import GradstoreError
from pipelines.experiments.common import (
    Claim,
    Context,
    Report,
    distinct_dirs,
    dump_json,
    experiment,
    number_label,
    tracked_indices,
    write_csv,
)

MODEL_LAYER = "(model)"


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
    """Train one model at one noise level with a primed Recorder; return (TrainResult, store path).

    ``run_dir`` is a folder of ``ctx.folder`` (:meth:`~pipelines.experiments.common.RunFolder.path`).
    """
    from tqdm import tqdm

    from gradstore.store import Recorder, Schedule
    from pipelines.models import build_model
    from pipelines.train import TrainConfig, TrainData, train

    cap, seed = config["capture"], config["seed"]
    data = TrainData.from_mnist(mnist, noise=noise, seed=seed, device=ctx.device)
    n = len(data.y_train)
    steps_per_epoch = n // config["batch_size"]
    if steps_per_epoch < 1:
        raise GradstoreError(f"coherence-evolution: batch_size {config['batch_size']} exceeds the {n} training examples")
    steps = capture_steps(steps_per_epoch, config["epochs"], cap["first_epoch_every"])
    tc = TrainConfig(model=model_name, noise=noise, seed=seed, lr=config["lr"], batch_size=config["batch_size"],
                     steps=steps[-1], eval_every=config["eval_every"] or steps[-1], device=ctx.device)
    tc.validate()
    tr = tracked_indices(n, cap["tracked_train"], seed + 100, key="[capture] tracked_train", data="training examples")
    te = tracked_indices(len(data.y_test), cap["tracked_test"], seed + 200, key="[capture] tracked_test",
                         data="test examples")
    rng = np.random.default_rng(seed + 400)
    prime = [data.x_train[np.sort(rng.choice(n, min(cap["prime_batch_size"], n), replace=False))]
             for _ in range(cap["prime_batches"])]
    model = build_model(model_name, seed=seed).to(ctx.device)
    folder = ctx.folder
    store = folder.claim(run_dir, "store.zarr", kind="dir")
    checkpoint, history = folder.claim(run_dir, "checkpoint.pt"), folder.claim(run_dir, "history.csv")
    folder.makedirs(run_dir)
    recorder = Recorder(
        str(store), model,
        train_inputs=data.x_train[tr], train_targets=data.y_train[tr], train_ids=data.train_ids[tr].cpu().numpy(),
        train_true=data.y_true[tr].cpu().numpy(),
        test_inputs=data.x_test[te] if len(te) else None, test_targets=data.y_test[te] if len(te) else None,
        test_ids=data.test_ids[te].cpu().numpy() if len(te) else None,
        schedule=Schedule.at(steps), coords_per_layer=0, coord_seed=seed, gram=False,
        config={**config, "model": model_name, "noise": noise}, seeds={"seed": seed}, resume=ctx.resume,
        prime_batches=prime,
    )
    with folder.errors(f"recording the run store {store}"), recorder, tqdm(
            total=tc.steps, desc=f"{model_name}, {noise:.0%} noise", unit="step", disable=not ctx.progress,
            leave=False) as bar:
        result = train(tc, data, model=model, observers=[recorder],
                       checkpoint=checkpoint, checkpoint_every=max(steps_per_epoch, 1),
                       progress=lambda _s: bar.update(1))
    with folder.errors(f"writing {history}"):
        write_csv(history, result.history)
    kinds = {name: type(module).__name__ for name, module in model.named_modules()}
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
    for sample, key in (("tracked_train", "train"), ("tracked_test", "test")):
        if sample not in res["sample"].values:
            continue
        mc = res["m_coherence"].sel(sample=sample, layer=MODEL_LAYER).values
        if not np.isfinite(mc).any():
            continue
        k = int(np.nanargmax(mc))
        row[f"{key}_m"] = int(res["m"].sel(sample=sample, layer=MODEL_LAYER).values[0])
        row[f"{key}_initial"], row[f"{key}_final"] = float(mc[0]), float(mc[-1])
        row[f"{key}_peak"], row[f"{key}_peak_step"] = float(mc[k]), int(steps[k])
    return row


def layer_figure(res, kinds: dict[str, str], path: Path, *, title: str) -> None:
    """m-coherence against step per layer (log-log), train and test panels, lines at 1 and m."""
    from analysis.plots import _pyplot, save

    plt = _pyplot()
    samples = [s for s in ("tracked_train", "tracked_test") if s in res["sample"].values]
    fig, axes = plt.subplots(1, len(samples), figsize=(6.2 * len(samples), 4.4), squeeze=False, sharey=True)
    steps = np.maximum(res["step"].values, 0.5)  # step 0 drawn at 0.5 on the log axis
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
        ax.set(xscale="log", yscale="log", xlabel="training step (log; step 0 at 0.5)",
               title=f"{'training' if sample == 'tracked_train' else 'held-out test'} sample (m = {m})")
    axes[0][0].set_ylabel("m-coherence")
    axes[0][-1].legend(fontsize=6, loc="best")
    fig.suptitle(title)
    save(fig, path, dpi=110)


def summary_figure(models, noise_levels, results: dict, path: Path) -> None:
    """Whole-model m-coherence against step: one panel per model, a colour per noise level,
    solid for the training sample and dashed for the held-out test sample."""
    from analysis.plots import _pyplot, save

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.2), squeeze=False)
    for ax, model_name in zip(axes[0], models):
        m = 1
        for k, noise in enumerate(noise_levels):
            res = results[(model_name, noise)]
            steps = np.maximum(res["step"].values, 0.5)
            for sample, ls in (("tracked_train", "-"), ("tracked_test", "--")):
                if sample in res["sample"].values:
                    ax.plot(steps, res["m_coherence"].sel(sample=sample, layer=MODEL_LAYER), ls=ls, color=f"C{k}",
                            label=f"{noise:.0%} noise, {'train' if sample == 'tracked_train' else 'test'}")
                    m = max(m, int(res["m"].sel(sample=sample, layer=MODEL_LAYER).values[0]))
        ax.axhline(1, color="grey", ls="--", lw=0.8)
        ax.axhline(m, color="black", ls=":", lw=0.8)
        ax.set(xscale="log", yscale="log", xlabel="training step (log; step 0 at 0.5)",
               ylabel="m-coherence of the whole model", title=f"{model_name} (lines at 1 and m = {m})")
        ax.legend(fontsize=7)
    save(fig, path, dpi=110)


@experiment("coherence-evolution")
def run(config: dict[str, Any], ctx: Context) -> Path:
    """Train every (model, noise), analyse each store, write figures and ``report.md``; return its path."""
    from pipelines.data import load_mnist

    check_config(config)
    folder = ctx.folder
    labels = distinct_dirs({noise: f"noise-{number_label(noise, 'noise_levels')}" for noise in config["noise_levels"]},
                           "noise_levels")
    dirs = {(m, p): (folder.path(f"{m}-{label}"), folder.path(f"layers_{m}_{label}.png"))
            for m in config["models"] for p, label in labels.items()}  # checked before any work
    folder.claim_all([run_dir for run_dir, _ in dirs.values()], [
        ("store.zarr", "dir"), ("checkpoint.pt", "file"), ("history.csv", "file"), ("analysis", "dir")])
    folder.claim_all([folder.out], [(png.name, "file") for _, png in dirs.values()] + [
        (name, "file") for name in ("m_coherence.png", "summary.csv", "summary.json", "report.md")])
    mnist = subsample(load_mnist(ctx.data_dir), config["train_examples"], config["test_examples"], config["seed"])
    rows, results = [], {}
    for model_name in config["models"]:
        for noise in config["noise_levels"]:
            run_dir, layers_png = dirs[(model_name, noise)]
            result, store, spe, kinds = train_one(config, model_name, noise, mnist, run_dir, ctx)
            res = analyse(store, folder.claim(run_dir, "analysis", kind="dir"), replace=ctx.resume)
            results[(model_name, noise)] = res
            rows.append(summarise(model_name, noise, result, res, spe))
            with folder.writing(layers_png.name) as path:
                layer_figure(res, kinds, path, title=f"{model_name}, {noise:.0%} label noise: m-coherence per layer")
    with folder.writing("m_coherence.png") as path:
        summary_figure(config["models"], config["noise_levels"], results, path)
    with folder.writing("summary.csv") as path:
        write_csv(path, rows)
    with folder.writing("summary.json") as path:
        dump_json(path, rows)
    report = build_report(config, ctx, rows, results, mnist)
    with folder.writing("report.md") as path:
        return report.write(path)


def _real_vs_random(model_name: str, results) -> Claim | None:
    clean, rand = results.get((model_name, 0.0)), results.get((model_name, 1.0))
    if clean is None or rand is None:
        return None
    a = clean["m_coherence"].sel(sample="tracked_train", layer=MODEL_LAYER)
    b = rand["m_coherence"].sel(sample="tracked_train", layer=MODEL_LAYER)
    later = a.step.values > 0  # step 0: the same initial model, only the labels differ
    a, b = a.values[later], b.values[later]
    ok = np.isfinite(a) & np.isfinite(b)
    higher = int((a[ok] > b[ok]).sum())
    ratio = float(np.exp(np.median(np.log(a[ok] / b[ok])))) if ok.any() else float("nan")
    return Claim(
        f"{model_name}: coherence is higher for real labels than for random labels", "Making Coherence… §5",
        f"whole-model m-coherence on the tracked training sample: 0% > 100% noise at {higher} of {int(ok.sum())} "
        f"captured steps after step 0 (median ratio {ratio:.3g})",
        bool(2 * higher > ok.sum()) if ok.any() else None)


def _curve(results, model_name: str, noise: float) -> dict | None:
    res = results.get((model_name, noise))
    if res is None:
        return None
    return {"noise": noise, "steps": res["step"].values,
            "values": res["m_coherence"].sel(sample="tracked_train", layer=MODEL_LAYER).values}


def _rises(model_name: str, config, results) -> list[Claim]:
    """The paper's claim: coherence starts low and rises, quickly with real labels and slowly with
    random ones (which peak late): :func:`~pipelines.experiments.verdicts.rises_claim` and
    :func:`~pipelines.experiments.verdicts.rises_faster_claim`."""
    from pipelines.experiments.verdicts import rises_claim, rises_faster_claim

    curves = [c for c in (_curve(results, model_name, p) for p in config["noise_levels"]) if c is not None]
    if not curves:
        return []
    out = [rises_claim(model_name, curves)]
    faster = rises_faster_claim(model_name, _curve(results, model_name, 0.0), _curve(results, model_name, 1.0))
    return out + ([faster] if faster is not None else [])


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
        f"{cap['prime_batch_size']} at the current weights (restored afterwards)."
        + (" This is the `--quick` variant: far shorter than the paper's runs." if ctx.quick else "")
    )
    report = Report("Coherence evolution (Making Coherence Out of Nothing At All)", intro)
    for model_name in config["models"]:
        for claim in (_real_vs_random(model_name, results), *_rises(model_name, config, results)):
            if claim is not None:
                report.claims.append(claim)
    header = ["model", "noise", "train acc", "test acc", "train m", "train m-coh step 0", "train peak", "peak step",
              "train last", "test m", "test m-coh step 0", "test peak", "test peak step", "test last"]
    nan = float("nan")
    report.tables.append(("Whole-model m-coherence per model and noise level", header, [
        [r["model"], f"{r['noise']:.0%}", r["train_acc"], r["test_acc"], r.get("train_m", 0),
         r.get("train_initial", nan), r.get("train_peak", nan), r.get("train_peak_step", "–"), r.get("train_final", nan),
         r.get("test_m", 0), r.get("test_initial", nan), r.get("test_peak", nan), r.get("test_peak_step", "–"),
         r.get("test_final", nan)] for r in rows]))
    report.figures.append(("Whole-model m-coherence against step (solid: training sample, dashed: held-out test "
                           "sample), log-log, lines at 1 and m", "m_coherence.png"))
    report.figures += [(f"{r['model']}, {r['noise']:.0%} noise: m-coherence per layer against step, training and "
                        f"held-out test samples", f"layers_{r['model']}_noise-{r['noise']:.2f}.png") for r in rows]
    report.notes += [
        "m-coherence is 1 when the per-example gradients are pairwise orthogonal and m when they are all equal; "
        "per layer it uses that layer's parameters only.",
        "Test examples are scored with their true labels at every noise level; the training sample with its "
        "training labels (random at 100% noise).",
        "Per-run stores, analysis (results.zarr, coherence.csv) and histories are in the MODEL-noise-*/ folders.",
    ]
    return report
