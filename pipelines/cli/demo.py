"""``gradstore demo``: the README's main command.

A small label-noise + coherence experiment on the bundled MNIST subset at 0%, 50% and 100% noise
(configuration ``pipelines/configs/demo.toml``): it trains, captures into a run store per noise
level, analyses the stores and writes ``report.md`` with plots. The last line printed is the report's path.
"""

from __future__ import annotations

import time
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


@click.command()
@click.option("--out", type=NonEmptyPath(file_okay=False), default=None,
              help="Results folder (default: runs/demo-<date>-<time>).")
@config_option("TOML file overriding settings of pipelines/configs/demo.toml.")
@click.option("--quick", is_flag=True, help="An even smaller run (under a minute), for smoke tests.")
@data_dir_option
@device_option
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def demo(out, config_path, quick, data_dir, device, no_progress):
    """Train, capture, analyse and report at 0%, 50% and 100% label noise."""
    from pipelines.experiments.common import Context, prepare_out
    from pipelines.experiments.config import load_config
    from pipelines.experiments.label_noise import run

    config = load_config("demo", quick=quick, path=config_path)  # every setting checked before any work
    check_device(device)
    out = Path(out or time.strftime("runs/demo-%Y%m%d-%H%M%S"))
    check_out(out)
    out_dir = prepare_out(out, resume=False)
    ctx = Context(out=out_dir, data_dir=data_dir, device=device, quick=quick, progress=not no_progress,
                  command=command_line())
    started = time.perf_counter()
    report = run(config, ctx, title="gradstore demo: label noise and gradient coherence")
    click.echo(f"finished in {time.perf_counter() - started:.0f} s")
    click.echo(f"report: {report}")
