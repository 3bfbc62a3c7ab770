"""One runner for every experiment: the run folder and resume, seeds, the claims and the report.

An experiment is a module following :class:`Experiment`: its ``NAME``, its ``CLAIMS`` (declared
with :func:`pipelines.experiments.claims.declare`), its ``PAPER`` settings, and ``execute(config,
ctx)``, which trains and analyses each condition and returns an :class:`Outcome`: the report
(without claims and figures), its figures (:class:`~pipelines.experiments.common.Figure`), the
inputs of each claim's evidence and the data source. The runner

- opens ``--out`` as a :class:`~pipelines.experiments.common.RunFolder` (marker, lock, resume);
- draws the outcome's figures into the run folder and captions them in the report;
- judges every declared claim on the outcome (:mod:`pipelines.experiments.claims`) and writes the
  evidence to ``claims.json``;
- writes ``report.md``: its first line says whether the run is at the paper's settings, its last
  section records the commit, configuration hash, data checksums and package versions (also in
  ``provenance.json``);
- with ``seeds > 1`` runs each seed (``seed``, ``seed + 1``, ...) as its own process, at most
  ``os.cpu_count()`` at a time, in its own run folder ``seed-S`` (so ``--resume`` works per seed),
  and writes a report across seeds: every number of the seeds' summaries as mean ± 95% t-interval,
  every verdict from the across-seed tests, and the figures of the experiment's optional
  ``seed_figures(config, seed_dirs)`` (read from the seeds' folders, drawn into the run's own).

Experiment modules never import one another; what several share lives in
:mod:`pipelines.experiments.common`.
"""

from __future__ import annotations

import importlib
import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from gradstore.errors import GradstoreError
from pipelines.experiments import claims as claims_engine
from pipelines.experiments import provenance
from pipelines.experiments.common import Context, Figure, Report, RunFolder

RUNNER_FILES = ("report.md", "claims.json", "provenance.json")


@dataclass
class Outcome:
    """What an experiment's ``execute`` returns."""

    report: Report
    inputs: dict[str, Any] = field(default_factory=dict)  # claim key -> its evidence's inputs
    source: str = "bundled subset"  # the data source (MNIST.source)
    figures: list[Figure] = field(default_factory=list)  # drawn by the runner, in this order


class Experiment(Protocol):
    """The protocol of an experiment module (see the module docstring)."""

    NAME: str
    CLAIMS: tuple
    PAPER: tuple
    FIXED_DEVIATIONS: tuple

    def execute(self, config: dict, ctx: Context) -> Outcome: ...

    # optional: figures across seeds, read from the seed folders
    # def seed_figures(self, config: dict, seed_dirs: list[Path]) -> list[Figure]: ...


def load(module: str) -> Experiment:
    exp = importlib.import_module(module)
    for attr in ("NAME", "CLAIMS", "PAPER", "execute"):
        if not hasattr(exp, attr):
            raise TypeError(f"experiment module {module} lacks {attr} (see pipelines.experiments.runner.Experiment)")
    return exp


def bind(module: str):
    """The ``run(config, ctx, *, title=None)`` entry of an experiment module: the runner on it."""
    def run(config: dict, ctx: Context, *, title: str | None = None) -> Path:
        return run_one(load(module), config, ctx, title=title)
    run.__doc__ = f"Run {module} through :func:`pipelines.experiments.runner.run_one`; return the report's path."
    return run


def _open(ctx: Context, name: str):
    if ctx.folder is not None:
        return ctx.folder, False
    ctx.folder = RunFolder.open(ctx.out, name, resume=ctx.resume)
    return ctx.folder, True


def _close(ctx: Context, opened: bool, failed: bool) -> None:
    if opened:
        folder, ctx.folder = ctx.folder, None
        folder.close(failed=failed)


