"""``gradstore run NAME``: one of the papers' experiments, end to end (train, capture, analyse, report)."""

from __future__ import annotations

from pathlib import Path

import click

from pipelines.cli.options import (
    NonEmptyPath,
    check_device,
    check_out,
    command_line,
    config_option,
    data_dir_option,
    device_option,
)
from pipelines.experiments import EXPERIMENTS


@click.command()
@click.argument("name", type=click.Choice(sorted(EXPERIMENTS)))
@config_option("TOML file overriding the experiment's defaults (the paper's settings).")
@data_dir_option
@device_option
@click.option("--out", type=NonEmptyPath(file_okay=False), default=None, help="Results folder (default runs/NAME).")
@click.option("--quick", is_flag=True, help="A few-minutes variant on 2 CPU cores.")
@click.option("--resume", is_flag=True, help="Continue a killed run from its checkpoint and committed store step.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
              help="Local processes sharing every capture (gloo on 127.0.0.1); training runs once, on rank 0.")
@click.option("--autocast", type=click.Choice(["bfloat16", "float16"]), default=None,
              help="Capture forward passes under torch.autocast (mixed precision; sums stay float64).")
@click.option("--seeds", type=click.IntRange(min=1, max=1000), default=1, show_default=True,
              help="Run N seeds (seed, seed+1, ...) as parallel processes (at most the CPU count), each in OUT/seed-S; "
                   "the report gives mean ± 95% t-interval and across-seed verdicts.")
def run(name, config_path, data_dir, device, out, quick, resume, no_progress, nproc, autocast, seeds):
    """Run experiment NAME and write its stores, analysis, figures and report.md."""
    from pipelines.distributed import capture_workers
    from pipelines.experiments import run_experiment
    from pipelines.experiments.common import Context, prepare_out
    from pipelines.experiments.config import load_config
    from pipelines.experiments.runner import check_seeds

    config = load_config(name, quick=quick, path=config_path)  # every setting checked before any work
    check_seeds(seeds, nproc)
    check_device(device)
    out = Path(out or f"runs/{name}{'-quick' if quick else ''}")
    check_out(out)
    out_dir = prepare_out(out, resume=resume)
    ctx = Context(out=out_dir, data_dir=data_dir, device=device, resume=resume, quick=quick, progress=not no_progress,
                  autocast=autocast, command=command_line())
    with capture_workers(nproc, device):
        report = run_experiment(name, config, ctx, **({"seeds": seeds} if seeds > 1 else {}))
    click.echo(f"report: {report}")
