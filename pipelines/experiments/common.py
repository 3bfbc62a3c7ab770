"""Pieces every experiment uses: the output folder, the tracked sample, training with a Recorder,
and the markdown report."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gradstore.errors import GradstoreError


@dataclass
class Context:
    """Where and how an experiment runs (from the command line)."""

    out: Path
    data_dir: str | None = None
    device: str = "cpu"
    resume: bool = False
    quick: bool = False
    progress: bool = True
    autocast: str | None = None  # mixed-precision capture (Recorder(autocast=...))


def prepare_out(out: Path, *, resume: bool) -> Path:
    """Create ``out``; refuse to write into a folder that already holds results unless resuming."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise GradstoreError(f"--out {out} is a file; give a folder for the experiment's results")
    if out.exists() and any(out.iterdir()) and not resume:
        raise GradstoreError(
            f"{out} already holds results; pass --resume to continue that run or choose another --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    return out


def tracked_indices(n: int, size: int, seed: int) -> np.ndarray:
    """A fixed random sample of ``min(size, n)`` indices (sorted), the same for every noise level."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=min(size, n), replace=False))


def schedule_from(capture: dict[str, Any]):
    """The capture schedule of a ``[capture]`` table: log-spaced early steps, then a cadence."""
    from gradstore.store import Schedule

    return Schedule.log_then_every(capture["every"], until=capture["log_until"], n_log=capture["log_points"])


def train_recorded(config: dict[str, Any], noise: float, mnist, run_dir: Path, ctx: Context, *, desc: str,
                   optimizer: str = "sgd", optimizer_options: dict | None = None):
    """Train one model at one noise level with a Recorder on the tracked sample.

    Returns the :class:`~pipelines.train.TrainResult`, the :class:`~pipelines.train.TrainData` and the
    store path. A resumed run continues from its checkpoint and its last committed store step.
    """
    from tqdm import tqdm

    from gradstore.store.distributed import make_recorder
    from pipelines.models import build_model
    from pipelines.train import TrainConfig, TrainData, train

    cap = config["capture"]
    seed = config["seed"]
    tc = TrainConfig(model=config["model"], noise=noise, seed=seed, lr=config["lr"],
                     batch_size=config["batch_size"], steps=config["steps"], eval_every=config["eval_every"],
                     optimizer=optimizer, optimizer_options=dict(optimizer_options or {}), device=ctx.device)
    tc.validate()
    data = TrainData.from_mnist(mnist, noise=noise, seed=seed, device=ctx.device)
    tr = tracked_indices(len(data.y_train), cap["tracked_train"], seed + 100)
    te = tracked_indices(len(data.y_test), cap["tracked_test"], seed + 200)
    mo = tracked_indices(len(data.y_train), cap["moments_examples"], seed + 300)
    model = build_model(config["model"], seed=seed).to(ctx.device)
    run_dir.mkdir(parents=True, exist_ok=True)
    store = run_dir / "store.zarr"
    recorder = make_recorder(  # sharded over the ranks of `gradstore run --nproc N`
        str(store), model,
        train_inputs=data.x_train[tr], train_targets=data.y_train[tr], train_ids=data.train_ids[tr].cpu().numpy(),
        train_true=data.y_true[tr].cpu().numpy(),
        test_inputs=data.x_test[te] if len(te) else None, test_targets=data.y_test[te] if len(te) else None,
        test_ids=data.test_ids[te].cpu().numpy() if len(te) else None,
        moments_inputs=data.x_train[mo] if len(mo) else None, moments_targets=data.y_train[mo] if len(mo) else None,
        schedule=schedule_from(cap), coords_per_layer=cap["coords_per_layer"], coord_seed=seed,
        n_proj=cap["projection_dim"], projection_seed=seed, gram=cap["gram"],
        config={**config, "noise": noise, "optimizer": optimizer, "optimizer_options": dict(optimizer_options or {})},
        seeds={"seed": seed}, resume=ctx.resume, autocast=ctx.autocast,
    )
    with recorder, tqdm(total=tc.steps, desc=desc, unit="step", disable=not ctx.progress, leave=False) as bar:
        result = train(tc, data, model=model, observers=[recorder], checkpoint=run_dir / "checkpoint.pt",
                       checkpoint_every=max(tc.eval_every, 1), progress=lambda _s: bar.update(1))
    write_csv(run_dir / "history.csv", result.history)
    np.savez(run_dir / "learned_times.npz", example_id=data.train_ids.cpu().numpy(),
             first_learned=result.learned.first_learned, run_start=result.learned.run_start,
             corrupt=data.corrupt.cpu().numpy())
    return result, data, store


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


@dataclass
class Claim:
    """A claim of a paper, what was measured, and whether the data support it."""

    statement: str
    where: str
    measured: str
    supported: bool | None  # None: the run cannot decide (say why in ``measured``)


@dataclass
class Report:
    title: str
    intro: str
    claims: list[Claim] = field(default_factory=list)
    tables: list[tuple[str, list[str], list[list[Any]]]] = field(default_factory=list)
    figures: list[tuple[str, str]] = field(default_factory=list)  # (caption, relative path)
    notes: list[str] = field(default_factory=list)

    def write(self, path: Path) -> Path:
        verdict = {True: "supported", False: "**not supported**", None: "undecided"}
        lines = [f"# {self.title}", "", self.intro, ""]
        if self.claims:
            lines += ["## Claims tested", "", "| claim | paper | measured | verdict |", "|---|---|---|---|"]
            lines += [f"| {c.statement} | {c.where} | {c.measured} | {verdict[c.supported]} |" for c in self.claims]
            lines.append("")
        for caption, header, rows in self.tables:
            lines += [f"## {caption}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
            lines.append("")
        if self.figures:
            lines += ["## Figures", ""]
            lines += [f"![{caption}]({rel})\n\n*{caption}*\n" for caption, rel in self.figures]
        if self.notes:
            lines += ["## Notes", ""] + [f"- {n}" for n in self.notes] + [""]
        path.write_text("\n".join(lines))
        return path


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if np.isnan(v):
            return "–"
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)


def dump_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, default=float))


def coherence_summary(results) -> dict[str, Any]:
    """Whole-model m-coherence of the tracked training sample (peak, its step, final) and the final f_p."""
    mc = results["m_coherence"].sel(source="exact", sample="tracked_train", layer="(model)").values
    steps = results["step"].values
    k = int(np.nanargmax(mc))
    f_p = float(results["f_p"].sel(layer="(model)").values[-1]) if "f_p" in results else float("nan")
    return {"peak_m_coherence": float(mc[k]), "peak_step": int(steps[k]), "final_m_coherence": float(mc[-1]),
            "final_f_p": f_p}


def coherence_table(rows, key: str, label: str):
    """A report table of :func:`coherence_summary` values per (noise, ``key``) condition."""
    header = ["noise", label, "peak m-coherence", "peak step", "final m-coherence", "f_p at the end"]
    return ("Gradient coherence of the tracked sample (exact, from the run store)", header, [
        [f"{r['noise']:.0%}", r[key], r["peak_m_coherence"], r["peak_step"], r["final_m_coherence"], r["final_f_p"]]
        for r in rows if "peak_m_coherence" in r])