def _finish(exp, config, ctx: Context, report: Report, source: str, claims: list, *, title: str | None) -> Path:
    folder = ctx.folder
    report.claims = claims + report.claims
    if title:
        report.title = title
    found = provenance.deviations(config, ctx, exp.PAPER, tuple(getattr(exp, "FIXED_DEVIATIONS", ())),
                                  full_data=source != "bundled subset")
    report.first_line = provenance.settings_line(found, exp.NAME)
    rec = provenance.record(config, ctx, command=ctx.command)
    rec["at_paper_settings"] = not found
    rec["deviations"] = found
    rec["ranks"] = ctx.ranks  # processes that trained (DDP under --nproc N or torchrun)
    if ctx.trained:
        rec["examples_trained_per_rank"] = list(ctx.trained)
    report.provenance = provenance.lines(rec)
    with folder.writing("provenance.json") as path:
        path.write_text(json.dumps(rec, indent=1) + "\n")
    with folder.writing("report.md") as path:
        return report.write(path)


def draw_figures(folder: RunFolder, figures: list[Figure]) -> list[tuple[str, str]]:
    """Draw each figure into the run folder; the (caption, file name) of those drawn, in order."""
    drawn = []
    for fig in figures:
        with folder.writing(fig.name) as path:
            if fig.draw(path) is not False:
                drawn.append((fig.caption, fig.name))
    return drawn


def run_one(exp: Experiment, config: dict, ctx: Context, *, title: str | None = None) -> Path:
    """One seed: execute the experiment in ``ctx.out``, judge its claims, write the report."""
    folder, opened = _open(ctx, exp.NAME)
    failed = True
    try:
        folder.claim_all([folder.out], [(name, "file") for name in RUNNER_FILES])
        outcome = exp.execute(config, ctx)
        outcome.report.figures[:0] = draw_figures(folder, outcome.figures)
        evidence = claims_engine.measure_all(exp.CLAIMS, outcome.inputs)
        with folder.writing("claims.json") as path:
            path.write_text(json.dumps({k: [c.to_dict() for c in v] for k, v in evidence.items()}, indent=1) + "\n")
        judged = claims_engine.judge_all(exp.CLAIMS, [evidence])
        out = _finish(exp, config, ctx, outcome.report, outcome.source, judged, title=title)
        failed = False
        return out
    finally:
        _close(ctx, opened, failed)


# -------------------------------------------------------------------------------------------- seeds
def seed_values(config: dict, seeds: int) -> list[int]:
    return [int(config["seed"]) + k for k in range(seeds)]


def _run_seed(module: str, config: dict, ctx: Context, threads: int) -> str:
    """One seed in its own process (spawned): torch limited to ``threads`` threads."""
    import torch

    torch.set_num_threads(max(1, threads))
    return str(run_one(load(module), config, ctx))


def run_seeds(module: str, config: dict, ctx: Context, seeds: int, *, title: str | None = None) -> Path:
    """``seeds`` seeds of the experiment as parallel processes, then the report across them."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    exp = load(module)
    if seeds < 2:
        return run_one(exp, config, ctx, title=title)
    values = seed_values(config, seeds)
    folder, opened = _open(ctx, exp.NAME)
    failed = True
    try:
        dirs = [folder.claim(f"seed-{s}", kind="dir") for s in values]
        folder.claim_all([folder.out], [(name, "file") for name in (*RUNNER_FILES, "summary.json")])
        for d in dirs:
            folder.makedirs(d)
        workers = min(seeds, os.cpu_count() or 1)
        jobs = [({**config, "seed": s}, replace(ctx, out=d, folder=None, progress=False)) for s, d in zip(values, dirs)]
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(_run_seed, module, cfg, c, (os.cpu_count() or 1) // workers) for cfg, c in jobs]
            reports = [Path(f.result()) for f in futures]
        evidence = [_read_evidence(d / "claims.json") for d in dirs]
        summaries = [json.loads((d / "summary.json").read_text()) if (d / "summary.json").exists() else None
                     for d in dirs]
        report = across_seeds_report(exp, config, values, reports, summaries, ctx)
        if hasattr(exp, "seed_figures"):
            report.figures += draw_figures(folder, exp.seed_figures(config, dirs))
        with folder.writing("summary.json") as path:
            path.write_text(json.dumps(aggregate(summaries), indent=1, default=float) + "\n")
        judged = claims_engine.judge_all(exp.CLAIMS, evidence)
        out = _finish(exp, config, ctx, report, _source(dirs[0]), judged, title=title)
        failed = False
        return out
    finally:
        _close(ctx, opened, failed)


def _source(seed_dir: Path) -> str:
    rec = json.loads((seed_dir / "provenance.json").read_text())
    return rec.get("data_dir", "bundled subset")


def _read_evidence(path: Path) -> dict[str, list]:
    raw = json.loads(path.read_text())
    return {k: [claims_engine.Condition.from_dict(c) for c in v] for k, v in raw.items()}


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None


def aggregate_rows(seed_rows: list[list[dict]]) -> tuple[list[str], list[list[Any]]]:
    """Rows of several seeds (the same conditions in the same order) as one table: a column that is
    the same in every seed is shown as it is (the condition), a number that varies as
    ``mean ± half-width`` of the 95% t-interval over the seeds."""
    header = list(seed_rows[0][0]) if seed_rows and seed_rows[0] else []
    out = []
    for k in range(min(len(rows) for rows in seed_rows)):
        row = []
        for key in header:
            values = [rows[k].get(key) for rows in seed_rows]
            if all(v == values[0] for v in values) or not all(_number(v) or v is None for v in values):
                row.append(values[0] if all(v == values[0] for v in values) else " / ".join(map(str, values)))
                continue
            mean, half, n = claims_engine.t_interval([float(v) for v in values if v is not None])
            row.append(f"{mean:.4g} ± {half:.2g}" if math.isfinite(half) else f"{mean:.4g} (n = {n})")
        out.append(row)
    return header, out


def aggregate(summaries: list) -> dict[str, Any]:
    """The seeds' ``summary.json`` as tables (see :func:`aggregate_rows`), keyed by table name."""
    tables = {}
    if not summaries or any(s is None for s in summaries):
        return tables
    if all(isinstance(s, list) for s in summaries):
        header, rows = aggregate_rows(summaries)
        tables["summary"] = {"header": header, "rows": rows}
    elif all(isinstance(s, dict) for s in summaries):
        for key in summaries[0]:
            parts = [s.get(key) for s in summaries]
            if all(isinstance(p, dict) for p in parts):
                parts = [[p] for p in parts]
            if all(isinstance(p, list) and p and all(isinstance(r, dict) for r in p) for p in parts):
                header, rows = aggregate_rows(parts)
                tables[key] = {"header": header, "rows": rows}
    return tables


def across_seeds_report(exp, config, values, reports, summaries, ctx: Context) -> Report:
    intro = (f"{len(values)} seeds ({', '.join(map(str, values))}) of `{exp.NAME}`, each run as its own process "
             f"in its own folder `seed-S/` (with its own report, stores and figures). Every number below is the mean "
             f"± the half-width of the 95% t-interval over the seeds (a column equal in every seed is shown as is); "
             f"every verdict comes from one-sided t-tests of the per-seed estimates across the seeds.")
    report = Report(f"{exp.NAME}: {len(values)} seeds", intro)
    for name, table in aggregate(summaries).items():
        report.tables.append((f"Across seeds: {name} (mean ± 95% t-interval)", table["header"], table["rows"]))
    report.notes.append("Per-seed reports: " + ", ".join(f"[seed {s}]({r.parent.name}/{r.name})"
                                                        for s, r in zip(values, reports)))
    report.notes.append("With few seeds the t-test has few degrees of freedom (n − 1): a claim that holds may still "
                        "read inconclusive; that is the data's uncertainty, not a failure.")
    return report


def check_seeds(seeds: int, nproc: int) -> None:
    """Refuse combinations the runner cannot honour (one line)."""
    if seeds > 1 and nproc > 1:
        raise GradstoreError(f"--seeds {seeds} with --nproc {nproc}: seeds already run as parallel processes; "
                             "give one of them")
